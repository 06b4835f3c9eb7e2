//! Attention on MLX's CPU backend, for every cache setting (dense included).
//!
//! Decode over one packed body (no mask, 2/3/4/6/8-bit codes) runs our own primitive
//! ([`primitive`]: `mlx_ext::cpu`, C++ in `crates/mlx-ext/csrc/`): it reads the codes in place,
//! once, on every core. Per-channel keys ([`primitive_channels`]) go there too, with the float
//! tail of tokens that do not fill a key group yet in the same softmax. Everything else (prefill
//! chunks, masks, windows, sinks, per-token bodies with a residual tail, dense caches) takes the
//! block path below, made of MLX ops that are fast on the CPU, because
//! MLX's CPU `quantized_matmul` is scalar code, its `exp` costs about 17 ns per element, and its
//! `scaled_dot_product_attention` is a softmax over the whole `L × T` score matrix:
//! - quantized keys and values (2, 4 or 8 bits, per-token groups) are read as their packed bytes;
//!   integer shifts/masks and a cast widen one block of codes to f32, and BLAS multiplies them.
//!   Scales and biases are applied to the products (per group), never to the codes, and only one
//!   block is ever widened, so the window is never dequantized;
//! - other quantized layouts (3/5/6 bits, per-channel keys) dequantize one block at a time;
//! - the softmax is an online (flash-style) merge over blocks small enough for the caches, with
//!   an exponential built from fused multiply-adds that `compile` turns into one loop.

use super::types::{apply_mask, join_float_runs, kv_heads, ChannelBody, Mask, PackedOperand, Scoring, Segment, Tensor};
use crate::error::Result;
use crate::store::TokenAxis;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{broadcast_to, matmul, maximum, stack};
use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};
use std::cell::RefCell;

/// Score elements per block (all heads): 2 MiB of f32, so a block's scores and probabilities
/// stay in the 2 MiB L2 of the 2-core CI machine. Measured per prefill chunk (512 queries over
/// 4K keys, SmolLM2 shape): 1M elements cost 1.3-1.6x more CPU time than 256K-512K; decode
/// (9 score rows) takes the 16384-token cap, where fewer, larger ops win.
const BLOCK_ELEMENTS: usize = 1 << 19;
/// Below this many score elements the running state is left lazy; above it each block is
/// evaluated so that only one block's temporaries are alive (prefill chunks).
const EVAL_PER_BLOCK_ELEMENTS: usize = 1 << 18;

type Compiled = Box<dyn FnMut(&Array) -> std::result::Result<Array, Exception>>;

thread_local! {
    static FAST_EXP: RefCell<Option<Compiled>> = const { RefCell::new(None) };
}

/// `exp(x)` for `x <= 0` as `exp(x/64)^64`, with a degree-7 Taylor polynomial around the middle
/// of `x/64 ∈ [-0.625, 0]`. Relative error about 1e-5 (the six squarings amplify the
/// polynomial's rounding 64x); inputs below -40 give `exp(-40) ≈ 4e-18`, which no softmax over
/// fewer than 1e12 tokens can notice. Only multiplies and adds, so the compiled loop vectorizes.
fn exp_nonpositive_graph(x: &Array) -> std::result::Result<Array, Exception> {
    let c = Array::from_f32;
    let u = maximum(x, c(-40.0))? * c(1.0 / 64.0) + c(0.3125);
    let mut p = &u * c(1.0 / 5040.0) + c(1.0 / 720.0);
    for k in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = &p * &u + c(k);
    }
    let mut e = p * c((-0.3125f32).exp());
    for _ in 0..6 {
        e = &e * &e;
    }
    Ok(e)
}

pub(crate) fn exp_nonpositive(x: &Array) -> Result<Array> {
    FAST_EXP.with(|f| {
        let mut f = f.borrow_mut();
        let compiled = f.get_or_insert_with(|| Box::new(mlx_rs::transforms::compile::compile(exp_nonpositive_graph, Some(true))));
        Ok(compiled(x)?)
    })
}

/// mlx-rs 0.33 has no bitwise ops; mlx-c does.
fn int_op(
    f: unsafe extern "C" fn(*mut mlx_sys::mlx_array, mlx_sys::mlx_array, mlx_sys::mlx_array, mlx_sys::mlx_stream) -> i32,
    a: &Array,
    k: u8,
) -> std::result::Result<Array, Exception> {
    let k = Array::from_slice(&[k], &[1]);
    unsafe {
        let mut r = mlx_sys::mlx_array_new();
        let s = mlx_sys::mlx_default_cpu_stream_new();
        let rc = f(&mut r, a.as_ptr(), k.as_ptr(), s);
        mlx_sys::mlx_stream_free(s);
        if rc != 0 {
            mlx_sys::mlx_array_free(r);
            return Err(Exception::custom("bitwise op on packed KV codes failed"));
        }
        Ok(Array::from_ptr(r))
    }
}

/// The `8/bits` fields of packed bytes as f32, field `i` from bits `[i*bits, (i+1)*bits)`.
fn unpack_graph(bits: u8, bytes: &Array) -> std::result::Result<Vec<Array>, Exception> {
    let mask = ((1u16 << bits) - 1) as u8;
    (0..8 / bits)
        .map(|i| {
            let shifted = if i == 0 { bytes.clone() } else { int_op(mlx_sys::mlx_right_shift, bytes, i * bits)? };
            let field = if mask == 0xff { shifted } else { int_op(mlx_sys::mlx_bitwise_and, &shifted, mask)? };
            field.as_dtype(Dtype::Float32)
        })
        .collect()
}

type CompiledMany = Box<dyn FnMut(&[Array]) -> std::result::Result<Vec<Array>, Exception>>;

thread_local! {
    /// Compiled unpackers for 2-, 4- and 8-bit codes.
    static UNPACK: RefCell<[Option<CompiledMany>; 3]> = const { RefCell::new([None, None, None]) };
}

/// Shifts, masks and casts fused into one pass over the bytes (one loop writing every field)
/// instead of three or four passes with u8 temporaries.
fn unpack(bits: u8, bytes: &Array) -> Result<Vec<Array>> {
    UNPACK.with(|u| {
        let mut u = u.borrow_mut();
        let slot = &mut u[bits.trailing_zeros() as usize - 1];
        let compiled = slot.get_or_insert_with(|| {
            Box::new(mlx_rs::transforms::compile::compile(move |x: &[Array]| unpack_graph(bits, &x[0]), Some(true)))
        });
        Ok(compiled(std::slice::from_ref(bytes))?)
    })
}

/// One block of a packed row-layout operand, ready for BLAS: the codes of each bit field as f32
/// (`fields[i][.., t, j]` is dimension `j*f + i`, `f = 8/bits`), and scales/biases `[BH, n, ng]`.
struct Codes {
    fields: Vec<Array>,
    scales: Array,
    biases: Array,
    ng: i32,
}

fn widen(t: &Tensor, a: usize, z: usize, bh: i32) -> Result<Option<Codes>> {
    let Tensor::Quant { p, bits, axis: TokenAxis::Rows, full, .. } = t else { return Ok(None) };
    if !matches!(bits, 2 | 4 | 8) {
        return Ok(None);
    }
    // The whole capacity buffer is contiguous, so its byte view is free; a token slice of it is too.
    let base = full.as_ref().map_or(p, |(f, _)| f);
    let (ai, zi) = (a as i32, z as i32);
    let fold = |x: Array| -> Result<Array> {
        let s = x.shape().to_vec();
        Ok(x.reshape(&[bh, s[2], s[3]])?)
    };
    let bytes = fold(base.w.view_dtype(Dtype::Uint8)?.index((.., .., ai..zi, ..)))?;
    let fields = unpack(*bits, &bytes)?;
    let scales = fold(base.scales.index((.., .., ai..zi, ..)))?.as_dtype(Dtype::Float32)?;
    let biases = fold(base.biases.index((.., .., ai..zi, ..)))?.as_dtype(Dtype::Float32)?;
    let ng = scales.shape()[2];
    Ok(Some(Codes { fields, scales, biases, ng }))
}

/// `[1, ng, 1, ng, 1]` identity, to keep group `g`'s rows on group `g`'s columns.
fn group_eye(ng: i32) -> Result<Array> {
    Ok(Array::eye::<f32>(ng, None, None)?.reshape(&[1, ng, 1, ng, 1])?)
}

/// Scores `[BH, R, n]` of `q3` (`[BH, R, D]`) against widened keys.
fn code_scores(q3: &Array, k: &Codes) -> Result<Array> {
    let s = q3.shape();
    let (bh, r, d) = (s[0], s[1], s[2]);
    let f = k.fields.len() as i32;
    let ng = k.ng;
    let n = k.scales.shape()[1];
    let q4 = q3.reshape(&[bh, r, d / f, f])?;
    let mut raw: Option<Array> = None;
    for (i, c) in k.fields.iter().enumerate() {
        let qi = q4.index((.., .., .., i as i32));
        let qi = if ng == 1 {
            qi
        } else {
            (qi.reshape(&[bh, 1, r, ng, d / f / ng])? * group_eye(ng)?).reshape(&[bh, ng * r, d / f])?
        };
        let part = matmul(&qi, c.swap_axes(1, 2)?)?;
        raw = Some(match raw {
            Some(acc) => acc + part,
            None => part,
        });
    }
    let raw = raw.expect("at least one bit field");
    let st = k.scales.swap_axes(1, 2)?; // [BH, ng, n]
    let qsum = q3.reshape(&[bh, r, ng, d / ng])?.sum_axis(3, false)?; // [BH, R, ng]
    let bias = matmul(&qsum, k.biases.swap_axes(1, 2)?)?;
    let scaled = if ng == 1 {
        raw * st
    } else {
        (raw.reshape(&[bh, ng, r, n])? * st.reshape(&[bh, ng, 1, n])?).sum_axis(1, false)?
    };
    Ok(scaled + bias)
}

/// `p @ V` (`p`: `[BH, R, n]`) against widened values.
fn code_weighted(p: &Array, v: &Codes, d: i32) -> Result<Array> {
    let s = p.shape();
    let (bh, r, n) = (s[0], s[1], s[2]);
    let f = v.fields.len() as i32;
    let ng = v.ng;
    let st = v.scales.swap_axes(1, 2)?; // [BH, ng, n]
    let ps = if ng == 1 { p * st } else { (p.reshape(&[bh, 1, r, n])? * st.reshape(&[bh, ng, 1, n])?).reshape(&[bh, ng * r, n])? };
    let outs = v
        .fields
        .iter()
        .map(|c| {
            let o = matmul(&ps, c)?; // [BH, ng*R, D/f]
            Ok(if ng == 1 {
                o
            } else {
                (o.reshape(&[bh, ng, r, ng, d / f / ng])? * group_eye(ng)?).sum_axis(1, false)?.reshape(&[bh, r, d / f])?
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let out = if f == 1 { outs[0].clone() } else { stack(&outs, -1)?.reshape(&[bh, r, d])? };
    let eb = matmul(p, &v.biases)?; // [BH, R, ng]
    Ok((out.reshape(&[bh, r, ng, d / ng])? + eb.expand_dims(-1)?).reshape(&[bh, r, d])?)
}

/// A block of one operand as f32 `[BH, n, D]` when it is not widened from codes.
fn float_block(t: &Tensor, a: usize, z: usize, bh: i32) -> Result<Array> {
    let (ai, zi) = (a as i32, z as i32);
    let x = match t {
        Tensor::Float(x) => x.index((.., .., ai..zi, ..)),
        Tensor::Quant { p, bits, group, axis, .. } => {
            let blk = super::types::slice_packed(p, *bits, *group, *axis, a, z);
            let x = blk.dequantize(*group, *bits, Dtype::Float32)?;
            if *axis == TokenAxis::Cols {
                x.swap_axes(2, 3)?
            } else {
                x
            }
        }
    };
    let s = x.shape().to_vec();
    Ok(x.reshape(&[bh, s[2], s[3]])?.as_dtype(Dtype::Float32)?)
}

/// Attention of `q` (`[B, Hq, L, D]`) over `segments` on the CPU, block by block with MLX ops;
/// returns `[B, Hq, L, D]`.
pub fn blocks(q: &Array, segments: &[Segment], mask: &Mask, scoring: Scoring, sinks: Option<&Array>) -> Result<Array> {
    let scale = scoring.scale;
    let qs = q.shape();
    let (b, hq, l, d) = (qs[0], qs[1], qs[2], qs[3]);
    let hkv = kv_heads(segments);
    let (rep, bh) = (hq / hkv, b * hkv);
    let r = rep * l;
    let q3 = (q.as_dtype(Dtype::Float32)? * Array::from_f32(scale)).reshape(&[bh, r, d])?;
    let total: usize = segments.iter().map(|s| s.len).sum();
    let visible = mask.visible(l as usize, total)?;
    // Keys a causal chunk's first query already sees need no mask.
    let unmasked_below = match mask {
        Mask::Causal => total + 1 - l as usize,
        _ => 0,
    };
    // A multiple of 128 keeps every block boundary on a group boundary (groups are 32, 64 or
    // 128 tokens) for per-channel keys, whose packed columns can only be cut between groups.
    let block = (BLOCK_ELEMENTS / (bh * r) as usize / 128 * 128).clamp(128, 16384);
    let eval_each = (bh * r) as usize * block.min(total) > EVAL_PER_BLOCK_ELEMENTS;

    let mut state: Option<(Array, Array, Array)> = match sinks {
        Some(s) => {
            let s = s.as_dtype(Dtype::Float32)?.reshape(&[1, hkv, rep, 1, 1])?;
            let m = broadcast_to(&s, &[b, hkv, rep, l, 1])?.reshape(&[bh, r, 1])?;
            let den = Array::ones::<f32>(&[bh, r, 1])?;
            Some((m, den, Array::zeros::<f32>(&[bh, r, d])?))
        }
        None => None,
    };
    let mut start = 0usize;
    for seg in segments {
        let mut a = 0;
        while a < seg.len {
            let z = (a + block).min(seg.len);
            let kc = widen(&seg.k, a, z, bh)?;
            let mut s = scoring.cap(match &kc {
                Some(k) => code_scores(&q3, k)?,
                None => matmul(&q3, float_block(&seg.k, a, z, bh)?.swap_axes(1, 2)?)?,
            })?;
            if let Some(vis) = &visible {
                if start + z > unmasked_below {
                    let vis = vis.index((.., (start + a) as i32..(start + z) as i32));
                    s = apply_mask(&s, &vis, rep, l)?;
                }
            }
            let bmax = s.max_axis(2, true)?;
            let m_new = match &state {
                Some((m, _, _)) => maximum(m, &bmax)?,
                None => bmax,
            };
            let p = exp_nonpositive(&(&s - &m_new))?;
            let o = match widen(&seg.v, a, z, bh)? {
                Some(v) => code_weighted(&p, &v, d)?,
                None => matmul(&p, float_block(&seg.v, a, z, bh)?)?,
            };
            let psum = p.sum_axis(2, true)?;
            let next = match state.take() {
                Some((m, den, acc)) => {
                    let alpha = exp_nonpositive(&(&m - &m_new))?;
                    (m_new, den * &alpha + psum, acc * &alpha + o)
                }
                None => (m_new, psum, o),
            };
            if eval_each {
                mlx_rs::transforms::eval([&next.0, &next.1, &next.2])?;
            }
            state = Some(next);
            a = z;
        }
        start += seg.len;
    }
    let (_, den, acc) = state.expect("a cache with tokens has at least one block");
    let out = (acc / den).as_dtype(q.dtype())?;
    Ok(out.reshape(&[b, hkv, rep, l, d])?.reshape(&[b, hq, l, d])?)
}

/// The f32 query times the scale, as the primitives take it (they cap the products themselves).
pub(crate) fn scaled(q: &Array, scoring: Scoring) -> Result<Array> {
    Ok(q.as_dtype(Dtype::Float32)? * Array::from_f32(scoring.scale))
}

/// Whether our CPU primitive reads these packed operands (2/4/8-bit codes in whole groups).
pub fn primitive_covers(k: &PackedOperand, v: &PackedOperand, head_dim: usize) -> bool {
    mlx_ext::cpu::supports(k.bits, k.group, head_dim) && mlx_ext::cpu::supports(v.bits, v.group, head_dim)
}

/// Our CPU primitive over the first `len` tokens of the packed buffers, every query seeing every
/// token. It streams the codes once, so it beats the block path whenever there are few query
/// rows; causal prefill chunks take [`primitive_prefill`].
pub fn primitive(q: &Array, k: PackedOperand, v: PackedOperand, len: usize, scoring: Scoring) -> Result<Array> {
    primitive_ranges(q, k, v, len, &[], scoring)
}

/// Our causal CPU primitive for a prefill chunk `q` (`[B, Hq, L, D]`) whose tokens are the last
/// `L` of the body's `len`. It replaces the block path's widened blocks, BLAS products and
/// one-thread softmax ops, which took most of a 4K-token prefill (session 17 profile).
pub fn primitive_prefill(q: &Array, k: PackedOperand, v: PackedOperand, len: usize, scoring: Scoring) -> Result<Array> {
    let qs = scaled(q, scoring)?;
    Ok(mlx_ext::cpu::prefill_attention(&qs, k.as_ref(), v.as_ref(), len, scoring.softcap)?.as_dtype(q.dtype())?)
}

/// [`primitive_prefill`] over a 16-bit dense body (`k`, `v` `[B, Hkv, T, D]`, the chunk's tokens
/// the last `L` of `T`).
pub(crate) fn primitive_dense_prefill(q: &Array, k: &Array, v: &Array, scoring: Scoring) -> Result<Array> {
    let qs = scaled(q, scoring)?;
    let len = k.shape()[2] as usize;
    Ok(mlx_ext::cpu::dense_prefill_attention(&qs, k, v, len, scoring.softcap)?.as_dtype(q.dtype())?)
}

/// Whether our CPU primitive reads a dense body: 16-bit float (what a dense cache stores on the
/// CPU), head_dim a multiple of 8.
pub(crate) fn dense_primitive_covers(k: &Array, head_dim: usize) -> bool {
    k.dtype() == Dtype::Float16 && head_dim.is_multiple_of(8)
}

/// Our CPU primitive over a dense 16-bit body (`k`, `v` `[B, Hkv, T, D]`), every query seeing
/// every token: each token is widened once, in the op, where the block path would widen the
/// whole window into f32 blocks for BLAS.
pub(crate) fn primitive_dense(q: &Array, k: &Array, v: &Array, scoring: Scoring) -> Result<Array> {
    let qs = scaled(q, scoring)?;
    let len = k.shape()[2] as usize;
    Ok(mlx_ext::cpu::dense_decode_attention(&qs, k, v, len, scoring.softcap)?.as_dtype(q.dtype())?)
}

/// Whether our CPU primitive reads a per-channel body: key groups of whole packed units that
/// tile the buffer's capacity (token groups), values as [`primitive_covers`].
pub(crate) fn channel_primitive_covers(b: &ChannelBody, head_dim: usize) -> bool {
    mlx_ext::cpu::supports(b.k.bits, b.k.group, b.cap) && mlx_ext::cpu::supports(b.v.bits, b.v.group, head_dim)
}

/// [`primitive_channels`] over body slot ranges (a rotating cache's visible ring runs; see
/// [`mlx_ext::cpu::decode_attention_ranges`]; empty for every slot).
pub(crate) fn primitive_channels_ranges(q: &Array, b: &ChannelBody, ranges: &[(usize, usize)], scoring: Scoring) -> Result<Array> {
    let qs = scaled(q, scoring)?;
    let floats = join_float_runs(b.sink, b.tail)?;
    let keys = mlx_ext::cpu::KeyAxis::Channels;
    let out = mlx_ext::cpu::decode_attention_ranges(&qs, b.k.as_ref(), b.v.as_ref(), b.len, keys, ranges, floats.as_ref().map(|(k, v)| (k, v)), scoring.softcap)?;
    Ok(out.as_dtype(q.dtype())?)
}

/// [`primitive`] over body slot ranges of a per-token body (a rotating cache's visible ring
/// runs; empty for its first `len` slots).
pub(crate) fn primitive_ranges(q: &Array, k: PackedOperand, v: PackedOperand, len: usize, ranges: &[(usize, usize)], scoring: Scoring) -> Result<Array> {
    let qs = scaled(q, scoring)?;
    let out = mlx_ext::cpu::decode_attention_ranges(&qs, k.as_ref(), v.as_ref(), len, mlx_ext::cpu::KeyAxis::Tokens, ranges, None, scoring.softcap)?;
    Ok(out.as_dtype(q.dtype())?)
}

/// Our CPU primitive over a per-channel body and its float tail, in one softmax.
pub(crate) fn primitive_channels(q: &Array, b: &ChannelBody, scoring: Scoring) -> Result<Array> {
    primitive_channels_ranges(q, b, &[], scoring)
}
