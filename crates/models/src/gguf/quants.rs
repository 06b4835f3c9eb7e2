//! Dequantization of ggml block formats to f32, following ggml-quants.c `dequantize_row_*`.
//!
//! Each block format is a fixed-size record; the arithmetic below is written in the same order
//! as ggml's (e.g. `d * q - m`, not a fused form) so results match llama.cpp bit for bit.

use half::{bf16, f16};

use super::error::DequantError;
use super::types::{GgmlType, QK_K};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n_elements` values of type `ty` from `bytes` (which must be exactly their size).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, DequantError> {
    use GgmlType::*;
    let (block, type_size) = ty.block_geometry();
    if !n_elements.is_multiple_of(block) {
        return Err(DequantError::PartialBlock { ty, n_elements, block });
    }
    let expected = n_elements / block * type_size;
    if bytes.len() != expected {
        return Err(DequantError::Length { ty, n_elements, expected, got: bytes.len() });
    }
    let mut out = vec![0f32; n_elements];
    let blocks = bytes.chunks_exact(type_size).zip(out.chunks_exact_mut(block));
    match ty {
        F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        BF16 => blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        Q4_0 => blocks.for_each(|(b, y)| block_q4_0(b, y)),
        Q4_1 => blocks.for_each(|(b, y)| block_q4_1(b, y)),
        Q5_0 => blocks.for_each(|(b, y)| block_q5_0(b, y)),
        Q5_1 => blocks.for_each(|(b, y)| block_q5_1(b, y)),
        Q8_0 => blocks.for_each(|(b, y)| block_q8_0(b, y)),
        Q2_K => blocks.for_each(|(b, y)| block_q2_k(b, y)),
        Q3_K => blocks.for_each(|(b, y)| block_q3_k(b, y)),
        Q4_K => blocks.for_each(|(b, y)| block_q4_k(b, y)),
        Q5_K => blocks.for_each(|(b, y)| block_q5_k(b, y)),
        Q6_K => blocks.for_each(|(b, y)| block_q6_k(b, y)),
        Q8_K => blocks.for_each(|(b, y)| block_q8_k(b, y)),
        _ => return Err(DequantError::Unsupported(ty)),
    }
    Ok(out)
}

/// Q4_0: f16 d, 16 bytes of nibbles. Low nibbles are elements 0..16, high nibbles 16..32.
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; w = d*q + m.
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Q5_0: f16 d, u32 of fifth bits (bit j for element j), 16 bytes of nibbles; w = d*(q-16).
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((q & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 d, f16 m, u32 of fifth bits, 16 bytes of nibbles; w = d*q + m.
fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((q & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) | h1) as f32 * d + m;
    }
}

/// Q8_0: f16 d, 32 signed bytes; w = d*q.
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = (q as i8) as f32 * d;
    }
}

/// The 6-bit (scale, min) pair `j` of the 12 packed scale bytes of Q4_K/Q5_K.
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q2_K: 16 bytes of 4-bit (scale | min<<4), 64 bytes of 2-bit quants, f16 d, f16 dmin.
fn block_q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, min) = (f16_at(b, 80), f16_at(b, 82));
    let mut is = 0;
    let mut yi = 0;
    for q in qs.chunks_exact(32) {
        for shift in (0..8).step_by(2) {
            for half in [&q[0..16], &q[16..32]] {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0x0F) as f32, min * (sc >> 4) as f32);
                for &v in half {
                    y[yi] = dl * ((v >> shift) & 3) as f32 - ml;
                    yi += 1;
                }
            }
        }
    }
}

/// Q3_K: 32 bytes high-bit mask, 64 bytes of 2-bit quants, 12 bytes of packed 6-bit scales, f16 d.
fn block_q3_k(b: &[u8], y: &mut [f32]) {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let (hm, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d_all = f16_at(b, 108);
    let w = |i: usize| u32::from_le_bytes([sc[4 * i], sc[4 * i + 1], sc[4 * i + 2], sc[4 * i + 3]]);
    let (a0, a1, tmp) = (w(0), w(1), w(2));
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let scales: Vec<i8> = aux.iter().flat_map(|a| a.to_le_bytes()).map(|x| x as i8).collect();
    let mut is = 0;
    let mut yi = 0;
    let mut m = 1u32;
    for q in qs.chunks_exact(32) {
        for shift in (0..8).step_by(2) {
            for off in [0, 16] {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in off..off + 16 {
                    let high = if hm[l] as u32 & m != 0 { 0 } else { 4 };
                    y[yi] = dl * (((q[l] >> shift) & 3) as i32 - high) as f32;
                    yi += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles in 64-value chunks.
fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (c, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let y = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: like Q4_K plus 32 bytes of fifth bits (two bits per 64-value chunk per byte).
fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (c, ql) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let y = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Q6_K: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 signed 8-bit scales, f16 d.
fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}

/// Q8_K: f32 d, 256 signed bytes, 16 i16 block sums (unused here); w = d*q.
fn block_q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (j, &q) in b[4..4 + QK_K].iter().enumerate() {
        y[j] = d * (q as i8) as f32;
    }
}
