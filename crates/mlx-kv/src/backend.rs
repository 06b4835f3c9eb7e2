//! Which MLX backend runs our ops, and which op shapes the engine may use on it.
//!
//! MLX 0.32.2's CUDA backend returns wrong values for `quantized_matmul` on 4-D/5-D inputs and
//! for `quantize` of a transposed (column-major) input (see PLATFORM.md and the conformance
//! table in docs/). The engine therefore only ever calls `quantized_matmul` with rank ≤
//! [`Backend::max_qmm_rank`] and only quantizes row-major contiguous data. The conformance test
//! in `tests/` checks that these choices pass on the backend in use.

use mlx_rs::{Device, DeviceType};

/// The device family that executes the default stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    /// MLX's GPU backend: CUDA on Linux, Metal on macOS.
    Gpu,
}

impl Backend {
    pub fn current() -> Self {
        match Device::default().get_type() {
            Ok(DeviceType::Gpu) => Backend::Gpu,
            _ => Backend::Cpu,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Gpu if cfg!(target_os = "macos") => "metal",
            Backend::Gpu => "cuda",
        }
    }

    /// Highest rank of `quantized_matmul` inputs the engine emits. 3-D is correct on every
    /// backend we measured; batched GQA attention is folded to `[Hkv, rep*L, D]`.
    pub fn max_qmm_rank(self) -> usize {
        3
    }

    /// Whether `quantized_matmul` may be given `rows` rows per KV head (folded GQA query rows).
    /// MLX 0.32.2's CUDA kernels for many rows (a prefill chunk) return wrong values for head_dim
    /// 64 (fused_check's prefill check on the H200: error 0.4-4 at 384 rows of D=64, 5e-4 at 512
    /// rows of D=128; docs/gpu-whole-model-h200.md), so on CUDA chunks of more than 8 rows go
    /// through dequantize + matmul instead; decode (one row per query head) keeps the quantized
    /// kernels, which the conformance suite checks at those sizes.
    pub fn qmm_rows_ok(self, rows: usize) -> bool {
        self == Backend::Cpu || cfg!(target_os = "macos") || rows <= 8
    }

    /// Whether `quantize` may be given a non-row-major view. Never: we make inputs contiguous.
    pub fn quantize_accepts_transposed(self) -> bool {
        false
    }

    /// The float dtype attention and matmuls compute in. On CPU, f16 (quantized) matmul is
    /// 15-45x slower than f32 in MLX 0.32.2, so the CPU path computes in f32.
    pub fn compute_dtype(self) -> mlx_rs::Dtype {
        match self {
            Backend::Cpu => mlx_rs::Dtype::Float32,
            Backend::Gpu => mlx_rs::Dtype::Float16,
        }
    }
}
