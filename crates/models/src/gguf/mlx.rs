//! Lossless conversion of ggml Q4_0/Q4_1/Q8_0 tensors to MLX affine quantization.
//!
//! MLX's affine format reconstructs `w = scale * q + bias` per group of `group_size` elements,
//! with unsigned `q` of `bits` bits packed LSB-first into u32 words (element `j` of a row sits in
//! word `j*bits/32` at bit `(j*bits)%32`). All three ggml formats use groups of 32 and fit:
//! - Q4_0: `w = d*(q-8)`  -> scale `d`, bias `-8d`
//! - Q4_1: `w = d*q + m`  -> scale `d`, bias `m`
//! - Q8_0: `w = d*s` with signed `s` -> `q = s+128`, scale `d`, bias `-128d`
//!
//! `d` and `m` are f16 and multiplying by a power of two is exact, so scales and biases are exact
//! in f16 (an overflowing bias is reported, not rounded), and `scale*q + bias` evaluates exactly
//! in f32: the conversion changes no weight.

use half::f16;

use super::error::DequantError;
use super::types::GgmlType;

/// Group size of the converted tensors (the ggml block size of Q4_0/Q4_1/Q8_0).
pub const MLX_GROUP_SIZE: usize = 32;

/// An MLX affine-quantized matrix: the inputs of `mlx::core::dequantize(w, scales, biases, 32, bits)`.
#[derive(Debug, Clone, PartialEq)]
pub struct MlxAffine {
    /// Bits per element: 4 or 8.
    pub bits: u32,
    /// Rows (the product of all row-major dims but the last).
    pub rows: usize,
    /// Columns (the contiguous, quantized axis).
    pub cols: usize,
    /// Packed weights, row-major `[rows, cols * bits / 32]`.
    pub weight: Vec<u32>,
    /// Per-group scales, row-major `[rows, cols / 32]`.
    pub scales: Vec<f16>,
    /// Per-group biases, row-major `[rows, cols / 32]`.
    pub biases: Vec<f16>,
}

impl MlxAffine {
    /// Shape of [`Self::weight`].
    pub fn weight_shape(&self) -> [usize; 2] {
        [self.rows, self.cols * self.bits as usize / 32]
    }

    /// Shape of [`Self::scales`] and [`Self::biases`].
    pub fn scales_shape(&self) -> [usize; 2] {
        [self.rows, self.cols / MLX_GROUP_SIZE]
    }

    /// Reconstructs the f32 weights (`scale * q + bias`) in pure Rust, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let per_word = 32 / self.bits as usize;
        let mask = (1u32 << self.bits) - 1;
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (i, &word) in self.weight.iter().enumerate() {
            for k in 0..per_word {
                let g = (i * per_word + k) / MLX_GROUP_SIZE;
                let q = (word >> (k as u32 * self.bits)) & mask;
                out.push(self.scales[g].to_f32() * q as f32 + self.biases[g].to_f32());
            }
        }
        out
    }
}

/// Converts `rows x cols` values of a Q4_0, Q4_1 or Q8_0 tensor (`bytes` in ggml block order)
/// to an MLX affine triplet with group size 32.
pub fn to_mlx_affine(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<MlxAffine, DequantError> {
    let bits = match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => 4,
        GgmlType::Q8_0 => 8,
        _ => return Err(DequantError::NotAffine(ty)),
    };
    let n_elements = rows.saturating_mul(cols);
    if !cols.is_multiple_of(MLX_GROUP_SIZE) {
        return Err(DequantError::PartialBlock { ty, n_elements: cols, block: MLX_GROUP_SIZE });
    }
    let type_size = ty.type_size();
    let n_blocks = n_elements / MLX_GROUP_SIZE;
    let expected = n_blocks.saturating_mul(type_size);
    if bytes.len() != expected {
        return Err(DequantError::Length { ty, n_elements, expected, got: bytes.len() });
    }
    let words_per_block = MLX_GROUP_SIZE * bits as usize / 32;
    let mut weight = Vec::with_capacity(n_blocks * words_per_block);
    let mut scales = Vec::with_capacity(n_blocks);
    let mut biases = Vec::with_capacity(n_blocks);
    for (bi, b) in bytes.chunks_exact(type_size).enumerate() {
        let d = f16::from_le_bytes([b[0], b[1]]);
        let (bias, qs) = match ty {
            GgmlType::Q4_0 => (exact_multiple(d, -8.0, bi)?, &b[2..18]),
            GgmlType::Q4_1 => (f16::from_le_bytes([b[2], b[3]]), &b[4..20]),
            _ => (exact_multiple(d, -128.0, bi)?, &b[2..34]),
        };
        scales.push(d);
        biases.push(bias);
        if bits == 4 {
            // ggml keeps elements 0..16 in the low nibbles and 16..32 in the high nibbles.
            let lo = |r: &[u8]| r.iter().rev().fold(0u32, |w, &q| (w << 4) | (q & 0x0F) as u32);
            let hi = |r: &[u8]| r.iter().rev().fold(0u32, |w, &q| (w << 4) | (q >> 4) as u32);
            weight.extend([lo(&qs[0..8]), lo(&qs[8..16]), hi(&qs[0..8]), hi(&qs[8..16])]);
        } else {
            // Flipping the sign bit maps i8 s to the u8 s + 128.
            weight.extend(
                qs.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ 0x8080_8080),
            );
        }
    }
    Ok(MlxAffine { bits, rows, cols, weight, scales, biases })
}

/// `d * k` as f16, refusing results that f16 cannot hold exactly.
fn exact_multiple(d: f16, k: f32, block: usize) -> Result<f16, DequantError> {
    let want = d.to_f32() * k;
    let got = f16::from_f32(want);
    if got.to_f32() != want && !(want.is_nan() && got.is_nan()) {
        return Err(DequantError::BiasOverflow { block, scale: d.to_f32(), bias: want });
    }
    Ok(got)
}
