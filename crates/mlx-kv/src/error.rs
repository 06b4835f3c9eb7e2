//! Errors of the KV cache crate. Messages name the flag or value that was wrong.

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// A user-facing setting is invalid; `flag` is the CLI flag that set it.
    #[error("{flag}: {message}")]
    InvalidSpec { flag: &'static str, message: String },

    #[error("head_dim {head_dim} is not divisible by the {which} group size {group} (--kv-group-size)")]
    GroupMismatch {
        which: &'static str,
        head_dim: usize,
        group: usize,
    },

    #[error("requested length {requested} exceeds capacity {capacity}")]
    Capacity { requested: usize, capacity: usize },

    /// An attention path handed an option it does not implement (a dispatch bug, never silent).
    #[error("attention path {path}: {what} is not implemented there")]
    PathUnsupported { path: &'static str, what: &'static str },

    #[error("cache shape mismatch: {0}")]
    Shape(String),

    /// Saved text (a spec, a number) that does not parse; the message names where it came from.
    #[error("{0}")]
    Format(String),

    /// A saved cache file that cannot be written or read, or was made for another model or
    /// setting; the message names both sides of a mismatch.
    #[error("cache file {path}: {message}")]
    CacheFile { path: std::path::PathBuf, message: String },

    #[error(transparent)]
    Mlx(#[from] mlx_rs::error::Exception),

    /// Our CPU primitives (`mlx-ext`).
    #[error(transparent)]
    Ext(#[from] mlx_ext::ExtError),
}

pub type Result<T> = std::result::Result<T, KvError>;
