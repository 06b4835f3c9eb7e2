//! Dequantization: hand-built blocks of every supported type, checked element by element against
//! the ggml block layouts written out as per-element formulas, plus the real model's tensors.

use std::path::PathBuf;

use half::{bf16, f16};
use models::gguf::{dequantize, DequantError, GgmlType, GgufFile, QK_K};

fn model_path() -> PathBuf {
    test_support::assets::default_model()
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u8
        })
        .collect()
}

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn check(ty: GgmlType, block: &[u8], want: impl Fn(usize) -> f32) {
    let n = ty.block_size();
    let got = dequantize(ty, block, n).unwrap();
    for (e, g) in got.iter().enumerate() {
        assert_eq!(*g, want(e), "{ty} element {e}");
    }
}

#[test]
fn float_types() {
    check(GgmlType::F32, &(-1.25f32).to_le_bytes(), |_| -1.25);
    check(GgmlType::F16, &h(0.333), |_| f16::from_f32(0.333).to_f32());
    check(GgmlType::BF16, &bf16::from_f32(3.5).to_le_bytes(), |_| 3.5);
}

#[test]
fn legacy_32_blocks() {
    let qs = bytes(16, 1);
    let nib = |e: usize| if e < 16 { qs[e] & 15 } else { qs[e - 16] >> 4 } as f32;
    check(GgmlType::Q4_0, &[&h(0.5)[..], &qs].concat(), |e| (nib(e) - 8.0) * 0.5);
    check(GgmlType::Q4_1, &[&h(0.25)[..], &h(-1.0), &qs].concat(), |e| nib(e) * 0.25 - 1.0);
    let qh = 0xA5C3_0F71u32;
    let fifth = |e: usize| ((qh >> e) & 1) as f32 * 16.0;
    check(GgmlType::Q5_0, &[&h(2.0)[..], &qh.to_le_bytes(), &qs].concat(), |e| (nib(e) + fifth(e) - 16.0) * 2.0);
    check(GgmlType::Q5_1, &[&h(0.5)[..], &h(3.0), &qh.to_le_bytes(), &qs].concat(), |e| {
        (nib(e) + fifth(e)) * 0.5 + 3.0
    });
    let q8 = bytes(32, 2);
    check(GgmlType::Q8_0, &[&h(0.125)[..], &q8].concat(), |e| (q8[e] as i8) as f32 * 0.125);
    let q8k = bytes(QK_K + 32, 3);
    check(GgmlType::Q8_K, &[&0.01f32.to_le_bytes()[..], &q8k].concat(), |e| 0.01 * (q8k[e] as i8) as f32);
}

#[test]
fn k_quants() {
    let (d, dmin) = (f16::from_f32(0.5).to_f32(), f16::from_f32(0.25).to_f32());
    // Q2_K: element e -> 128-chunk n, 2-bit plane j, half, lane l; scale nibble pair per 16.
    let (scales, qs) = (bytes(16, 4), bytes(64, 5));
    let blk = [&scales[..], &qs, &h(d), &h(dmin)].concat();
    check(GgmlType::Q2_K, &blk, |e| {
        let (n, j, half, l) = (e / 128, (e % 128) / 32, (e % 32) / 16, e % 16);
        let sc = scales[8 * n + 2 * j + half];
        let q = (qs[32 * n + 16 * half + l] >> (2 * j)) & 3;
        d * (sc & 15) as f32 * q as f32 - dmin * (sc >> 4) as f32
    });

    // Q3_K with every 6-bit scale equal to v, so the packed scale bytes are uniform.
    let v = 45u8;
    let (lo, hi) = (v & 15, v >> 4);
    let packed: Vec<u8> = [[lo | (lo << 4); 8].as_slice(), &[hi | (hi << 2) | (hi << 4) | (hi << 6); 4]].concat();
    let (hm, qs) = (bytes(32, 6), bytes(64, 7));
    let blk = [&hm[..], &qs, &packed, &h(d)].concat();
    check(GgmlType::Q3_K, &blk, |e| {
        let (n, j, half, l) = (e / 128, (e % 128) / 32, (e % 32) / 16, e % 16);
        let q = ((qs[32 * n + 16 * half + l] >> (2 * j)) & 3) as i32;
        let high = (hm[16 * half + l] >> (4 * n + j)) & 1;
        d * (v as i32 - 32) as f32 * (q - if high == 1 { 0 } else { 4 }) as f32
    });

    // Q4_K/Q5_K with every sub-block scale s and min m (both < 16, so the packing is uniform).
    let (s, m) = (11u8, 6u8);
    let sm: Vec<u8> = [[s; 4].as_slice(), &[m; 4], &[s | (m << 4); 4]].concat();
    let qs = bytes(128, 8);
    let nib = |e: usize| {
        let (c, l) = (e / 64, e % 64);
        if l < 32 { qs[32 * c + l] & 15 } else { qs[32 * c + l - 32] >> 4 }
    };
    check(GgmlType::Q4_K, &[&h(d)[..], &h(dmin), &sm, &qs].concat(), |e| {
        d * s as f32 * nib(e) as f32 - dmin * m as f32
    });
    let qh = bytes(32, 9);
    check(GgmlType::Q5_K, &[&h(d)[..], &h(dmin), &sm, &qh, &qs].concat(), |e| {
        let bit = (qh[e % 32] >> (2 * (e / 64) + (e % 64) / 32)) & 1;
        d * s as f32 * (nib(e) + 16 * bit) as f32 - dmin * m as f32
    });

    // Q6_K with distinct signed scales, to check the scale indexing too.
    let (ql, qh) = (bytes(128, 10), bytes(64, 11));
    let sc: Vec<u8> = (0..16).map(|i| (i as i8 - 5) as u8).collect();
    check(GgmlType::Q6_K, &[&ql[..], &qh, &sc, &h(d)].concat(), |e| {
        let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
        let b = ql[64 * n + l + 32 * (k & 1)];
        let low = if k < 2 { b & 15 } else { b >> 4 };
        let q = (low | (((qh[32 * n + l] >> (2 * k)) & 3) << 4)) as i32 - 32;
        d * (sc[8 * n + l / 16 + 2 * k] as i8) as f32 * q as f32
    });
}

#[test]
fn rejects_bad_lengths_and_unsupported_types() {
    assert!(matches!(dequantize(GgmlType::Q4_0, &[0; 17], 32), Err(DequantError::Length { .. })));
    assert!(matches!(dequantize(GgmlType::Q4_0, &[0; 18], 31), Err(DequantError::PartialBlock { .. })));
    assert!(matches!(dequantize(GgmlType::IQ2_XXS, &[0; 66], 256), Err(DequantError::Unsupported(_))));
}

/// The model's Q8_0 embedding and Q4_1 matrices decode to finite weights of the usual magnitude
/// for a small transformer (|w| well below 10, not all zero).
#[test]
fn real_model_tensors_dequantize_sanely() {
    let f = GgufFile::open(model_path()).unwrap();
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"] {
        let info = f.tensor(name).unwrap();
        let w = f.dequantize(name).unwrap();
        assert_eq!(w.len() as u64, info.n_elements());
        assert!(w.iter().all(|x| x.is_finite()), "{name}");
        let max = w.iter().fold(0f32, |a, x| a.max(x.abs()));
        let mean = w.iter().map(|x| x.abs() as f64).sum::<f64>() / w.len() as f64;
        assert!(max < 20.0 && mean > 1e-3, "{name}: max |w| {max}, mean |w| {mean}");
    }
}
