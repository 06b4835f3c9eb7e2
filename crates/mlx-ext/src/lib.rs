//! kvsplit-mlx's own MLX primitives and the options that choose the engine's compute paths.
//!
//! - [`cpu`]: safe wrappers of our C++ `mlx::core::Primitive`s (`csrc/`): a quantized
//!   matrix-vector product, a dequantize, decode attention over a packed split-precision cache,
//!   RMSNorm and RoPE. They run inside MLX's graph like any op, on the CPU backend only.
//! - [`cuda_kernel`]: our CUDA kernels as MLX custom kernels, launched with small host cost;
//!   [`host_profile`] times that host side (`--host-profile`).
//! - [`qmv`]: our CUDA matvec for quantized linear layers in decode.
//! - [`distributed`]: MLX's distributed layer (a process group and its collectives), for
//!   tensor-parallel models.
//! - [`graph`]: ordering after ops that write their inputs in place (MLX's `depends`).
//! - [`options`]: [`EngineOptions`], the typed kernel-path choices (fused GPU step and variants,
//!   CPU primitives, threads, weight handling, profiling) that every command takes as flags and
//!   every result row records.
//! - [`tensor_bytes`]: an MLX array viewed as safetensors data, for the files we write.
//!
//! This crate sits below `mlx-kv` (the cache and attention) and `models` (the families), which
//! both reach the primitives through it.

pub mod cpu;
pub mod cuda_kernel;
pub mod distributed;
mod ffi;
pub mod graph;
pub mod microscaled;
pub mod host_profile;
pub mod options;
pub mod qmv;
pub mod tensor_bytes;

pub use options::{CpuBuild, EngineOptions, GpuMatvec, Toggle, WeightMode};

/// A failed primitive call or an unusable option.
#[derive(Debug, thiserror::Error)]
pub enum ExtError {
    /// The C++ side refused (shapes, dtypes, widths); its message.
    #[error("{0}")]
    Primitive(String),
    #[error(transparent)]
    Mlx(#[from] mlx_rs::error::Exception),
    /// An option that cannot take effect; `flag` names it.
    #[error("{flag}: {message}")]
    Option { flag: &'static str, message: String },
}

pub type Result<T> = std::result::Result<T, ExtError>;
