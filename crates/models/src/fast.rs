//! `rms_norm` and `rope` with `mlx_rs::fast`'s signatures. On the CPU backend (float32) they
//! run our single-op primitives (`mlx_ext::cpu`): MLX 0.32.2 evaluates its own through
//! fallbacks of 10-25 small ops each, and at decode time per-op overhead is most of a step.
//! Elsewhere they are MLX's.

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

fn ours(x: &Array) -> bool {
    x.dtype() == Dtype::Float32 && mlx_ext::cpu::enabled() && mlx_kv::Backend::current() == mlx_kv::Backend::Cpu
}

fn exception(e: mlx_ext::ExtError) -> Exception {
    Exception::custom(e.to_string())
}

pub fn rms_norm(x: impl AsRef<Array>, weight: Option<&Array>, eps: f32) -> Result<Array, Exception> {
    let x = x.as_ref();
    if ours(x) && weight.is_none_or(|w| w.dtype() == Dtype::Float32) {
        return mlx_ext::cpu::rms_norm(x, weight, eps).map_err(exception);
    }
    mlx_rs::fast::rms_norm(x, weight, eps)
}

pub fn rope<'a>(
    x: impl AsRef<Array>,
    dims: i32,
    traditional: bool,
    base: impl Into<Option<f32>>,
    scale: f32,
    offset: i32,
    freqs: impl Into<Option<&'a Array>>,
) -> Result<Array, Exception> {
    let (x, base, freqs) = (x.as_ref(), base.into(), freqs.into());
    if ours(x) && freqs.is_none_or(|f| f.dtype() == Dtype::Float32) {
        return mlx_ext::cpu::rope(x, dims, traditional, base, scale, offset, freqs).map_err(exception);
    }
    mlx_rs::fast::rope(x, dims, traditional, base, scale, offset, freqs)
}
