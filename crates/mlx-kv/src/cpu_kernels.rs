//! Safe wrappers of our own MLX CPU primitives (`crates/mlx-sys/ext/`): a quantized
//! matrix-vector product for decode-time linear layers and decode attention that reads the
//! packed split-precision cache in place. Both run inside MLX's graph like any op (lazy, on the
//! CPU stream) and use every core; `Backend::Cpu` only — the GPU has its own kernels.

use crate::env::Switch;
use crate::error::{KvError, Result};
pub use crate::attention::PackedOperand;
use mlx_rs::{Array, Dtype};
use std::ffi::CStr;

/// `KVSPLIT_CPU_KERNELS=0` turns the primitives off (MLX ops only), for measuring what they
/// bring and for cross-checking results.
pub static KERNELS: Switch = Switch::new("KVSPLIT_CPU_KERNELS", true);

/// Whether the engine routes work to these primitives ([`KERNELS`]).
pub fn enabled() -> bool {
    // The pool (C++) reads KVSPLIT_CPU_THREADS itself; a bad value is reported here, once.
    static THREADS: std::sync::Once = std::sync::Once::new();
    THREADS.call_once(|| {
        crate::env::positive("KVSPLIT_CPU_THREADS");
    });
    KERNELS.get()
}

/// Codes the kernels unpack: MLX affine packing at these widths, with groups whose packed
/// bytes are whole multiples of 8 (`64 / bits` elements).
pub fn supports(bits: u8, group: usize, len: usize) -> bool {
    matches!(bits, 2 | 4 | 8) && group > 0 && group.is_multiple_of(64 / bits as usize) && len.is_multiple_of(group)
}

/// Threads the kernels use (`KVSPLIT_CPU_THREADS`, else every core).
pub fn threads() -> usize {
    unsafe { mlx_sys::kvsplit_ext_cpu_threads() as usize }
}

fn call(f: impl FnOnce(&mut mlx_sys::mlx_array, mlx_sys::mlx_stream) -> i32) -> Result<Array> {
    unsafe {
        let mut out = mlx_sys::mlx_array_new();
        let stream = mlx_sys::mlx_default_cpu_stream_new();
        let rc = f(&mut out, stream);
        mlx_sys::mlx_stream_free(stream);
        if rc != 0 {
            mlx_sys::mlx_array_free(out);
            let msg = CStr::from_ptr(mlx_sys::kvsplit_ext_last_error()).to_string_lossy().into_owned();
            return Err(KvError::Shape(msg));
        }
        Ok(Array::from_ptr(out))
    }
}

/// `x W^T` for an affine-quantized `W` (`w` `[N, K*bits/32]`, `scales`/`biases` `[N, K/group]`
/// in f32 or f16) and `x` `[..., K]`; returns `[..., N]` float32. Every row of `x` shares one
/// pass over `W`, so this is for a few rows (decode), where `W` is read once per token.
pub fn quantized_matvec(x: &Array, w: &Array, scales: &Array, biases: &Array, group: i32, bits: i32) -> Result<Array> {
    let x = x.as_dtype(Dtype::Float32)?;
    call(|out, s| unsafe {
        mlx_sys::kvsplit_cpu_quantized_matvec(out, x.as_ptr(), w.as_ptr(), scales.as_ptr(), biases.as_ptr(), group, bits, s)
    })
}


/// `w` (`[N, K*bits/32]`, with `[N, K/group]` scales and biases) as f32 `[N, K]`: what MLX's
/// `dequantize` gives, at a fraction of its CPU cost.
pub fn dequantize(w: &Array, scales: &Array, biases: &Array, group: i32, bits: i32) -> Result<Array> {
    call(|out, s| unsafe { mlx_sys::kvsplit_cpu_dequantize(out, w.as_ptr(), scales.as_ptr(), biases.as_ptr(), group, bits, s) })
}

/// Attention of `q` (`[B, Hq, L, D]`, already multiplied by the softmax scale) over the first
/// `len` tokens of a packed cache, every query seeing every token. Returns `[B, Hq, L, D]` f32.
pub fn decode_attention(q: &Array, k: PackedOperand, v: PackedOperand, len: usize) -> Result<Array> {
    let q = q.as_dtype(Dtype::Float32)?;
    call(|out, s| unsafe {
        mlx_sys::kvsplit_cpu_quantized_decode_attention(
            out,
            q.as_ptr(),
            k.full.w.as_ptr(),
            k.full.scales.as_ptr(),
            k.full.biases.as_ptr(),
            v.full.w.as_ptr(),
            v.full.scales.as_ptr(),
            v.full.biases.as_ptr(),
            len as i32,
            k.group as i32,
            k.bits as i32,
            v.group as i32,
            v.bits as i32,
            s,
        )
    })
}

/// RMSNorm over the last axis of a float32 `x` (MLX's `fast::rms_norm`, one op instead of its
/// CPU fallback's dozen).
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    let none = mlx_sys::mlx_array { ctx: std::ptr::null_mut() };
    call(|out, s| unsafe { mlx_sys::kvsplit_cpu_rms_norm(out, x.as_ptr(), weight.map_or(none, |w| w.as_ptr()), eps, s) })
}

/// Rotary embedding of a float32 `x` (`[..., L, D]`) with MLX's `fast::rope` semantics, as one op.
pub fn rope(x: &Array, dims: i32, traditional: bool, base: Option<f32>, scale: f32, offset: i32, freqs: Option<&Array>) -> Result<Array> {
    let none = mlx_sys::mlx_array { ctx: std::ptr::null_mut() };
    call(|out, s| unsafe {
        mlx_sys::kvsplit_cpu_rope(out, x.as_ptr(), dims, traditional, base.unwrap_or(0.0), scale, offset, freqs.map_or(none, |f| f.as_ptr()), s)
    })
}
