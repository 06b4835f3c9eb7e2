//! Safe wrappers of our MLX CPU primitives. Each builds one lazy op on the CPU stream; the
//! caller decides whether it applies ([`enabled`], [`supports`]) — the GPU has its own kernels.

use crate::ffi;
use crate::{ExtError, Result};
use mlx_rs::{Array, Dtype};

/// Whether the engine routes work to these primitives (`--cpu-kernels`).
pub fn enabled() -> bool {
    crate::options::current().cpu_kernels.on()
}

/// Codes the kernels unpack: MLX affine packing at 2, 3, 4, 6 or 8 bits, with groups that hold
/// whole packed units ([`unit_elems`]).
pub fn supports(bits: u8, group: usize, len: usize) -> bool {
    unit_elems(bits).is_some_and(|unit| group > 0 && group.is_multiple_of(unit) && len.is_multiple_of(group))
}

/// Elements of one packed unit the kernels unpack at once (kernels.h `unit_elems_of`): 8 bytes
/// for 2, 4 and 8 bits, 24 bytes (eight 3-byte packs of MLX's bit stream) for 3 and 6 bits.
fn unit_elems(bits: u8) -> Option<usize> {
    match bits {
        2 | 4 | 8 => Some(64 / bits as usize),
        3 => Some(64),
        6 => Some(32),
        _ => None,
    }
}

/// Threads the kernels use (`--cpu-threads`, else every core). Starts their pool.
pub fn threads() -> usize {
    unsafe { ffi::kvsplit_ext_cpu_threads() as usize }
}

/// One packed operand as the kernels read it: MLX affine triplet and its widths.
#[derive(Clone, Copy)]
pub struct PackedRef<'a> {
    pub w: &'a Array,
    pub scales: &'a Array,
    pub biases: &'a Array,
    pub bits: u8,
    pub group: usize,
}

fn call(f: impl FnOnce(&mut mlx_sys::mlx_array, mlx_sys::mlx_stream) -> i32) -> Result<Array> {
    unsafe {
        let mut out = mlx_sys::mlx_array_new();
        let stream = mlx_sys::mlx_default_cpu_stream_new();
        let rc = f(&mut out, stream);
        mlx_sys::mlx_stream_free(stream);
        if rc != 0 {
            mlx_sys::mlx_array_free(out);
            return Err(ExtError::Primitive(ffi::last_error()));
        }
        Ok(Array::from_ptr(out))
    }
}

fn none() -> mlx_sys::mlx_array {
    mlx_sys::mlx_array { ctx: std::ptr::null_mut() }
}

/// `x W^T` for an affine-quantized `W` (`w` `[N, K*bits/32]`, `scales`/`biases` `[N, K/group]`
/// in f32 or f16) and `x` `[..., K]`; returns `[..., N]` float32. Every row of `x` shares one
/// pass over `W`, so this is for a few rows (decode), where `W` is read once per token.
pub fn quantized_matvec(x: &Array, w: &Array, scales: &Array, biases: &Array, group: i32, bits: i32) -> Result<Array> {
    let x = x.as_dtype(Dtype::Float32)?;
    call(|out, s| unsafe { ffi::kvsplit_cpu_quantized_matvec(out, x.as_ptr(), w.as_ptr(), scales.as_ptr(), biases.as_ptr(), group, bits, s) })
}

/// `x W^T` for an MXFP4 `W` (`w` u32 `[N, K/8]`, e8m0 `scales` u8 `[N, K/32]`): the packed
/// matvec above reading e2m1 codes. MLX 0.32.2's CPU `quantized_matmul` in mode `mxfp4` took
/// 227 ms for one 2880 x 2880 row (a gpt-oss-20b expert), which would make a token take a minute.
pub fn mxfp4_matvec(x: &Array, w: &Array, scales: &Array) -> Result<Array> {
    let x = x.as_dtype(Dtype::Float32)?;
    call(|out, s| unsafe { ffi::kvsplit_cpu_mxfp4_matvec(out, x.as_ptr(), w.as_ptr(), scales.as_ptr(), s) })
}

/// An MXFP4 `w` as f32 `[N, K]` (for products of many rows, through BLAS).
pub fn mxfp4_dequantize(w: &Array, scales: &Array) -> Result<Array> {
    call(|out, s| unsafe { ffi::kvsplit_cpu_mxfp4_dequantize(out, w.as_ptr(), scales.as_ptr(), s) })
}

/// `w` (`[N, K*bits/32]`, with `[N, K/group]` scales and biases) as f32 `[N, K]`: what MLX's
/// `dequantize` gives, at a fraction of its CPU cost.
pub fn dequantize(w: &Array, scales: &Array, biases: &Array, group: i32, bits: i32) -> Result<Array> {
    call(|out, s| unsafe { ffi::kvsplit_cpu_dequantize(out, w.as_ptr(), scales.as_ptr(), biases.as_ptr(), group, bits, s) })
}

/// Attention of `q` (`[B, Hq, L, D]`, already multiplied by the softmax scale) over the first
/// `len` tokens of whole packed cache buffers (`[B, Hkv, cap, ...]`), every query seeing every
/// token. Returns `[B, Hq, L, D]` f32. `softcap` as in [`softcap_arg`], for every entry point
/// below that attends.
pub fn decode_attention(q: &Array, k: PackedRef, v: PackedRef, len: usize, softcap: Option<f32>) -> Result<Array> {
    decode_attention_with(q, k, v, len, KeyAxis::Tokens, None, softcap)
}

/// Gemma 2's attention logit soft-capping as the kernels take it: each scaled score `s` becomes
/// `cap * tanh(s / cap)` before the softmax; `None` leaves scores as they are (passed as 0).
fn softcap_arg(softcap: Option<f32>) -> Result<f32> {
    match softcap {
        None => Ok(0.0),
        Some(c) if c.is_finite() && c > 0.0 => Ok(c),
        Some(c) => Err(ExtError::Primitive(format!("attention softcap {c} must be positive and finite"))),
    }
}

/// A packed per-token cache's decode step as one op: `k_new`/`v_new` (`[B, Hkv, 1, D]`) are
/// quantized as MLX's `quantize` would (same codes and scales) and written into row `slot` of
/// the whole buffers `k`/`v` in place, then `q` (`[B, Hq, 1, D]`, already multiplied by the
/// softmax scale) attends over tokens `0..=slot`. Returns `[B, Hq, 1, D]` f32. The caller owns
/// the buffers and must count the row as written.
pub fn decode_step(q: &Array, k_new: &Array, v_new: &Array, k: PackedRef, v: PackedRef, slot: usize, softcap: Option<f32>) -> Result<Array> {
    let q = q.as_dtype(Dtype::Float32)?;
    let cap = softcap_arg(softcap)?;
    // The op reads each head's row through the batch and head strides; rows are contiguous.
    let (kn, vn) = (k_new.as_dtype(Dtype::Float32)?, v_new.as_dtype(Dtype::Float32)?);
    call(|out, s| unsafe {
        ffi::kvsplit_cpu_quantized_decode_step(
            out,
            q.as_ptr(),
            kn.as_ptr(),
            vn.as_ptr(),
            k.w.as_ptr(),
            k.scales.as_ptr(),
            k.biases.as_ptr(),
            v.w.as_ptr(),
            v.scales.as_ptr(),
            v.biases.as_ptr(),
            slot as i32,
            k.group as i32,
            k.bits as i32,
            v.group as i32,
            v.bits as i32,
            cap,
            s,
        )
    })
}

/// The float runs a per-channel decode step reads beside its packed body: the whole tail
/// buffers (`[B, Hkv, cap, D]`, f32 or f16) and the row the new token goes to, and the sink rows
/// (`[B, Hkv, NS, D]`, in the stored frame), if any.
pub struct ChannelFloats<'a> {
    pub tail: (&'a Array, &'a Array),
    pub row: usize,
    pub sinks: Option<(&'a Array, &'a Array)>,
}

/// The packed body slots a per-channel decode step reads: `len` slots filled, all of them
/// (`ranges` empty) or the runs `[a, b)` of a rotating cache's visible window
/// ([`decode_attention_ranges`]).
pub struct ChannelBody<'a> {
    pub len: usize,
    pub ranges: &'a [(usize, usize)],
}

/// A per-channel cache's decode step as one op: `k_new`/`v_new` (`[B, Hkv, 1, D]`, unrotated)
/// enter the stored frame (`rot` bit 0: keys Hadamard-rotated, bit 1: values) and are written
/// into row `floats.row` of the tail buffers in place (rounded to their dtype), then `q`
/// (`[B, Hq, 1, D]`, already multiplied by the softmax scale, unrotated) attends over the sinks,
/// the body's slots (`body`: its first `len`, whole key groups, or a ring's visible runs) and
/// tail rows `0..=row`; the output comes back in the values' natural frame. Returns
/// `[B, Hq, 1, D]` f32. The caller owns the tail buffers and must count the row as written.
#[allow(clippy::too_many_arguments)]
pub fn channel_decode_step(q: &Array, k_new: &Array, v_new: &Array, k: PackedRef, v: PackedRef, body: ChannelBody, floats: ChannelFloats, rot: u8, softcap: Option<f32>) -> Result<Array> {
    let q = q.as_dtype(Dtype::Float32)?;
    let flat = flat_ranges(body.ranges);
    let cap = softcap_arg(softcap)?;
    let (kn, vn) = (k_new.as_dtype(Dtype::Float32)?, v_new.as_dtype(Dtype::Float32)?);
    let (tk, tv) = floats.tail;
    let (sk, sv) = floats.sinks.map_or((none(), none()), |(k, v)| (k.as_ptr(), v.as_ptr()));
    call(|out, s| unsafe {
        ffi::kvsplit_cpu_channel_decode_step(
            out,
            q.as_ptr(),
            kn.as_ptr(),
            vn.as_ptr(),
            k.w.as_ptr(),
            k.scales.as_ptr(),
            k.biases.as_ptr(),
            v.w.as_ptr(),
            v.scales.as_ptr(),
            v.biases.as_ptr(),
            tk.as_ptr(),
            tv.as_ptr(),
            sk,
            sv,
            body.len as i32,
            floats.row as i32,
            k.group as i32,
            k.bits as i32,
            v.group as i32,
            v.bits as i32,
            rot as i32,
            cap,
            flat.as_ptr(),
            body.ranges.len() as i32,
            s,
        )
    })
}

/// Attention of `q` (`[B, Hq, L, D]`, already multiplied by the softmax scale) over the first
/// `len` tokens of a 16-bit dense cache (`k`, `v` float16 `[B, Hkv, cap, D]`, the whole buffers),
/// every query seeing every token; each token is widened to f32 once, inside the op. Returns
/// `[B, Hq, L, D]` f32.
pub fn dense_decode_attention(q: &Array, k: &Array, v: &Array, len: usize, softcap: Option<f32>) -> Result<Array> {
    let (q, cap) = (q.as_dtype(Dtype::Float32)?, softcap_arg(softcap)?);
    call(|out, s| unsafe { ffi::kvsplit_cpu_dense_decode_attention(out, q.as_ptr(), k.as_ptr(), v.as_ptr(), len as i32, false, cap, s) })
}

/// [`prefill_attention`] over a 16-bit dense cache (`k`, `v` float16 `[B, Hkv, cap, D]`): the
/// chunk's tokens are the last `L` of the first `len`, query `i` sees tokens `0..=len - L + i`.
pub fn dense_prefill_attention(q: &Array, k: &Array, v: &Array, len: usize, softcap: Option<f32>) -> Result<Array> {
    let (q, cap) = (q.as_dtype(Dtype::Float32)?, softcap_arg(softcap)?);
    call(|out, s| unsafe { ffi::kvsplit_cpu_dense_decode_attention(out, q.as_ptr(), k.as_ptr(), v.as_ptr(), len as i32, true, cap, s) })
}

/// How packed keys are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAxis {
    /// `[B, Hkv, cap, D*bits/32]`: groups along head_dim, as the values.
    Tokens,
    /// `[B, Hkv, D, cap*bits/32]` (K transposed, KIVI): groups of `group` tokens per channel;
    /// `len` must be a whole number of groups.
    Channels,
}

/// [`decode_attention`] with keys in either layout, and float tokens (`tail`: K and V
/// `[B, Hkv, n, D]`) that every query also sees, folded into the same softmax.
pub fn decode_attention_with(q: &Array, k: PackedRef, v: PackedRef, len: usize, keys: KeyAxis, tail: Option<(&Array, &Array)>, softcap: Option<f32>) -> Result<Array> {
    attention_call(q, k, v, len, keys, tail, false, softcap, &[])
}

/// [`decode_attention_with`] over body slot ranges `[a, b)` instead of `[0, len)` (`len`: the
/// body's slots): a rotating cache's visible window, the runs of its ring. With per-channel
/// keys each run ends on a key group and may start inside one, whose older tokens are masked.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_ranges(q: &Array, k: PackedRef, v: PackedRef, len: usize, keys: KeyAxis, ranges: &[(usize, usize)], tail: Option<(&Array, &Array)>, softcap: Option<f32>) -> Result<Array> {
    attention_call(q, k, v, len, keys, tail, false, softcap, ranges)
}

fn flat_ranges(ranges: &[(usize, usize)]) -> Vec<i32> {
    ranges.iter().flat_map(|&(a, b)| [a as i32, b as i32]).collect()
}

/// Causal attention of a prefill chunk `q` (`[B, Hq, L, D]`, already multiplied by the softmax
/// scale) whose own tokens are the last `L` of the first `len` in the packed per-token buffers:
/// query `i` sees tokens `0..=len - L + i`. Query tiles share each block of codes they read, so
/// the window is streamed once per tile, never widened beyond a block. Returns `[B, Hq, L, D]`
/// f32.
pub fn prefill_attention(q: &Array, k: PackedRef, v: PackedRef, len: usize, softcap: Option<f32>) -> Result<Array> {
    attention_call(q, k, v, len, KeyAxis::Tokens, None, true, softcap, &[])
}

#[allow(clippy::too_many_arguments)]
fn attention_call(q: &Array, k: PackedRef, v: PackedRef, len: usize, keys: KeyAxis, tail: Option<(&Array, &Array)>, causal: bool, softcap: Option<f32>, ranges: &[(usize, usize)]) -> Result<Array> {
    let flat = flat_ranges(ranges);
    let (q, cap) = (q.as_dtype(Dtype::Float32)?, softcap_arg(softcap)?);
    let tail = tail.map(|(k, v)| Ok::<_, ExtError>((k.as_dtype(Dtype::Float32)?, v.as_dtype(Dtype::Float32)?))).transpose()?;
    let (tk, tv) = tail.as_ref().map_or((none(), none()), |(k, v)| (k.as_ptr(), v.as_ptr()));
    call(|out, s| unsafe {
        ffi::kvsplit_cpu_quantized_decode_attention(
            out,
            q.as_ptr(),
            k.w.as_ptr(),
            k.scales.as_ptr(),
            k.biases.as_ptr(),
            v.w.as_ptr(),
            v.scales.as_ptr(),
            v.biases.as_ptr(),
            len as i32,
            k.group as i32,
            k.bits as i32,
            v.group as i32,
            v.bits as i32,
            keys == KeyAxis::Channels,
            tk,
            tv,
            causal,
            cap,
            flat.as_ptr(),
            ranges.len() as i32,
            s,
        )
    })
}

/// Decode attention of `S` sequences (`q` `[S, Hq, 1, D]`, already multiplied by the softmax
/// scale) over a block pool (`[blocks, Hkv, BLOCK, ...]` packed K and V, contiguous) through
/// `table` (int32 `[S, 1 + max_blocks]`: each sequence's length, then its block ids), as one op.
/// With [`KeyAxis::Channels`] keys are `[blocks, Hkv, D, BLOCK...]` in whole groups, and each
/// sequence's last `len % group` tokens come from `tail` (K and V `[S, Hkv, n, D]`, row `s`),
/// after the `lead` sink tokens (`--kv-sinks`) each sequence keeps first in its tail rows and
/// its table length does not count. Returns `[S, Hq, 1, D]` f32.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_attention(q: &Array, k: PackedRef, v: PackedRef, table: &Array, keys: KeyAxis, tail: Option<(&Array, &Array)>, lead: usize, softcap: Option<f32>) -> Result<Array> {
    let (q, cap) = (q.as_dtype(Dtype::Float32)?, softcap_arg(softcap)?);
    let tail = tail.map(|(k, v)| Ok::<_, ExtError>((k.as_dtype(Dtype::Float32)?, v.as_dtype(Dtype::Float32)?))).transpose()?;
    let (tk, tv) = tail.as_ref().map_or((none(), none()), |(k, v)| (k.as_ptr(), v.as_ptr()));
    call(|out, s| unsafe {
        ffi::kvsplit_cpu_paged_decode_attention(
            out,
            q.as_ptr(),
            k.w.as_ptr(),
            k.scales.as_ptr(),
            k.biases.as_ptr(),
            v.w.as_ptr(),
            v.scales.as_ptr(),
            v.biases.as_ptr(),
            table.as_ptr(),
            k.group as i32,
            k.bits as i32,
            v.group as i32,
            v.bits as i32,
            keys == KeyAxis::Channels,
            tk,
            tv,
            lead as i32,
            cap,
            s,
        )
    })
}

/// RMSNorm over the last axis of a float32 `x` (MLX's `fast::rms_norm`, one op instead of its
/// CPU fallback's dozen).
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    call(|out, s| unsafe { ffi::kvsplit_cpu_rms_norm(out, x.as_ptr(), weight.map_or(none(), |w| w.as_ptr()), eps, s) })
}

/// Rotary embedding of a float32 `x` (`[..., L, D]`) with MLX's `fast::rope` semantics, as one op.
pub fn rope(x: &Array, dims: i32, traditional: bool, base: Option<f32>, scale: f32, offset: i32, freqs: Option<&Array>) -> Result<Array> {
    call(|out, s| unsafe {
        ffi::kvsplit_cpu_rope(out, x.as_ptr(), dims, traditional, base.unwrap_or(0.0), scale, offset, freqs.map_or(none(), |f| f.as_ptr()), s)
    })
}
