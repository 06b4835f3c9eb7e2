//! Conversion of ggml block formats to MLX affine quantization, so they stay packed in memory.
//!
//! MLX's affine format reconstructs `w = scale * q + bias` per group of `group` elements, with
//! unsigned `q` of `bits` bits packed LSB-first into u32 words (element `j` of a row starts at
//! bit `j*bits` of the row's little-endian bit stream). Each ggml type maps onto one or two
//! layouts ([`affine_layouts`]):
//! - Q4_0: `w = d*(q-8)`, 4 bits, group 32 -> scale `d`, bias `-8d`
//! - Q4_1: `w = d*q + m`, 4 bits, group 32 -> scale `d`, bias `m`
//! - Q5_0: `w = d*(q-16)`, 5 bits -> 6- or 8-bit codes, group 32, scale `d`, bias `-16d`
//! - Q5_1: `w = d*q + m`, 5 bits -> 6- or 8-bit codes, group 32, scale `d`, bias `m`
//! - Q8_0: `w = d*s` with signed `s` -> `q = s+128`, group 32, scale `d`, bias `-128d`
//! - Q4_K: `w = d*sc*q - dmin*m` per sub-block of 32 -> 4 bits, group 32, scale `d*sc`,
//!   bias `-(dmin*m)`
//! - Q5_K: Q4_K with a fifth bit -> 6- or 8-bit codes, group 32, same scale and bias
//! - Q6_K: `w = d*sc*(q-32)` per sub-block of 16 -> 8-bit codes, group 16, scale `d*sc`,
//!   bias `-32*d*sc`
//!
//! Five-bit codes are widened because our CPU matvec (`mlx_ext::cpu::supports`) reads 2, 3, 4, 6
//! and 8 bits, not 5. Six bits is the narrower choice, and decoded Qwen2.5-Coder-0.5B (mostly
//! Q5_0) 17% faster than 8 on the CPU (docs/cpu-speed.md, session 20); 8 bits is for backends
//! whose products read only 4 and 8. Q6_K's sub-blocks of 16 cannot merge into groups of 32 (two
//! different scales would need codes wider than 8 bits), and the matvec reads 6 bits only in
//! groups of 32 (whole 24-byte units), so its codes are 8 bits with group 16.
//!
//! Scales and biases are kept in f32, where every one of them is exact: `d`, `m` and `dmin` are
//! f16 (11 significant bits), the k-quant sub-scales have at most 8 bits, so the products carry at
//! most 19 bits; multiples by powers of two are exact. `scale*q + bias` then evaluates in f32
//! with the one rounding ggml's own `d*q - m` has (or none), so the f32 triplet reproduces
//! `quants::dequantize` exactly (a zero weight may come out as +0 where ggml has -0: `x + (-x)`
//! is +0, while ggml's `0 * d` takes `d`'s sign). The loader casts them to the compute dtype: in
//! f16 the scales and biases of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 stay exact (an f16 `d` times a power of
//! two, checked here), while a k-quant product rounds once per group (relative error at most
//! 2^-11, bounded in tests/gguf_mlx.rs).

use half::f16;

use super::error::DequantError;
use super::quants::scale_min_k4;
use super::types::GgmlType;

/// The MLX affine packing a ggml type converts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AffineLayout {
    /// Bits per packed code.
    pub bits: u32,
    /// Elements sharing one scale and bias.
    pub group: usize,
}

const B4_G32: AffineLayout = AffineLayout { bits: 4, group: 32 };
const B6_G32: AffineLayout = AffineLayout { bits: 6, group: 32 };
const B8_G32: AffineLayout = AffineLayout { bits: 8, group: 32 };
const B8_G16: AffineLayout = AffineLayout { bits: 8, group: 16 };

/// The layouts `ty` converts to, narrowest first; empty when it has no affine form.
pub fn affine_layouts(ty: GgmlType) -> &'static [AffineLayout] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q4_1 | Q4_K => &[B4_G32],
        Q5_0 | Q5_1 | Q5_K => &[B6_G32, B8_G32],
        Q8_0 => &[B8_G32],
        Q6_K => &[B8_G16],
        _ => &[],
    }
}

/// An MLX affine-quantized matrix: the inputs of `mlx::core::dequantize(w, scales, biases, group, bits)`.
#[derive(Debug, Clone, PartialEq)]
pub struct MlxAffine {
    /// Bits per element: 4, 6 or 8.
    pub bits: u32,
    /// Elements per scale/bias group: 32, or 16 for Q6_K.
    pub group: usize,
    /// Rows (the product of all row-major dims but the last).
    pub rows: usize,
    /// Columns (the contiguous, quantized axis).
    pub cols: usize,
    /// Packed weights, row-major `[rows, cols * bits / 32]`.
    pub weight: Vec<u32>,
    /// Per-group scales, row-major `[rows, cols / group]`, exact (see the module docs).
    pub scales: Vec<f32>,
    /// Per-group biases, row-major `[rows, cols / group]`, exact.
    pub biases: Vec<f32>,
}

impl MlxAffine {
    /// Shape of [`Self::weight`].
    pub fn weight_shape(&self) -> [usize; 2] {
        [self.rows, self.cols * self.bits as usize / 32]
    }

    /// Shape of [`Self::scales`] and [`Self::biases`].
    pub fn scales_shape(&self) -> [usize; 2] {
        [self.rows, self.cols / self.group]
    }

    /// Reconstructs the f32 weights (`scale * q + bias`) in pure Rust, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_with(&self.scales, &self.biases)
    }

    /// [`Self::dequantize`] with other per-group parameters (e.g. the f16-rounded ones).
    pub fn dequantize_with(&self, scales: &[f32], biases: &[f32]) -> Vec<f32> {
        let codes = self.codes();
        codes.iter().enumerate().map(|(i, &q)| scales[i / self.group] * q as f32 + biases[i / self.group]).collect()
    }

    /// The unsigned codes, row-major `[rows, cols]`.
    pub fn codes(&self) -> Vec<u32> {
        let mask = (1u64 << self.bits) - 1;
        let word = |i: usize| self.weight.get(i).map_or(0, |&w| w as u64);
        (0..self.rows * self.cols)
            .map(|j| {
                // A 6-bit code may straddle two words.
                let bit = j * self.bits as usize;
                let pair = word(bit / 32) | (word(bit / 32 + 1) << 32);
                ((pair >> (bit % 32)) & mask) as u32
            })
            .collect()
    }
}

/// Converts `rows x cols` values of a tensor of type `ty` (`bytes` in ggml block order) to an MLX
/// affine triplet in its narrowest layout ([`affine_layouts`]).
pub fn to_mlx_affine(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<MlxAffine, DequantError> {
    let narrowest = *affine_layouts(ty).first().ok_or(DequantError::NotAffine(ty))?;
    to_mlx_affine_as(ty, narrowest, bytes, rows, cols)
}

/// [`to_mlx_affine`] in a given layout, which must be one of `ty`'s [`affine_layouts`].
pub fn to_mlx_affine_as(
    ty: GgmlType,
    layout: AffineLayout,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<MlxAffine, DequantError> {
    let layouts = affine_layouts(ty);
    if layouts.is_empty() {
        return Err(DequantError::NotAffine(ty));
    }
    if !layouts.contains(&layout) {
        return Err(DequantError::Layout { ty, bits: layout.bits, group: layout.group });
    }
    let AffineLayout { bits, group } = layout;
    let (block, type_size) = ty.block_geometry();
    let n_elements = rows.saturating_mul(cols);
    // Blocks must not straddle rows: each row's groups come from its own blocks.
    if !cols.is_multiple_of(block) {
        return Err(DequantError::PartialBlock { ty, n_elements: cols, block });
    }
    let n_blocks = n_elements / block;
    let expected = n_blocks.saturating_mul(type_size);
    if bytes.len() != expected {
        return Err(DequantError::Length { ty, n_elements, expected, got: bytes.len() });
    }
    let groups_per_block = block / group;
    let mut weight = Vec::with_capacity(n_elements / 32 * bits as usize);
    let mut scales = Vec::with_capacity(n_blocks * groups_per_block);
    let mut biases = Vec::with_capacity(n_blocks * groups_per_block);
    let mut codes = vec![0u8; block];
    let mut params = vec![(0f32, 0f32); groups_per_block];
    for (bi, b) in bytes.chunks_exact(type_size).enumerate() {
        unpack_block(ty, b, &mut codes, &mut params).map_err(|e| e.at_block(bi))?;
        for &(s, z) in &params {
            scales.push(s);
            biases.push(z);
        }
        pack(&codes, bits, &mut weight);
    }
    Ok(MlxAffine { bits, group, rows, cols, weight, scales, biases })
}

/// A scale or bias that the f16 compute dtype could not hold as promised.
enum ParamError {
    /// `d * k` is not exact in f16 (types that promise exact f16 parameters).
    Inexact { scale: f32, bias: f32 },
    /// A finite product beyond f16's range.
    Range { scale: f32, bias: f32 },
}

impl ParamError {
    fn at_block(self, block: usize) -> DequantError {
        match self {
            ParamError::Inexact { scale, bias } => DequantError::BiasOverflow { block, scale, bias },
            ParamError::Range { scale, bias } => DequantError::ParamRange { block, scale, bias },
        }
    }
}

/// Writes one ggml block's codes (unsigned, in element order) and its groups' `(scale, bias)`.
fn unpack_block(ty: GgmlType, b: &[u8], codes: &mut [u8], params: &mut [(f32, f32)]) -> Result<(), ParamError> {
    let f16_at = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ty {
        GgmlType::Q4_0 => {
            let d = f16_at(0);
            params[0] = (d, exact_multiple(d, -8.0)?);
            split_nibbles(&b[2..18], codes);
        }
        GgmlType::Q4_1 => {
            params[0] = (f16_at(0), f16_at(2));
            split_nibbles(&b[4..20], codes);
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let d = f16_at(0);
            let (bias, qh, qs) = match ty {
                GgmlType::Q5_0 => (exact_multiple(d, -16.0)?, &b[2..6], &b[6..22]),
                _ => (f16_at(2), &b[4..8], &b[8..24]),
            };
            params[0] = (d, bias);
            split_nibbles(qs, codes);
            // Bit j of qh is element j's fifth bit.
            let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            for (j, c) in codes.iter_mut().enumerate() {
                *c |= (((qh >> j) & 1) << 4) as u8;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(0);
            params[0] = (d, exact_multiple(d, -128.0)?);
            // Flipping the sign bit maps i8 s to the u8 s + 128.
            for (c, &s) in codes.iter_mut().zip(&b[2..34]) {
                *c = s ^ 0x80;
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (d, dmin, sc) = (f16_at(0), f16_at(2), &b[4..16]);
            for (j, p) in params.iter_mut().enumerate() {
                let (s, m) = scale_min_k4(j, sc);
                *p = in_f16_range(d * s as f32, -(dmin * m as f32))?;
            }
            // Each 32 bytes of nibbles hold 64 elements: the low nibbles are the first 32, the
            // high nibbles the next 32. Q5_K's qh byte l holds the fifth bit of element l of
            // every 32-element sub-block j, at bit j.
            let (qh, qs) = if ty == GgmlType::Q5_K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for (c, (q, out)) in qs.chunks_exact(32).zip(codes.chunks_exact_mut(64)).enumerate() {
                let (lo, hi) = out.split_at_mut(32);
                for l in 0..32 {
                    lo[l] = q[l] & 0x0F;
                    hi[l] = q[l] >> 4;
                    if let Some(qh) = qh {
                        lo[l] |= ((qh[l] >> (2 * c)) & 1) << 4;
                        hi[l] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            let d = f16_at(208);
            for (p, &s) in params.iter_mut().zip(&b[192..208]) {
                let scale = d * (s as i8) as f32;
                *p = in_f16_range(scale, -32.0 * scale)?;
            }
            // Two halves of 128 elements; in each, ql byte l gives the low nibbles of elements l
            // and l+64 and byte l+32 those of l+32 and l+96, and qh byte l the top two bits of
            // l, l+32, l+64 and l+96 (two bits each, in that order from bit 0).
            for (n, out) in codes.chunks_exact_mut(128).enumerate() {
                let (ql, qh) = (&b[64 * n..64 * n + 64], &b[128 + 32 * n..160 + 32 * n]);
                for l in 0..32 {
                    out[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                    out[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                    out[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    out[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
        _ => unreachable!("affine_layouts lists only the types handled here"),
    }
    Ok(())
}

/// Q4_0/Q4_1/Q5_x nibbles: elements 0..16 in the low nibbles, 16..32 in the high nibbles.
fn split_nibbles(qs: &[u8], codes: &mut [u8]) {
    let (lo, hi) = codes.split_at_mut(qs.len());
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(qs) {
        *l = q & 0x0F;
        *h = q >> 4;
    }
}

/// Appends `codes` (each below `1 << bits`) to `out` as MLX's LSB-first bit stream. A ggml block
/// (32 or 256 elements) fills whole words at 4, 6 and 8 bits, so blocks pack independently.
fn pack(codes: &[u8], bits: u32, out: &mut Vec<u32>) {
    let (mut acc, mut filled) = (0u64, 0u32);
    for &c in codes {
        acc |= (c as u64) << filled;
        filled += bits;
        if filled >= 32 {
            out.push(acc as u32);
            acc >>= 32;
            filled -= 32;
        }
    }
    debug_assert_eq!(filled, 0, "a block fills whole words");
}

/// `d * k` (k a power of two) as promised exact in f16, refusing results that f16 cannot hold.
fn exact_multiple(d: f32, k: f32) -> Result<f32, ParamError> {
    let want = d * k;
    let got = f16::from_f32(want).to_f32();
    if got != want && !(want.is_nan() && got.is_nan()) {
        return Err(ParamError::Inexact { scale: d, bias: want });
    }
    Ok(want)
}

/// A k-quant group's scale and bias, refused when finite but beyond f16's range: the f16 compute
/// dtype would turn them into infinities, where the dequantized weights are finite.
fn in_f16_range(scale: f32, bias: f32) -> Result<(f32, f32), ParamError> {
    let overflows = |x: f32| x.is_finite() && f16::from_f32(x).is_infinite();
    if overflows(scale) || overflows(bias) {
        return Err(ParamError::Range { scale, bias });
    }
    Ok((scale, bias))
}
