//! The MLX-ops paths (what runs on the GPU where the fused kernel does not apply, and on Metal):
//! - [`sdpa`]: every segment in float → MLX's fused `scaled_dot_product_attention`;
//! - [`quantized`]: scores come from `quantized_matmul` on the packed keys (key bits) and
//!   outputs from `quantized_matmul` on the packed values (value bits). Nothing is dequantized
//!   where the backend's kernels take the row count (decode);
//! - [`widened`]: a prefill chunk on the GPU. This layer's packed runs are dequantized into the
//!   query's dtype, then MLX's sdpa runs as over a float cache. The widened window lives only
//!   while this layer's attention runs: at most one layer's K and V in 16 bits, less than the
//!   16-bit cache of the same context holds for every layer.
//!
//! GQA is folded to 3-D (`[B*Hkv, rep*L, D]`) because MLX 0.32.2's CUDA `quantized_matmul` is
//! wrong for 4-D/5-D inputs ([`crate::Backend::max_qmm_rank`]). Long prefill chunks walk the
//! cache in blocks with an online-softmax merge, so peak memory is one block of scores, not
//! `L × T`.

use super::types::{apply_mask, kv_heads, slice_packed, Mask, Scoring, Segment, Tensor, MASKED};
use crate::error::Result;
use crate::store::{Packed, TokenAxis};
use mlx_rs::fast::{scaled_dot_product_attention, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{broadcast_to, concatenate, exp, matmul, maximum, quantized_matmul, softmax_axis};
use mlx_rs::{Array, Dtype};

/// Tokens per block when a chunk's scores would be large.
pub const BLOCK_TOKENS: usize = 2048;
/// Above this many score elements per KV head, attention goes block by block.
const SINGLE_PASS_ELEMENTS: usize = 1 << 20;

fn fold3(x: &Array, b: i32, hkv: i32) -> Result<Array> {
    let s = x.shape();
    Ok(x.reshape(&[b * hkv, s[2], s[3]])?)
}

/// `[B, Hkv, a, c]` packed triplet → 3-D. MLX 0.32.2's CUDA `quantized_matmul` has no kernel
/// for a strided (sliced-from-capacity) weight, so on the GPU the slice is made contiguous; the
/// fused kernel, which indexes the full buffer, avoids that copy.
fn fold_packed(p: &Packed, b: i32, hkv: i32) -> Result<Packed> {
    let gpu = crate::Backend::current() == crate::Backend::Gpu;
    let f = |a: &Array| -> Result<Array> {
        let x = fold3(a, b, hkv)?;
        Ok(if gpu { x.contiguous()? } else { x })
    };
    Ok(Packed { w: f(&p.w)?, scales: f(&p.scales)?, biases: f(&p.biases)? })
}

fn slice_tokens(t: &Tensor, a: usize, z: usize) -> Tensor {
    match t {
        Tensor::Float(x) => Tensor::Float(x.index((.., .., a as i32..z as i32, ..))),
        Tensor::Quant { p, bits, group, axis, .. } => {
            let p = slice_packed(p, *bits, *group, *axis, a, z);
            Tensor::Quant { p, bits: *bits, group: *group, axis: *axis, full: None }
        }
    }
}

/// `x [B*Hkv, M, K] @ w` for a packed run (`w` logical `[B*Hkv, N, K]` when `transpose`, else
/// `[B*Hkv, K, N]`). Where [`crate::Backend::qmm_rows_ok`] refuses `M` rows, the run is
/// dequantized (one run: a block of at most [`BLOCK_TOKENS`] tokens for long chunks) and
/// multiplied densely; the product is the same, up to rounding.
fn packed_matmul(x: &Array, p: &Packed, bits: u8, group: usize, transpose: bool, b: i32, hkv: i32) -> Result<Array> {
    let p = fold_packed(p, b, hkv)?;
    let quantized = crate::Backend::current().qmm_rows_ok(x.shape()[1] as usize);
    packed_product(x, &p, bits, group, transpose, quantized)
}

/// `x @ w` for a folded packed `w`, through `quantized_matmul` or through dequantize + matmul.
fn packed_product(x: &Array, p: &Packed, bits: u8, group: usize, transpose: bool, quantized: bool) -> Result<Array> {
    if quantized {
        return Ok(quantized_matmul(x, &p.w, &p.scales, &p.biases, transpose, group as i32, bits as i32)?);
    }
    let w = mlx_rs::ops::dequantize(&p.w, &p.scales, &p.biases, group as i32, bits as i32)?.as_dtype(x.dtype())?;
    Ok(matmul(x, if transpose { w.swap_axes(1, 2)? } else { w })?)
}

/// Scores `[B*Hkv, rep*L, T]` of folded queries against one run of keys.
fn scores(q3: &Array, k: &Tensor, b: i32, hkv: i32) -> Result<Array> {
    Ok(match k {
        Tensor::Float(k) => matmul(q3, fold3(k, b, hkv)?.swap_axes(1, 2)?)?,
        Tensor::Quant { p, bits, group, axis, .. } => packed_matmul(q3, p, *bits, *group, *axis == TokenAxis::Rows, b, hkv)?,
    })
}

/// `probs [B*Hkv, rep*L, T] @ V` for one run of values.
fn weighted(p3: &Array, v: &Tensor, b: i32, hkv: i32) -> Result<Array> {
    Ok(match v {
        Tensor::Float(v) => matmul(p3, fold3(v, b, hkv)?)?,
        Tensor::Quant { p, bits, group, .. } => packed_matmul(p3, p, *bits, *group, false, b, hkv)?,
    })
}

/// Attention of `q` (`[B, Hq, L, D]`) over `segments` with at least one packed tensor, through
/// MLX ops; returns `[B, Hq, L, D]`. `sinks` are optional learned per-head sink logits (`[Hq]`).
/// Float segments are read too: this is also where soft-capped scores go on CUDA.
pub fn quantized(q: &Array, segments: &[Segment], mask: &Mask, scoring: Scoring, sinks: Option<&Array>) -> Result<Array> {
    let scale = scoring.scale;
    let qs = q.shape();
    let (b, hq, l, d) = (qs[0], qs[1], qs[2], qs[3]);
    let hkv = kv_heads(segments);
    let rep = hq / hkv;
    let total: usize = segments.iter().map(|s| s.len).sum();
    let q3 = (q * Array::from_f32(scale).as_dtype(q.dtype())?).reshape(&[b * hkv, rep * l, d])?;
    let visible = mask.visible(l as usize, total)?;
    let sink_col = match sinks {
        Some(s) => {
            let s = s.as_dtype(q.dtype())?.reshape(&[1, hkv, rep, 1, 1])?;
            Some(broadcast_to(&s, &[b, hkv, rep, l, 1])?.reshape(&[b * hkv, rep * l, 1])?)
        }
        None => None,
    };

    // Runs of keys/values: whole segments, or blocks of them for long chunks.
    let per_head = (rep * l) as usize * total;
    let block = if per_head <= SINGLE_PASS_ELEMENTS { usize::MAX } else { BLOCK_TOKENS };
    let mut runs = Vec::new();
    let mut start = 0usize;
    for seg in segments {
        let mut a = 0;
        while a < seg.len {
            let z = (a + block).min(seg.len);
            runs.push((slice_tokens(&seg.k, a, z), slice_tokens(&seg.v, a, z), start + a, start + z));
            a = z;
        }
        start += seg.len;
    }
    let masked_scores = |k: &Tensor, a: usize, z: usize| -> Result<Array> {
        let s = scoring.cap(scores(&q3, k, b, hkv)?)?;
        match &visible {
            Some(m) => apply_mask(&s, &m.index((.., a as i32..z as i32)), rep, l),
            None => Ok(s),
        }
    };

    let out3 = if block == usize::MAX {
        // One softmax over all runs: fewest ops, which is what decode needs.
        let mut cols: Vec<Array> = runs.iter().map(|(k, _, a, z)| masked_scores(k, *a, *z)).collect::<Result<_>>()?;
        if let Some(c) = &sink_col {
            cols.push(c.clone());
        }
        let p = softmax_axis(concatenate(&cols, 2)?, 2, true)?.as_dtype(q.dtype())?;
        let mut out: Option<Array> = None;
        for (_, v, a, z) in &runs {
            let o = weighted(&p.index((.., .., *a as i32..*z as i32)), v, b, hkv)?;
            out = Some(match out {
                Some(acc) => acc + o,
                None => o,
            });
        }
        out.expect("a cache with tokens has at least one run")
    } else {
        // Online softmax: running max m, running denominator den, running numerator acc.
        let (mut m, mut den) = match &sink_col {
            Some(c) => (c.as_dtype(Dtype::Float32)?, Array::ones::<f32>(c.shape())?),
            None => (Array::from_f32(MASKED), Array::from_f32(0.0)),
        };
        let mut acc: Option<Array> = None;
        for (k, v, a, z) in &runs {
            let s = masked_scores(k, *a, *z)?.as_dtype(Dtype::Float32)?;
            let m_new = maximum(&m, s.max_axis(2, true)?)?;
            let p = exp(&(&s - &m_new))?;
            let alpha = exp(&(&m - &m_new))?;
            den = &den * &alpha + p.sum_axis(2, true)?;
            let o = weighted(&p.as_dtype(q.dtype())?, v, b, hkv)?.as_dtype(Dtype::Float32)?;
            let next = match acc {
                Some(prev) => prev * &alpha + o,
                None => o,
            };
            // Evaluating the running state per block bounds peak memory to one block's scores;
            // left lazy, MLX may keep every block's temporaries alive at once.
            mlx_rs::transforms::eval([&next, &den, &m_new])?;
            acc = Some(next);
            m = m_new;
        }
        (acc.expect("a cache with tokens has at least one run") / &den).as_dtype(q.dtype())?
    };
    Ok(out3.reshape(&[b, hkv, rep, l, d])?.reshape(&[b, hq, l, d])?)
}

/// One run of K or V as `[B, Hkv, T, D]` in `dtype`: float runs as they are, packed runs
/// dequantized (per-channel keys, stored `[B, Hkv, D, T]`, transposed back).
fn widen(t: &Tensor, dtype: Dtype) -> Result<Array> {
    Ok(match t {
        Tensor::Float(x) => x.as_dtype(dtype)?,
        Tensor::Quant { p, bits, group, axis, .. } => {
            // A sliced run is a strided view; MLX 0.32.2's CUDA dequantize, like its
            // quantized_matmul (see `fold_packed`), is given row-contiguous codes.
            let c = |a: &Array| -> Result<Array> { Ok(a.contiguous()?) };
            let x = mlx_rs::ops::dequantize(&c(&p.w)?, &c(&p.scales)?, &c(&p.biases)?, *group as i32, *bits as i32)?.as_dtype(dtype)?;
            match axis {
                TokenAxis::Rows => x,
                TokenAxis::Cols => x.swap_axes(2, 3)?,
            }
        }
    })
}

/// Attention of `q` over `segments` (packed or float) through MLX's sdpa over the widened runs:
/// [`widen`] each run, join them, then [`sdpa`]. For prefill chunks on the GPU, where the
/// quantized kernels do not take the chunk's rows and [`quantized`] would dequantize block by
/// block anyway (one synchronising merge per block and layer). Not for soft-capped scores
/// (sdpa has no cap) and not for decode, which must not widen the window.
pub fn widened(q: &Array, segments: &[Segment], mask: &Mask, scoring: Scoring, sinks: Option<&Array>) -> Result<Array> {
    let dtype = q.dtype();
    let wide: Vec<Segment> = segments
        .iter()
        .map(|s| Ok(Segment { k: Tensor::Float(widen(&s.k, dtype)?), v: Tensor::Float(widen(&s.v, dtype)?), len: s.len }))
        .collect::<Result<_>>()?;
    sdpa(q, &wide, mask, scoring, sinks)
}

/// All-float caches: MLX's fused attention on the concatenated segments. It has no soft cap, so
/// capped scores take [`quantized`]'s ops instead.
pub fn sdpa(q: &Array, segments: &[Segment], mask: &Mask, scoring: Scoring, sinks: Option<&Array>) -> Result<Array> {
    if scoring.softcap.is_some() {
        return quantized(q, segments, mask, scoring, sinks);
    }
    let scale = scoring.scale;
    let pick = |f: fn(&Segment) -> &Tensor| -> Result<Array> {
        let parts: Vec<&Array> = segments
            .iter()
            .map(|s| match f(s) {
                Tensor::Float(x) => x,
                Tensor::Quant { .. } => unreachable!("sdpa() is only chosen for float segments"),
            })
            .collect();
        Ok(if parts.len() == 1 { parts[0].clone() } else { concatenate(&parts, 2)? })
    };
    let k = pick(|s| &s.k)?;
    let v = pick(|s| &s.v)?;
    let sinks = sinks.map(|s| s.as_dtype(q.dtype())).transpose()?;
    let out = match mask {
        Mask::None => scaled_dot_product_attention(q, &k, &v, scale, None, sinks.as_ref())?,
        Mask::Causal => scaled_dot_product_attention(q, &k, &v, scale, ScaledDotProductAttentionMask::Causal, sinks.as_ref())?,
        Mask::Visible(m) => scaled_dot_product_attention(q, &k, &v, scale, ScaledDotProductAttentionMask::Array(m), sinks.as_ref())?,
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::random;

    fn packed(x: &Array, bits: i32, group: i32) -> Packed {
        let (w, scales, biases) = mlx_rs::ops::quantize(x, group, bits).unwrap();
        Packed { w, scales, biases }
    }

    /// The widened route attends over exactly the values the packed runs hold: against f32
    /// attention over the dequantized runs computed here, it may differ only by the f16 rounding
    /// of each widened value and of the output (relative 2^-11 each, a few ulps through the
    /// softmax), on per-token and per-channel runs, beside a float tail, under a causal mask and
    /// with learned sinks. Checked in f32 too (no rounding but the sums': 1e-5).
    #[test]
    fn widened_route_attends_over_the_dequantized_runs() {
        let (b, hkv, rep, d, t0, t1, l) = (1, 2, 3, 64, 128, 24, 24);
        let keys = random::normal::<f32>(&[b, hkv, t0, d], None, None, None).unwrap();
        let vals = random::normal::<f32>(&[b, hkv, t0, d], None, None, None).unwrap();
        let (tk, tv) = (random::normal::<f32>(&[b, hkv, t1, d], None, None, None).unwrap(), random::normal::<f32>(&[b, hkv, t1, d], None, None, None).unwrap());
        let q = random::normal::<f32>(&[b, hkv * rep, l, d], None, None, None).unwrap();
        let sinks = random::normal::<f32>(&[hkv * rep], None, None, None).unwrap();
        for per_channel in [false, true] {
            // Per-channel keys are stored [B, Hkv, D, T] and grouped along tokens.
            let kp = if per_channel { packed(&keys.swap_axes(2, 3).unwrap().contiguous().unwrap(), 4, 64) } else { packed(&keys, 8, 64) };
            let (kbits, axis) = if per_channel { (4u8, TokenAxis::Cols) } else { (8u8, TokenAxis::Rows) };
            let vp = packed(&vals, 4, 32);
            let kd = mlx_rs::ops::dequantize(&kp.w, &kp.scales, &kp.biases, 64, kbits as i32).unwrap();
            let kd = if per_channel { kd.swap_axes(2, 3).unwrap() } else { kd };
            let vd = mlx_rs::ops::dequantize(&vp.w, &vp.scales, &vp.biases, 32, 4).unwrap();
            let dense_k = concatenate(&[&kd, &tk], 2).unwrap();
            let dense_v = concatenate(&[&vd, &tv], 2).unwrap();
            for dtype in [Dtype::Float32, Dtype::Float16] {
                for with_sinks in [false, true] {
                    let s = with_sinks.then_some(&sinks);
                    let segs = vec![
                        Segment { k: Tensor::Quant { p: kp.clone(), bits: kbits, group: 64, axis, full: None }, v: Tensor::Quant { p: vp.clone(), bits: 4, group: 32, axis: TokenAxis::Rows, full: None }, len: t0 as usize },
                        Segment { k: Tensor::Float(tk.as_dtype(dtype).unwrap()), v: Tensor::Float(tv.as_dtype(dtype).unwrap()), len: t1 as usize },
                    ];
                    let got = widened(&q.as_dtype(dtype).unwrap(), &segs, &Mask::Causal, Scoring::from(0.125), s).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    let want = sdpa(&q, &[Segment { k: Tensor::Float(dense_k.clone()), v: Tensor::Float(dense_v.clone()), len: (t0 + t1) as usize }], &Mask::Causal, Scoring::from(0.125), s).unwrap();
                    let err = (got.as_dtype(Dtype::Float32).unwrap() - &want).abs().unwrap().max(None).unwrap().item_exact::<f32>();
                    let scale = want.abs().unwrap().max(None).unwrap().item_exact::<f32>();
                    let bound = if dtype == Dtype::Float32 { 1e-5 } else { 8.0 * 2f32.powi(-11) } * scale.max(1.0);
                    assert!(err <= bound, "per_channel={per_channel} {dtype:?} sinks={with_sinks}: {err} > {bound}");
                }
            }
        }
    }

    /// The dequantize + matmul route (taken on CUDA for prefill chunks) computes the same product
    /// as `quantized_matmul` over the same packed values: both are f32 sums of the same terms, so
    /// they may differ only by f32 rounding, bounded by 2^-20 sum|x||w| per element (K <= 256
    /// terms).
    #[test]
    fn dequantized_route_equals_quantized_matmul_on_prefill_shapes() {
        let (bh, m, t, d) = (3, 384, 256, 64);
        for bits in [4, 8] {
            for transpose in [true, false] {
                let (k, n) = if transpose { (d, t) } else { (t, d) };
                let x = random::normal::<f32>(&[bh, m, k], None, None, None).unwrap();
                // The packed operand is stored [bh, rows, cols] grouped along cols: keys are
                // [t, d] (transpose), values [t, d] too (no transpose: x is [m, t]).
                let w = random::normal::<f32>(&[bh, t, d], None, None, None).unwrap();
                let (pw, ps, pb) = mlx_rs::ops::quantize(&w, 64, bits).unwrap();
                let p = Packed { w: pw, scales: ps, biases: pb };
                let q = packed_product(&x, &p, bits as u8, 64, transpose, true).unwrap();
                let dq = packed_product(&x, &p, bits as u8, 64, transpose, false).unwrap();
                assert_eq!(q.shape(), &[bh, m, n]);
                assert_eq!(dq.shape(), q.shape());
                let wd = mlx_rs::ops::dequantize(&p.w, &p.scales, &p.biases, 64, bits).unwrap();
                let wd = if transpose { wd.swap_axes(1, 2).unwrap() } else { wd };
                let bound = matmul(x.abs().unwrap(), wd.abs().unwrap()).unwrap() * Array::from_f32(2f32.powi(-20));
                let over = (q - &dq).abs().unwrap().gt(&bound).unwrap().any(None).unwrap();
                over.eval().unwrap();
                assert!(!over.item_exact::<bool>(), "bits={bits} transpose={transpose}: routes differ beyond f32 rounding");
            }
        }
    }
}
