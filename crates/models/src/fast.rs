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

/// [`rope`] of `x` (`[S, H, 1, D]`, one decode token per sequence) with row `s` at position
/// `offsets[s]`: one op for the batch where MLX takes per-row offsets (its `rope` with an
/// offset array), one of ours per row on the CPU backend (ours takes one offset).
#[allow(clippy::too_many_arguments)]
pub fn rope_rows(
    x: &Array,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offsets: &[i32],
    freqs: Option<&Array>,
) -> Result<Array, Exception> {
    if offsets.windows(2).all(|w| w[0] == w[1]) {
        return rope(x, dims, traditional, base, scale, offsets.first().copied().unwrap_or(0), freqs);
    }
    if ours(x) {
        use mlx_rs::ops::indexing::IndexOp;
        let rows: Vec<Array> = offsets
            .iter()
            .enumerate()
            .map(|(s, &o)| rope(x.index((s as i32..s as i32 + 1, ..)), dims, traditional, base, scale, o, freqs))
            .collect::<Result<_, _>>()?;
        return mlx_rs::ops::concatenate(&rows, 0);
    }
    let off = Array::from_slice(offsets, &[offsets.len() as i32]);
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        let stream = if mlx_kv::Backend::current() == mlx_kv::Backend::Cpu { mlx_sys::mlx_default_cpu_stream_new() } else { mlx_sys::mlx_default_gpu_stream_new() };
        let b = mlx_sys::mlx_optional_float_ { value: base.unwrap_or(0.0), has_value: base.is_some() };
        let f = freqs.map_or(mlx_sys::mlx_array { ctx: std::ptr::null_mut() }, |f| f.as_ptr());
        let rc = mlx_sys::mlx_fast_rope_dynamic(&mut res, x.as_ptr(), dims, traditional, b, scale, off.as_ptr(), f, stream);
        mlx_sys::mlx_stream_free(stream);
        if rc != 0 {
            mlx_sys::mlx_array_free(res);
            return Err(Exception::custom("rope with per-sequence offsets failed"));
        }
        Ok(Array::from_ptr(res))
    }
}
