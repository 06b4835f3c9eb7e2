//! Errors of model loading and running. Messages name the file, tensor or flag involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),

    #[error("{path}: missing tensors: {missing:?}; unexpected tensors: {unexpected:?}")]
    Keys { path: PathBuf, missing: Vec<String>, unexpected: Vec<String> },

    #[error("{path}: tensor '{tensor}' has shape {got:?}, expected {want:?}")]
    Shape { path: PathBuf, tensor: String, got: Vec<usize>, want: Vec<usize> },

    #[error("{path}: unsupported model: {reason}")]
    Unsupported { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("{flag}: {message}")]
    Invalid { flag: &'static str, message: String },

    #[error("context of {requested} tokens exceeds {limit}")]
    Context { requested: usize, limit: String },

    #[error(transparent)]
    Kv(#[from] mlx_kv::KvError),

    #[error(transparent)]
    Mlx(#[from] mlx_rs::error::Exception),

    #[error(transparent)]
    Ext(#[from] mlx_ext::ExtError),

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, ModelError>;
