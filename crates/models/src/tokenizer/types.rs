//! What the tokenizer's parts share: errors, token types, and the parts a [`super::Tokenizer`]
//! is built from. Below both builders (`gguf.rs`, `crate::tokenizer_json`) and the tokenizer.

use crate::gguf::GgufError;

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

/// What a [`super::Tokenizer`] is built from: a GGUF vocabulary (`gguf.rs`) or a model directory
/// ([`crate::tokenizer_json::load`]).
pub(crate) struct Parts {
    /// Every id's vocabulary string (empty where a directory's vocabulary has a hole).
    pub tokens: Vec<String>,
    pub types: Vec<TokenType>,
    pub hf: tokenizers::Tokenizer,
    /// Tokens are GPT-2 byte-level strings rather than SentencePiece pieces.
    pub byte_level: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub chat_template: Option<String>,
}

