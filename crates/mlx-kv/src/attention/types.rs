//! What every attention path reads: runs of cached tokens (segments) in float or packed form,
//! the mask, and the packed operands the decode kernels index in place. The paths
//! ([`super::mlx_ops`], [`super::cpu`], [`super::fused`]) sit above this module and never import
//! each other; [`super`] chooses between them.

use crate::error::Result;
use crate::store::{Packed, TokenAxis};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{concatenate, select};
use mlx_rs::Array;

/// Masked logits; finite so that an all-masked block cannot produce NaN in the merge.
pub(crate) const MASKED: f32 = -1e30;

/// How a query-key product becomes the logit the softmax sees: times `scale`, then, where
/// `softcap` is set (Gemma 2's `attn_logit_softcapping`), `softcap * tanh(s / softcap)`, before
/// any mask. A path either applies both or is not chosen ([`super::choose`]). A bare `f32` is a
/// scale without a cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl Scoring {
    pub fn capped(scale: f32, softcap: f32) -> Self {
        Scoring { scale, softcap: Some(softcap) }
    }

    /// `scores` soft-capped in their own dtype (unchanged without a cap); for the MLX-ops paths,
    /// whose masks come after this.
    pub(crate) fn cap(&self, scores: Array) -> Result<Array> {
        let Some(cap) = self.softcap else { return Ok(scores) };
        let c = Array::from_f32(cap).as_dtype(scores.dtype())?;
        Ok(mlx_rs::ops::tanh(&(scores / &c))? * c)
    }
}

impl From<f32> for Scoring {
    fn from(scale: f32) -> Self {
        Scoring { scale, softcap: None }
    }
}

/// One of K or V for a run of tokens.
pub enum Tensor {
    /// `[B, Hkv, T, D]`.
    Float(Array),
    /// Packed; `Rows` is `[B, Hkv, T, D*b/32]`, `Cols` is `[B, Hkv, D, T*b/32]`. `full` is the
    /// whole buffer and its capacity, for the fused kernel.
    Quant { p: Packed, bits: u8, group: usize, axis: TokenAxis, full: Option<(Packed, usize)> },
}

/// A run of `len` cached tokens.
pub struct Segment {
    pub k: Tensor,
    pub v: Tensor,
    pub len: usize,
}

/// Which keys each query may see.
pub enum Mask {
    /// Every key (decode without a window).
    None,
    /// Query `i` of `L` sees keys `0..=T-L+i`.
    Causal,
    /// Boolean `[L, T]`, true where visible, in segment order.
    Visible(Array),
}

/// Tokens `[a, z)` of a packed operand in either layout.
pub(crate) fn slice_packed(p: &Packed, bits: u8, group: usize, axis: TokenAxis, a: usize, z: usize) -> Packed {
    let (ai, zi) = (a as i32, z as i32);
    match axis {
        TokenAxis::Rows => Packed {
            w: p.w.index((.., .., ai..zi, ..)),
            scales: p.scales.index((.., .., ai..zi, ..)),
            biases: p.biases.index((.., .., ai..zi, ..)),
        },
        TokenAxis::Cols => {
            let b = bits as usize;
            let (wa, wz) = ((a * b / 32) as i32, (z * b / 32) as i32);
            let (ga, gz) = ((a / group) as i32, (z / group) as i32);
            Packed {
                w: p.w.index((.., .., .., wa..wz)),
                scales: p.scales.index((.., .., .., ga..gz)),
                biases: p.biases.index((.., .., .., ga..gz)),
            }
        }
    }
}

impl Mask {
    /// Boolean `[L, T]` visibility for `l` queries over `t` keys, or `None` when all are visible.
    pub(crate) fn visible(&self, l: usize, t: usize) -> Result<Option<Array>> {
        Ok(match self {
            Mask::None => None,
            Mask::Causal => Some(causal_visible(l, t)?),
            Mask::Visible(m) => Some(m.clone()),
        })
    }
}

/// KV heads of a cache made of `segments`.
pub(crate) fn kv_heads(segments: &[Segment]) -> i32 {
    match &segments[0].k {
        Tensor::Float(k) => k.shape()[1],
        Tensor::Quant { p, .. } => p.w.shape()[1],
    }
}

/// Boolean `[L, T]` for `Mask::Causal`.
pub fn causal_visible(l: usize, t: usize) -> Result<Array> {
    let kpos = Array::arange::<_, i32>(None, t as i32, None)?;
    let qpos = Array::arange::<_, i32>((t - l) as i32, t as i32, None)?;
    Ok(kpos.expand_dims(0)?.le(qpos.expand_dims(1)?)?)
}

/// Applies an `[L, T]` visibility mask to scores `[B*Hkv, rep*L, T]`.
pub(crate) fn apply_mask(s: &Array, visible: &Array, rep: i32, l: i32) -> Result<Array> {
    let sh = s.shape();
    let s4 = s.reshape(&[sh[0], rep, l, sh[2]])?;
    let neg = Array::from_f32(MASKED).as_dtype(s.dtype())?;
    Ok(select(visible, &s4, &neg)?.reshape(&[sh[0], rep * l, sh[2]])?)
}

/// A packed K or V body as its whole allocated buffers (the decode kernels index `[BH, CAP, ...]`
/// rows themselves and read the first tokens, so no slice is copied).
#[derive(Clone, Copy)]
pub struct PackedOperand<'a> {
    pub full: &'a Packed,
    pub bits: u8,
    pub group: usize,
}

impl<'a> PackedOperand<'a> {
    /// As our CPU primitives take it.
    pub fn as_ref(&self) -> mlx_ext::cpu::PackedRef<'a> {
        mlx_ext::cpu::PackedRef { w: &self.full.w, scales: &self.full.scales, biases: &self.full.biases, bits: self.bits, group: self.group }
    }
}

/// The case both decode kernels (the fused GPU one and the CPU primitive) cover: one quantized
/// row-layout body, no mask, no learned sinks. Returns keys, values, tokens and capacity.
pub(crate) fn single_packed_body<'a>(
    segments: &'a [Segment],
    mask: &Mask,
    sinks: Option<&Array>,
) -> Option<(PackedOperand<'a>, PackedOperand<'a>, usize, usize)> {
    let Mask::None = mask else { return None };
    packed_body(segments, sinks)
}

/// [`single_packed_body`] for a causal prefill chunk (`Mask::Causal`): the chunk's own tokens
/// are the body's last ones.
pub(crate) fn causal_packed_body<'a>(
    segments: &'a [Segment],
    mask: &Mask,
    sinks: Option<&Array>,
) -> Option<(PackedOperand<'a>, PackedOperand<'a>, usize, usize)> {
    let Mask::Causal = mask else { return None };
    packed_body(segments, sinks)
}

fn packed_body<'a>(segments: &'a [Segment], sinks: Option<&Array>) -> Option<(PackedOperand<'a>, PackedOperand<'a>, usize, usize)> {
    let ([seg], None) = (segments, sinks) else { return None };
    let (
        Tensor::Quant { bits: kb, group: kg, axis: TokenAxis::Rows, full: Some((kf, cap)), .. },
        Tensor::Quant { bits: vb, group: vg, full: Some((vf, _)), .. },
    ) = (&seg.k, &seg.v)
    else {
        return None;
    };
    let k = PackedOperand { full: kf, bits: *kb, group: *kg };
    let v = PackedOperand { full: vf, bits: *vb, group: *vg };
    Some((k, v, seg.len, *cap))
}

/// What the CPU primitive reads of a per-channel cache: the float sink tokens (`--kv-sinks`), if
/// any, then one quantized body whose keys are stored per channel (whole token groups), then the
/// float tail of newer tokens that do not fill a group yet (and any residual), no mask, no
/// learned sinks.
pub(crate) struct ChannelBody<'a> {
    /// The sink tokens' K and V, `[B, Hkv, n, D]`: kept out of the body because the first
    /// token's outlier channels would set the range of its whole key group.
    pub sink: Option<(&'a Array, &'a Array)>,
    pub k: PackedOperand<'a>,
    pub v: PackedOperand<'a>,
    /// Body tokens (a whole number of key groups).
    pub len: usize,
    /// Token capacity of the key buffers.
    pub cap: usize,
    /// The tail's K and V, `[B, Hkv, n, D]`.
    pub tail: Option<(&'a Array, &'a Array)>,
}

/// K and V of a cache that is one dense segment (`[B, Hkv, T, D]` as stored), every query
/// seeing every token.
pub(crate) fn dense_body<'a>(segments: &'a [Segment], mask: &Mask, sinks: Option<&Array>) -> Option<(&'a Array, &'a Array)> {
    let Mask::None = mask else { return None };
    one_dense_segment(segments, sinks)
}

/// [`dense_body`] for a causal prefill chunk (`Mask::Causal`).
pub(crate) fn causal_dense_body<'a>(segments: &'a [Segment], mask: &Mask, sinks: Option<&Array>) -> Option<(&'a Array, &'a Array)> {
    let Mask::Causal = mask else { return None };
    one_dense_segment(segments, sinks)
}

fn one_dense_segment<'a>(segments: &'a [Segment], sinks: Option<&Array>) -> Option<(&'a Array, &'a Array)> {
    match (segments, sinks) {
        ([Segment { k: Tensor::Float(k), v: Tensor::Float(v), .. }], None) => Some((k, v)),
        _ => None,
    }
}

/// Two runs of float tokens (K and V `[B, Hkv, n, D]` each) as one, `a` first: where no mask
/// applies, token order does not matter, so sinks and a tail can be read as one run.
pub(crate) fn join_float_runs(a: Option<(&Array, &Array)>, b: Option<(&Array, &Array)>) -> Result<Option<(Array, Array)>> {
    Ok(match (a, b) {
        (Some((ak, av)), Some((bk, bv))) => Some((concatenate(&[ak, bk], 2)?, concatenate(&[av, bv], 2)?)),
        (one, other) => one.or(other).map(|(k, v)| (k.clone(), v.clone())),
    })
}

pub(crate) fn channel_packed_body<'a>(segments: &'a [Segment], mask: &Mask, sinks: Option<&Array>) -> Option<ChannelBody<'a>> {
    let (Mask::None, None) = (mask, sinks) else { return None };
    let (sink, segments) = match segments {
        [Segment { k: Tensor::Float(sk), v: Tensor::Float(sv), .. }, rest @ ..] if matches!(rest.first(), Some(Segment { k: Tensor::Quant { .. }, .. })) => {
            (Some((sk, sv)), rest)
        }
        _ => (None, segments),
    };
    let (seg, tail) = match segments {
        [seg] => (seg, None),
        [seg, Segment { k: Tensor::Float(tk), v: Tensor::Float(tv), .. }] => (seg, Some((tk, tv))),
        _ => return None,
    };
    let (
        Tensor::Quant { bits: kb, group: kg, axis: TokenAxis::Cols, full: Some((kf, cap)), .. },
        Tensor::Quant { bits: vb, group: vg, axis: TokenAxis::Rows, full: Some((vf, _)), .. },
    ) = (&seg.k, &seg.v)
    else {
        return None;
    };
    let k = PackedOperand { full: kf, bits: *kb, group: *kg };
    let v = PackedOperand { full: vf, bits: *vb, group: *vg };
    Some(ChannelBody { sink, k, v, len: seg.len, cap: *cap, tail })
}
