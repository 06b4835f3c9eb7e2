//! Errors of the GGUF reader. Every variant names the file, so a message read out of context
//! still says which model was broken.

use std::path::PathBuf;

use super::GgmlType;

/// What can go wrong reading a GGUF file, looking up its metadata or decoding its tensors.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read file: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3){hint}")]
    UnsupportedVersion { path: PathBuf, version: u32, hint: &'static str },
    #[error("{path}: truncated while reading {what} at byte {offset} (file is {file_len} bytes)")]
    Truncated { path: PathBuf, what: String, offset: u64, file_len: u64 },
    #[error("{path}: {what} is {value}, more than the limit {limit} (truncated or corrupt file?)")]
    TooLarge { path: PathBuf, what: String, value: u64, limit: u64 },
    #[error("{path}: {what} is not valid UTF-8")]
    InvalidUtf8 { path: PathBuf, what: String },
    #[error("{path}: metadata key '{key}' has unknown value type {type_id}")]
    UnknownValueType { path: PathBuf, key: String, type_id: u32 },
    #[error("{path}: duplicate {what} '{name}'")]
    Duplicate { path: PathBuf, what: &'static str, name: String },
    #[error("{path}: general.alignment must be a power of two, got {alignment}")]
    BadAlignment { path: PathBuf, alignment: u64 },
    #[error("{path}: tensor '{tensor}' has unknown ggml type id {type_id}")]
    UnknownGgmlType { path: PathBuf, tensor: String, type_id: u32 },
    #[error("{path}: tensor '{tensor}': {reason}")]
    BadTensor { path: PathBuf, tensor: String, reason: String },
    #[error("{path}: tensor '{tensor}' data [{start}, {end}) extends past the end of the file ({file_len} bytes)")]
    TensorPastEof { path: PathBuf, tensor: String, start: u64, end: u64, file_len: u64 },
    #[error("{path}: no tensor named '{tensor}'")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: missing metadata key '{key}'")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key '{key}' is {found}, expected {expected}")]
    WrongType { path: PathBuf, key: String, expected: &'static str, found: String },
    #[error("{path}: tensor '{tensor}': {source}")]
    Dequant {
        path: PathBuf,
        tensor: String,
        #[source]
        source: DequantError,
    },
}

/// Errors of the pure dequantization functions (which know no file or tensor name).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DequantError {
    #[error("dequantizing {0} is not supported")]
    Unsupported(GgmlType),
    #[error("{ty}: {n_elements} elements need {expected} bytes, got {got}")]
    Length { ty: GgmlType, n_elements: usize, expected: usize, got: usize },
    #[error("{0} has no MLX affine form (supported: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)")]
    NotAffine(GgmlType),
    #[error("{ty} cannot be written as {bits}-bit codes in groups of {group}")]
    Layout { ty: GgmlType, bits: u32, group: usize },
    #[error("block {block}: bias {bias} for scale {scale} does not fit in f16")]
    BiasOverflow { block: usize, scale: f32, bias: f32 },
    #[error("block {block}: scale {scale} or bias {bias} is beyond the f16 range (65504) the GPU's f16 weights need")]
    ParamRange { block: usize, scale: f32, bias: f32 },
    #[error("{ty}: {n_elements} elements is not a multiple of the block size {block}")]
    PartialBlock { ty: GgmlType, n_elements: usize, block: usize },
}

/// Result alias of the GGUF reader.
pub type Result<T> = std::result::Result<T, GgufError>;
