//! Tokenizers built from GGUF metadata (`tokenizer.ggml.*`): byte-level BPE (`gpt2`) and
//! SentencePiece BPE (`llama`), with special tokens split out before either runs, plus a
//! streaming detokenizer for printing generated text.

mod bpe;
mod pretokenize;
mod spm;
mod stream;

use std::collections::HashMap;

use crate::gguf::{GgufError, GgufFile};
use bpe::Bpe;
use pretokenize::PreTokenizer;
pub use stream::StreamDecoder;

/// Errors building a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: tokenizer model '{model}' is not supported (supported: gpt2, llama)")]
    UnsupportedModel { path: String, model: String },
    #[error("{path}: pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported")]
    UnsupportedPre { path: String, pre: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// How a vocabulary entry is used (`tokenizer.ggml.token_type`, llama.cpp's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    /// Special tokens such as BOS/EOS and chat markers; never produced by merging text.
    Control,
    /// Added tokens that are matched literally in text and not byte-encoded.
    UserDefined,
    Unused,
    /// `<0xXX>` byte-fallback tokens of SentencePiece vocabularies.
    Byte,
}

impl TokenType {
    fn from_id(id: i64) -> Self {
        match id {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

/// Which algorithm the vocabulary uses.
#[derive(Debug, Clone)]
enum Model {
    /// Byte-level BPE with a regex pre-tokenizer.
    Bpe { bpe: Box<Bpe>, pre: PreTokenizer, ignore_merges: bool },
    /// SentencePiece BPE over scores.
    Spm { scores: Vec<f32>, byte_tokens: Vec<Option<u32>> },
    /// An HF `tokenizer.json` run by the `tokenizers` crate; `bytes` decodes byte-level vocabularies.
    Hf { hf: Box<tokenizers::Tokenizer>, bytes: Option<Box<Bpe>> },
}

/// The pre-tokenizer regexes of a `tokenizer.ggml.pre` value (for writing `tokenizer.json`).
pub(crate) fn pre_patterns(pre: &str) -> Option<Vec<&'static str>> {
    pretokenize::patterns(pre)
}

/// Whether a `tokenizer.ggml.pre` vocabulary looks whole words up before merging.
pub(crate) fn pre_ignores_merges(pre: &str) -> bool {
    pretokenize::ignores_merges(pre)
}

/// What [`crate::tokenizer_json`] reads from an HF tokenizer directory.
pub(crate) struct HfParts {
    pub tokens: Vec<String>,
    pub types: Vec<TokenType>,
    pub hf: Box<tokenizers::Tokenizer>,
    pub byte_level: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_space_prefix: bool,
    pub chat_template: Option<String>,
}

/// Names of end-of-generation tokens used by common chat templates; each counts as EOS when it
/// is a control or user-defined token of the vocabulary.
const EOG_NAMES: &[&str] =
    &["<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|end_of_text|>", "<EOT>", "<|eom_id|>"];

/// A tokenizer loaded from a GGUF file's metadata.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    ids: HashMap<String, u32>,
    model: Model,
    /// Special tokens by first byte, longest first, for splitting them out of text.
    specials: HashMap<u8, Vec<u32>>,
    bos: Option<u32>,
    eos: Vec<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    chat_template: Option<String>,
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

impl Tokenizer {
    /// Builds the tokenizer described by `tokenizer.ggml.*` in `gguf`.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let path = gguf.path().display().to_string();
        let invalid = |reason: String| TokenizerError::Invalid { path: path.clone(), reason };
        let model_name = gguf.get_str("tokenizer.ggml.model")?;
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?.to_vec();
        let n = tokens.len();
        let types: Vec<TokenType> = match gguf.optional("tokenizer.ggml.token_type", GgufFile::get_int_array)? {
            Some(t) if t.len() == n => t.into_iter().map(TokenType::from_id).collect(),
            Some(t) => return Err(invalid(format!("{} token types for {n} tokens", t.len()))),
            None => vec![TokenType::Normal; n],
        };
        let mut ids = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            // First occurrence wins, as in llama.cpp.
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let id_key = |key: &str| -> Result<Option<u32>, TokenizerError> {
            match gguf.optional(key, GgufFile::get_u32)? {
                Some(id) if (id as usize) < n => Ok(Some(id)),
                Some(id) => Err(invalid(format!("{key} = {id} is outside the vocabulary of {n}"))),
                None => Ok(None),
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let unk = id_key("tokenizer.ggml.unknown_token_id")?;
        let mut eos: Vec<u32> = [id_key("tokenizer.ggml.eos_token_id")?, id_key("tokenizer.ggml.eot_token_id")?]
            .into_iter()
            .flatten()
            .collect();
        for name in EOG_NAMES {
            if let Some(&id) = ids.get(*name) {
                let special = matches!(types[id as usize], TokenType::Control | TokenType::UserDefined);
                if special && !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }

        let pre_name = gguf.optional("tokenizer.ggml.pre", GgufFile::get_str)?.unwrap_or("default");
        let (model, default_add_bos, default_space_prefix) = match model_name {
            "gpt2" => {
                let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
                let bpe = Bpe::new(merges).map_err(|i| invalid(format!("merge #{i} '{}' has no space", merges[i])))?;
                let pre = PreTokenizer::new(pre_name)
                    .ok_or_else(|| TokenizerError::UnsupportedPre { path: path.clone(), pre: pre_name.into() })?;
                let ignore_merges = pretokenize::ignores_merges(pre_name);
                (Model::Bpe { bpe: Box::new(bpe), pre, ignore_merges }, ignore_merges, false)
            }
            "llama" => {
                let scores = gguf.get_f32_array("tokenizer.ggml.scores")?.to_vec();
                if scores.len() != n {
                    return Err(invalid(format!("{} scores for {n} tokens", scores.len())));
                }
                let byte_tokens = (0..256).map(|b| ids.get(&format!("<0x{b:02X}>")).copied()).collect();
                (Model::Spm { scores, byte_tokens }, true, true)
            }
            other => {
                return Err(TokenizerError::UnsupportedModel { path, model: other.into() });
            }
        };
        let add_bos = gguf.optional("tokenizer.ggml.add_bos_token", GgufFile::get_bool)?.unwrap_or(default_add_bos);
        let add_eos = gguf.optional("tokenizer.ggml.add_eos_token", GgufFile::get_bool)?.unwrap_or(false);
        let add_space_prefix =
            gguf.optional("tokenizer.ggml.add_space_prefix", GgufFile::get_bool)?.unwrap_or(default_space_prefix);
        let chat_template = gguf.optional("tokenizer.chat_template", GgufFile::get_str)?.map(String::from);

        let mut specials: HashMap<u8, Vec<u32>> = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            let special = matches!(types[i], TokenType::Control | TokenType::UserDefined | TokenType::Unknown);
            if special && !t.is_empty() {
                specials.entry(t.as_bytes()[0]).or_default().push(i as u32);
            }
        }
        for list in specials.values_mut() {
            list.sort_by_key(|&id| std::cmp::Reverse(tokens[id as usize].len()));
        }
        Ok(Self {
            tokens,
            types,
            ids,
            model,
            specials,
            bos,
            eos,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
            chat_template,
        })
    }

    /// A tokenizer whose text is encoded by an HF `tokenizer.json`; special tokens, EOS and
    /// decoding work as for GGUF vocabularies.
    pub(crate) fn from_hf_parts(p: HfParts) -> Self {
        let mut ids = HashMap::with_capacity(p.tokens.len());
        for (i, t) in p.tokens.iter().enumerate() {
            if !t.is_empty() {
                ids.entry(t.clone()).or_insert(i as u32);
            }
        }
        let mut eos = p.eos;
        for name in EOG_NAMES {
            if let Some(&id) = ids.get(*name) {
                let special = matches!(p.types[id as usize], TokenType::Control | TokenType::UserDefined);
                if special && !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        let mut specials: HashMap<u8, Vec<u32>> = HashMap::new();
        for (i, t) in p.tokens.iter().enumerate() {
            if matches!(p.types[i], TokenType::Control | TokenType::UserDefined) && !t.is_empty() {
                specials.entry(t.as_bytes()[0]).or_default().push(i as u32);
            }
        }
        for list in specials.values_mut() {
            list.sort_by_key(|&id| std::cmp::Reverse(p.tokens[id as usize].len()));
        }
        // An empty merge list still gives the byte <-> char table.
        let bytes = if p.byte_level { Bpe::new(&[]).ok().map(Box::new) } else { None };
        Self {
            tokens: p.tokens,
            types: p.types,
            ids,
            model: Model::Hf { hf: p.hf, bytes },
            specials,
            bos: p.bos,
            eos,
            unk: p.unk,
            add_bos: p.add_bos,
            add_eos: false,
            add_space_prefix: p.add_space_prefix,
            chat_template: p.chat_template,
        }
    }

    /// Encodes `text`, recognizing special tokens written in it (so "<|im_start|>" is one id).
    /// `add_special` adds BOS (and EOS) where the vocabulary asks for them.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        self.encode_with(text, add_special, true)
    }

    /// Like [`Self::encode`]; with `parse_special == false` control tokens in the text are
    /// tokenized as plain text (user-defined tokens are still matched), as llama.cpp does. Use
    /// that for untrusted text that must not inject chat markers.
    pub fn encode_with(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        // SentencePiece prefixes a space to text at the start and after each special token.
        let mut after_special = true;
        for frag in self.split_specials(text, parse_special) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(t) => {
                    self.encode_text(t, after_special, &mut out);
                    after_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos.first());
        }
        out
    }

    fn split_specials<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = Vec::new();
        let (mut i, mut plain_from) = (0, 0);
        let bytes = text.as_bytes();
        while i < bytes.len() {
            let hit = self.specials.get(&bytes[i]).and_then(|cands| {
                cands.iter().copied().find(|&id| {
                    let usable = parse_special || self.types[id as usize] == TokenType::UserDefined;
                    usable && text[i..].starts_with(self.tokens[id as usize].as_str())
                })
            });
            match hit {
                Some(id) => {
                    if plain_from < i {
                        frags.push(Fragment::Text(&text[plain_from..i]));
                    }
                    frags.push(Fragment::Token(id));
                    i += self.tokens[id as usize].len();
                    plain_from = i;
                }
                None => i += 1,
            }
        }
        if plain_from < text.len() {
            frags.push(Fragment::Text(&text[plain_from..]));
        }
        frags
    }

    fn encode_text(&self, text: &str, after_special: bool, out: &mut Vec<u32>) {
        match &self.model {
            Model::Bpe { bpe, pre, ignore_merges } => {
                for word in pre.split(text) {
                    let word = bpe.encode_bytes(word);
                    if *ignore_merges {
                        if let Some(&id) = self.ids.get(&word) {
                            out.push(id);
                            continue;
                        }
                    }
                    for sym in bpe.merge(&word) {
                        match self.ids.get(&sym) {
                            Some(&id) => out.push(id),
                            None => out.extend(sym.chars().filter_map(|c| self.ids.get(&c.to_string()).copied())),
                        }
                    }
                }
            }
            Model::Spm { scores, byte_tokens } => {
                let prefix = if self.add_space_prefix && after_special { " " } else { "" };
                let escaped = format!("{prefix}{text}").replace(' ', "\u{2581}");
                spm::tokenize(&escaped, &self.ids, scores, |b| byte_tokens[b as usize], self.unk, out);
            }
            // Encoding errors come only from padding/truncation settings, which we never set.
            Model::Hf { hf, .. } => out.extend(hf.encode(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default()),
        }
    }

    /// The bytes token `id` stands for in text; empty for control tokens and unknown ids.
    /// Bytes rather than a string because one token may hold part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(tok) = self.tokens.get(id as usize) else { return };
        match (self.types[id as usize], &self.model) {
            (TokenType::Control | TokenType::Unused, _) => {}
            (TokenType::UserDefined, _) => out.extend(tok.as_bytes()),
            (TokenType::Byte, Model::Spm { .. }) => match u8::from_str_radix(tok.trim_start_matches("<0x").trim_end_matches('>'), 16) {
                Ok(b) => out.push(b),
                Err(_) => out.extend(tok.as_bytes()),
            },
            (_, Model::Bpe { bpe, .. } | Model::Hf { bytes: Some(bpe), .. }) => bpe.decode_chars(tok, out),
            (TokenType::Byte, Model::Hf { .. }) => match u8::from_str_radix(tok.trim_start_matches("<0x").trim_end_matches('>'), 16) {
                Ok(b) => out.push(b),
                Err(_) => out.extend(tok.as_bytes()),
            },
            (_, Model::Hf { .. }) => out.extend(tok.replace('\u{2581}', " ").as_bytes()),
            (_, Model::Spm { .. }) => out.extend(tok.replace('\u{2581}', " ").as_bytes()),
        }
    }

    /// Decodes ids to text, skipping control tokens (BOS/EOS, chat markers). Invalid UTF-8 (a
    /// character cut off at the end) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            self.token_bytes(id, &mut bytes);
        }
        let mut s = String::from_utf8_lossy(&bytes).into_owned();
        if self.strips_leading_space() && s.starts_with(' ') {
            s.remove(0);
        }
        s
    }

    /// Whether decoded text starts with a space the encoder added (SentencePiece prefix).
    fn strips_leading_space(&self) -> bool {
        self.add_space_prefix && matches!(self.model, Model::Spm { .. } | Model::Hf { bytes: None, .. })
    }

    /// A streaming decoder for generated ids.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self, self.strips_leading_space())
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The vocabulary string of `id`.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a vocabulary string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// The type of `id`.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-generation ids: `eos_token_id`, `eot_token_id` and chat end markers.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether generation should stop at `id`.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// Whether `encode(.., add_special = true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The Jinja chat template (`tokenizer.chat_template`), if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}
