//! A GGUF vocabulary (`tokenizer.ggml.*`) as a `tokenizers` pipeline that encodes as llama.cpp
//! does. The structs are built directly rather than through `tokenizer.json` text: for a 256k
//! vocabulary, writing and parsing the JSON would cost seconds at every load.
//!
//! - byte-level BPE (`gpt2`): the vocabulary and merges, then the pre-tokenizer regexes of
//!   `tokenizer.ggml.pre` as a `Sequence` of isolated `Split`s and a regex-free `ByteLevel`.
//! - SentencePiece BPE (`llama`, e.g. Gemma): a BPE model with byte fallback whose merges are
//!   derived from the token scores (see [`spm_merges`]), spaces escaped as "▁" by the normalizer.
//!
//! Control, user-defined and unknown tokens become added tokens, so the same struct, serialized,
//! is a complete `tokenizer.json` for `convert`.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BpeBuilder, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::types::{Parts, TokenType, TokenizerError};
use crate::gguf::GgufFile;

/// The regexes of each `tokenizer.ggml.pre` value, from llama.cpp's `llama-vocab.cpp` (themselves
/// taken from each model's HF `tokenizer.json`). A missing key means "default" (GPT-2's regex).
fn pre_patterns(pre: &str) -> Option<Vec<&'static str>> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "default" | "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" | "phi-2" => vec![GPT2],
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" | "pixtral" => vec![LLAMA3],
        "qwen2" | "stablelm2" | "hunyuan" | "deepseek-r1-qwen" | "megrez" => vec![QWEN2],
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2]
        }
        "falcon" => vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
        "deepseek-coder" => vec![r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
        "poro-chat" | "bloom" | "gpt3-finnish" => vec![r" ?[^(\s|.,!?…。，、।۔،)]+"],
        "viking" => vec![r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"],
        _ => return None,
    })
}

/// llama3-style vocabularies look a whole pre-tokenized word up before merging.
fn pre_ignores_merges(pre: &str) -> bool {
    matches!(pre, "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral")
}

/// Names of end-of-generation tokens used by common chat templates; each counts as EOS when it
/// is a control or user-defined token of the vocabulary.
pub(super) const EOG_NAMES: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end|>",
    "<|end_of_text|>",
    "<EOT>",
    "<|eom_id|>",
];

impl TokenType {
    /// llama.cpp's numbering.
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

fn invalid(path: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid { path: path.into(), reason: reason.into() }
}

/// What differs between the pipelines of the two vocabulary kinds.
struct Pipeline {
    bpe: BpeBuilder,
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: Option<PreTokenizerWrapper>,
    decoder: DecoderWrapper,
}

pub(super) fn build(gguf: &GgufFile) -> Result<Parts, TokenizerError> {
    let path = gguf.path().display().to_string();
    let path = path.as_str();
    let model_name = gguf.get_str("tokenizer.ggml.model")?;
    let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let types: Vec<TokenType> = match gguf.optional("tokenizer.ggml.token_type", GgufFile::get_int_array)? {
        Some(t) if t.len() == n => t.into_iter().map(TokenType::from_id).collect(),
        Some(t) => return Err(invalid(path, format!("{} token types for {n} tokens", t.len()))),
        None => vec![TokenType::Normal; n],
    };
    let id_key = |key: &str| -> Result<Option<u32>, TokenizerError> {
        match gguf.optional(key, GgufFile::get_u32)? {
            Some(id) if (id as usize) < n => Ok(Some(id)),
            Some(id) => Err(invalid(path, format!("{key} = {id} is outside the vocabulary of {n}"))),
            None => Ok(None),
        }
    };
    let bos = id_key("tokenizer.ggml.bos_token_id")?;
    let unk = id_key("tokenizer.ggml.unknown_token_id")?;
    let eos = [id_key("tokenizer.ggml.eos_token_id")?, id_key("tokenizer.ggml.eot_token_id")?];

    let mut vocab = Vocab::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        // First occurrence wins, as in llama.cpp.
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    // SentencePiece vocabularies add BOS and a space prefix unless they say otherwise.
    let spm = model_name == "llama";
    let pre = gguf.optional("tokenizer.ggml.pre", GgufFile::get_str)?.unwrap_or("default");
    let add_bos =
        gguf.optional("tokenizer.ggml.add_bos_token", GgufFile::get_bool)?.unwrap_or(spm || pre_ignores_merges(pre));
    let add_eos = gguf.optional("tokenizer.ggml.add_eos_token", GgufFile::get_bool)?.unwrap_or(false);
    let add_space_prefix = gguf.optional("tokenizer.ggml.add_space_prefix", GgufFile::get_bool)?.unwrap_or(spm);

    let p = match model_name {
        "gpt2" => byte_level(gguf, path, vocab, pre)?,
        "llama" => sentencepiece(gguf, path, vocab, add_space_prefix)?,
        other => return Err(TokenizerError::UnsupportedModel { path: path.into(), model: other.into() }),
    };
    let bpe = match unk {
        Some(u) => p.bpe.unk_token(tokens[u as usize].clone()),
        None => p.bpe,
    };
    let bpe = bpe.build().map_err(|e| invalid(path, format!("BPE model: {e}")))?;
    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_normalizer(p.normalizer).map_err(|e| invalid(path, format!("normalizer: {e}")))?;
    hf.with_pre_tokenizer(p.pre_tokenizer);
    hf.with_post_processor(post_processor(path, tokens, add_bos.then_some(bos).flatten(), spm)?);
    hf.with_decoder(Some(p.decoder));
    let added = (0..n)
        .filter(|&i| matches!(types[i], TokenType::Unknown | TokenType::Control | TokenType::UserDefined))
        .map(|i| AddedToken::from(tokens[i].clone(), types[i] != TokenType::UserDefined).normalized(false));
    hf.add_tokens(added).map_err(|e| invalid(path, format!("added tokens: {e}")))?;

    Ok(Parts {
        tokens: tokens.to_vec(),
        types,
        hf,
        byte_level: !spm,
        bos,
        eos: eos.into_iter().flatten().collect(),
        add_bos,
        add_eos,
        add_space_prefix,
        chat_template: gguf.optional("tokenizer.chat_template", GgufFile::get_str)?.map(String::from),
    })
}

/// Byte-level BPE: merges as stored, text split by the `tokenizer.ggml.pre` regexes and then
/// mapped to GPT-2's byte alphabet.
fn byte_level(gguf: &GgufFile, path: &str, vocab: Vocab, pre: &str) -> Result<Pipeline, TokenizerError> {
    let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
    let mut pairs: Merges = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        // The first space not at position 0: a token may itself start with a space.
        let at = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
        let at = at.ok_or_else(|| invalid(path, format!("merge #{i} '{m}' has no space")))?;
        pairs.push((m[..at].to_string(), m[at + 1..].to_string()));
    }
    let patterns =
        pre_patterns(pre).ok_or_else(|| TokenizerError::UnsupportedPre { path: path.into(), pre: pre.into() })?;
    let mut steps = Vec::with_capacity(patterns.len() + 1);
    for p in patterns {
        let split = Split::new(SplitPattern::Regex(p.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| invalid(path, format!("pre-tokenizer regex {p:?}: {e}")))?;
        steps.push(split.into());
    }
    let byte_level = ByteLevel::new(false, true, false);
    steps.push(byte_level.into());
    Ok(Pipeline {
        bpe: BpeBuilder::new().vocab_and_merges(vocab, pairs).ignore_merges(pre_ignores_merges(pre)),
        normalizer: None,
        pre_tokenizer: Some(PreTokenizerSequence::new(steps).into()),
        decoder: byte_level.into(),
    })
}

/// SentencePiece BPE: the whole text with spaces escaped as "▁" (and, where the vocabulary asks,
/// one prepended), no pre-tokenizer, bytes outside the vocabulary as `<0xXX>` tokens.
fn sentencepiece(
    gguf: &GgufFile,
    path: &str,
    vocab: Vocab,
    add_space_prefix: bool,
) -> Result<Pipeline, TokenizerError> {
    let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
    let scores = gguf.get_f32_array("tokenizer.ggml.scores")?;
    if scores.len() != tokens.len() {
        return Err(invalid(path, format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| invalid(path, format!("replace: {e}")));
    let escape: NormalizerWrapper = replace(" ", "\u{2581}")?.into();
    let normalizer = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new("\u{2581}".into()).into(), escape]).into()
    } else {
        escape
    };
    let mut decoders: Vec<DecoderWrapper> =
        vec![replace("\u{2581}", " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    Ok(Pipeline {
        bpe: BpeBuilder::new().vocab_and_merges(vocab, spm_merges(tokens, scores)).byte_fallback(true).fuse_unk(true),
        normalizer: Some(normalizer),
        pre_tokenizer: None,
        decoder: DecoderSequence::new(decoders).into(),
    })
}

/// Adds BOS for readers of the written `tokenizer.json`; our own encoder adds BOS itself and
/// never asks for the post-processor.
fn post_processor(
    path: &str,
    tokens: &[String],
    bos: Option<u32>,
    spm: bool,
) -> Result<Option<PostProcessorWrapper>, TokenizerError> {
    let Some(b) = bos else {
        return Ok((!spm).then(|| ByteLevel::new(false, true, false).into()));
    };
    let t = &tokens[b as usize];
    // As JSON, because the template builder parses pieces from strings, which a token such as
    // "<s>" would survive but one with a space or a colon would not.
    let template = serde_json::json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {t.clone(): {"id": t, "ids": [b], "tokens": [t]}}});
    serde_json::from_value(template).map(Some).map_err(|e| invalid(path, format!("BOS post-processor: {e}")))
}

/// BPE merges equivalent to SentencePiece's score-driven merging, for a `tokenizers` BPE model.
///
/// SentencePiece (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose
/// concatenation is the vocabulary token with the highest score. A BPE model joins the pair
/// with the lowest merge rank instead, so every way of writing a token as two vocabulary tokens
/// becomes a merge, ranked by the joined token's score, highest first. The orders differ only
/// on score ties between overlapping candidates, which SentencePiece breaks by position and
/// this ranking by token id and split point; in real vocabularies only control, user-defined
/// and byte tokens share scores, and those are split out of the text before merging.
fn spm_merges(tokens: &[String], scores: &[f32]) -> Merges {
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.as_str()).or_insert(i);
    }
    let mut merges: Vec<(usize, usize)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        // A duplicate string is reached through its first id only.
        if ids.get(t.as_str()) != Some(&i) {
            continue;
        }
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(at);
            if ids.contains_key(l) && ids.contains_key(r) {
                merges.push((i, at));
            }
        }
    }
    merges.sort_by(|a, b| scores[b.0].total_cmp(&scores[a.0]).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    merges
        .into_iter()
        .map(|(i, at)| {
            let (l, r) = tokens[i].split_at(at);
            (l.to_string(), r.to_string())
        })
        .collect()
}
