//! The tokenizer: text to token ids and back, for GGUF files and HF/MLX model directories alike.
//!
//! Encoding always runs through the `tokenizers` crate. A directory brings its `tokenizer.json`
//! ([`crate::tokenizer_json::load`]); a GGUF vocabulary (`tokenizer.ggml.*`) is turned into the
//! same kind of pipeline in memory (`gguf.rs`), stated so that it encodes as llama.cpp does.
//! What follows llama.cpp rather than HF stays here, the same for both sources: special tokens
//! are split out of the text before the pipeline runs (so `parse_special == false` can treat
//! control tokens as plain text while still matching user-defined ones), BOS/EOS are added
//! here, and end-of-generation ids include the chat end markers. Decoding works on token bytes,
//! so [`StreamDecoder`] can hold back a character split across tokens.

mod gguf;
mod stream;
mod types;

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::gguf::GgufFile;
pub use stream::{StreamDecoder, TokenBytes};
pub(crate) use types::Parts;
pub use types::{TokenType, TokenizerError};

/// A tokenizer with its vocabulary metadata.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    hf: Box<tokenizers::Tokenizer>,
    byte_level: bool,
    /// Special tokens by first byte, longest first, for splitting them out of text.
    specials: HashMap<u8, Vec<u32>>,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    chat_template: Option<String>,
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

impl TokenBytes for Tokenizer {
    fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        Tokenizer::token_bytes(self, id, out)
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by `tokenizer.ggml.*` in `gguf`.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        gguf::build(gguf).map(Self::from_parts)
    }

    pub(crate) fn from_parts(p: Parts) -> Self {
        let mut hf = p.hf;
        // Special tokens are split out in `encode_with`; what reaches the `tokenizers` crate is
        // text, even where it spells a control token (`parse_special == false`).
        hf.set_encode_special_tokens(true);
        let mut eos = p.eos;
        for name in gguf::EOG_NAMES {
            if let Some(id) = hf.token_to_id(name) {
                let special = matches!(p.types.get(id as usize), Some(TokenType::Control | TokenType::UserDefined));
                if special && !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        let mut specials: HashMap<u8, Vec<u32>> = HashMap::new();
        for (i, t) in p.tokens.iter().enumerate() {
            let special = matches!(p.types[i], TokenType::Control | TokenType::UserDefined | TokenType::Unknown);
            if special && !t.is_empty() {
                specials.entry(t.as_bytes()[0]).or_default().push(i as u32);
            }
        }
        for list in specials.values_mut() {
            list.sort_by_key(|&id| std::cmp::Reverse(p.tokens[id as usize].len()));
        }
        Self {
            tokens: p.tokens,
            types: p.types,
            hf: Box::new(hf),
            byte_level: p.byte_level,
            specials,
            bos: p.bos,
            eos,
            add_bos: p.add_bos,
            add_eos: p.add_eos,
            add_space_prefix: p.add_space_prefix,
            chat_template: p.chat_template,
        }
    }

    /// The `tokenizers` pipeline; serialized, it is this tokenizer's `tokenizer.json`.
    pub(crate) fn hf(&self) -> &tokenizers::Tokenizer {
        &self.hf
    }

    /// Whether `encode(.., add_special = true)` appends EOS.
    pub(crate) fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether a space is prepended to text (SentencePiece) and stripped again when decoding.
    pub(crate) fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
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
        for frag in self.split_specials(text, parse_special) {
            match frag {
                Fragment::Token(id) => out.push(id),
                // Each fragment is encoded on its own, so SentencePiece's space prefix comes at
                // the start and after every special token, as in llama.cpp. Errors come only from
                // padding/truncation settings, which are never set.
                Fragment::Text(t) => {
                    out.extend(self.hf.encode_fast(t, false).map(|e| e.get_ids().to_vec()).unwrap_or_default())
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

    /// The bytes token `id` stands for in text; empty for control tokens and unknown ids.
    /// Bytes rather than a string because one token may hold part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(tok) = self.tokens.get(id as usize) else { return };
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unused => {}
            TokenType::UserDefined => out.extend(tok.as_bytes()),
            _ if self.byte_level => {
                let table = byte_level_bytes();
                for c in tok.chars() {
                    match table.get(&c) {
                        Some(&b) => out.push(b),
                        None => out.extend(c.to_string().as_bytes()),
                    }
                }
            }
            TokenType::Byte => match u8::from_str_radix(tok.trim_start_matches("<0x").trim_end_matches('>'), 16) {
                Ok(b) => out.push(b),
                Err(_) => out.extend(tok.as_bytes()),
            },
            _ => out.extend(tok.replace('\u{2581}', " ").as_bytes()),
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
        self.add_space_prefix && !self.byte_level
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

    /// The id of a vocabulary string (the first, where a GGUF vocabulary repeats one).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.hf.token_to_id(token)
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

/// The inverse of GPT-2's `bytes_to_unicode`, which byte-level vocabularies are written in:
/// printable Latin-1 bytes stand for themselves, the other 68 bytes, in order, for U+0100 and
/// up, so that no token contains whitespace or control characters.
fn byte_level_bytes() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let shifted = (0..=255u8).filter(|&b| !printable(b)).zip(256u32..).map(|(b, c)| (char::from_u32(c), b));
        let same = (0..=255u8).filter(|&b| printable(b)).map(|b| (Some(char::from(b)), b));
        same.chain(shifted).filter_map(|(c, b)| Some((c?, b))).collect()
    })
}
