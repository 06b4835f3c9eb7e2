//! ggml block types -> MLX affine triplets: exact against the GGUF dequantization in f32 (in pure
//! Rust and through `mlx_rs::ops::dequantize`), within one f16 rounding per group in f16.

use std::path::PathBuf;

use half::f16;
use mlx_rs::{ops::dequantize as mlx_dequantize, Array};
use models::gguf::{affine_layouts, dequantize, to_mlx_affine, to_mlx_affine_as, AffineLayout, DequantError, GgmlType, GgufFile, MlxAffine};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn model_path() -> PathBuf {
    test_support::assets::default_model()
}

fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: element {i} differs: {} vs {}", a[i], b[i]);
    }
}

/// Equal as numbers: a weight of zero may come out as +0 where ggml gives -0 (`d*q + (-c*d)`
/// cancels to +0, while ggml's `0 * d` takes the sign of a negative `d`), the same weight.
fn assert_values_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i] || a[i].is_nan()) {
        panic!("{what}: element {i} differs: {} vs {}", a[i], b[i]);
    }
}

#[test]
fn hand_built_blocks_convert_exactly() {
    let qs: Vec<u8> = (0..16u8).map(|i| i | ((15 - i) << 4)).collect();
    let d = f16::from_f32(0.75).to_le_bytes();
    let q40 = [&d[..], &qs].concat();
    let t = to_mlx_affine(GgmlType::Q4_0, &q40, 1, 32).unwrap();
    assert_eq!((t.weight_shape(), t.scales_shape()), ([1, 4], [1, 1]));
    assert_eq!(t.weight[0], 0x7654_3210, "element j at bits 4j, LSB first");
    assert_eq!(t.weight[2], 0x89AB_CDEF, "high nibbles are elements 16..32");
    assert_eq!((t.scales[0], t.biases[0]), (0.75, -6.0));
    assert_bits_eq(&t.dequantize(), &dequantize(GgmlType::Q4_0, &q40, 32).unwrap(), "Q4_0");

    let q8: Vec<u8> = [&d[..], &(0..32).map(|i: i32| (i * 8 - 128) as i8 as u8).collect::<Vec<_>>()].concat();
    let t = to_mlx_affine(GgmlType::Q8_0, &q8, 1, 32).unwrap();
    assert_eq!(t.weight[0] & 0xFF, 0, "-128 maps to 0");
    assert_bits_eq(&t.dequantize(), &dequantize(GgmlType::Q8_0, &q8, 32).unwrap(), "Q8_0");
    assert_eq!(to_mlx_affine(GgmlType::Q2_K, &[0; 84], 1, 256), Err(DequantError::NotAffine(GgmlType::Q2_K)));
    // A scale whose bias (-128 d) overflows f16 must be refused, not rounded.
    let big = [&f16::from_f32(1024.0).to_le_bytes()[..], &[0u8; 32]].concat();
    assert!(to_mlx_affine(GgmlType::Q8_0, &big, 1, 32).is_err());
}

const TENSORS: [&str; 4] = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "blk.29.ffn_down.weight"];

#[test]
fn real_model_triplets_match_gguf_dequant_bit_for_bit() {
    let f = GgufFile::open(model_path()).unwrap();
    for name in TENSORS {
        let t = f.to_mlx_affine(name).unwrap();
        let info = f.tensor(name).unwrap();
        assert_eq!([t.rows, t.cols], [info.shape()[0], info.shape()[1]]);
        assert_eq!(t.bits, affine_layouts(info.ggml_type)[0].bits);
        assert_bits_eq(&t.dequantize(), &f.dequantize(name).unwrap(), name);
    }
}

fn mlx_dequant(t: &MlxAffine, f32_params: bool) -> Vec<f32> {
    let [r, c] = t.weight_shape();
    let [sr, sc] = t.scales_shape();
    let w = Array::from_slice(&t.weight, &[r as i32, c as i32]);
    let (s, b) = if f32_params {
        (Array::from_slice(&t.scales, &[sr as i32, sc as i32]), Array::from_slice(&t.biases, &[sr as i32, sc as i32]))
    } else {
        let s: Vec<f16> = t.scales.iter().map(|&x| f16::from_f32(x)).collect();
        let b: Vec<f16> = t.biases.iter().map(|&x| f16::from_f32(x)).collect();
        (Array::from_slice(&s, &[sr as i32, sc as i32]), Array::from_slice(&b, &[sr as i32, sc as i32]))
    };
    let out = mlx_dequantize(&w, &s, &b, t.group as i32, t.bits as i32).unwrap();
    let out = out.as_dtype(mlx_rs::Dtype::Float32).unwrap();
    out.as_slice::<f32>().to_vec()
}

/// `scale*q + bias` as MLX evaluates it for f16 parameters: in f16, rounding after each operation.
fn f16_arithmetic(t: &MlxAffine) -> Vec<f32> {
    let per_word = 32 / t.bits as usize;
    let mask = (1u32 << t.bits) - 1;
    let r = |x: f32| f16::from_f32(x).to_f32();
    let mut out = Vec::with_capacity(t.rows * t.cols);
    for (i, &word) in t.weight.iter().enumerate() {
        for k in 0..per_word {
            let g = (i * per_word + k) / 32;
            let q = ((word >> (k as u32 * t.bits)) & mask) as f32;
            out.push(r(r(r(t.scales[g]) * q) + r(t.biases[g])));
        }
    }
    out
}

/// With f32 scales and biases MLX evaluates `scale*q + bias` in f32, which is exact here, so it
/// must reproduce the GGUF weights bit for bit. With f16 parameters MLX computes in f16 (two
/// roundings), which models that use f16 triplets should know: the exact weights need f32 params.
#[test]
fn mlx_dequantize_reproduces_gguf_weights() {
    let f = GgufFile::open(model_path()).unwrap();
    for name in ["blk.0.attn_q.weight", "token_embd.weight"] {
        let t = f.to_mlx_affine(name).unwrap();
        let want = f.dequantize(name).unwrap();
        assert_bits_eq(&mlx_dequant(&t, true), &want, name);
        assert_bits_eq(&mlx_dequant(&t, false), &f16_arithmetic(&t), name);
    }
}

/// Every k-quant or 5-bit type the loader can now keep packed.
const NEW_TYPES: [GgmlType; 5] = [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q5_0, GgmlType::Q5_1];

/// `rows` rows of `blocks_per_row` random blocks of `ty`: random codes and packed sub-scales (every
/// bit pattern is a valid block), and random f16 super-scales `d`/`dmin` (or `d`/`m`) of either
/// sign over magnitudes 2^-14..2^-2, the range real checkpoints use, including f16 subnormals'
/// neighbourhood.
fn random_blocks(ty: GgmlType, rows: usize, blocks_per_row: usize, rng: &mut StdRng) -> Vec<u8> {
    let (_, size) = ty.block_geometry();
    let mut out = vec![0u8; rows * blocks_per_row * size];
    rng.fill(&mut out[..]);
    let f16_offsets: &[usize] = match ty {
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q5_1 => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[0],
    };
    for b in out.chunks_exact_mut(size) {
        for &o in f16_offsets {
            let v = rng.gen_range(0.5f32..1.0) * 2f32.powi(rng.gen_range(-14..=-2)) * if rng.gen() { 1.0 } else { -1.0 };
            b[o..o + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    out
}

/// Scales and biases are exact f32 products and `scale*q + bias` rounds at most once, exactly as
/// ggml's `d*q - m` does (see gguf/mlx.rs), so the triplet must give the reference dequantizer's
/// values exactly, by hand and through MLX's own dequantize.
#[test]
fn k_quant_and_5_bit_blocks_convert_exactly_in_f32() {
    let mut rng = StdRng::seed_from_u64(20);
    for ty in NEW_TYPES {
        let (block, _) = ty.block_geometry();
        let (rows, cols) = (3, 2 * block);
        let bytes = random_blocks(ty, rows, 2, &mut rng);
        let want = dequantize(ty, &bytes, rows * cols).unwrap();
        assert_eq!(to_mlx_affine(ty, &bytes, rows, cols).unwrap().bits, affine_layouts(ty)[0].bits, "{ty}: narrowest first");
        for &layout in affine_layouts(ty) {
            let what = format!("{ty} as {} bits, group {}", layout.bits, layout.group);
            let t = to_mlx_affine_as(ty, layout, &bytes, rows, cols).unwrap();
            assert_eq!((t.bits, t.group), (layout.bits, layout.group), "{what}");
            assert_eq!(t.weight_shape(), [rows, cols * t.bits as usize / 32], "{what}");
            assert_eq!(t.scales_shape(), [rows, cols / t.group], "{what}");
            assert_values_eq(&t.dequantize(), &want, &format!("{what}, by hand"));
            assert_values_eq(&mlx_dequant(&t, true), &want, &format!("{what}, through MLX"));
            // Widened codes keep their range: the top bits stay clear.
            let max_code = match ty {
                GgmlType::Q4_K => 15,
                GgmlType::Q6_K => 63,
                _ => 31,
            };
            let c = t.codes();
            assert!(c.iter().all(|&q| q <= max_code), "{what}: a code above {max_code}");
            assert!(c.contains(&max_code), "{what}: random codes never reach {max_code}");
        }
    }
}

/// Half of f16's unit roundoff: rounding a normal value to f16 moves it by at most this fraction.
const F16_HALF_ULP: f32 = 1.0 / 2048.0;
/// Half of f16's smallest subnormal step: the absolute rounding error below the normal range.
const F16_SUBNORMAL_HALF_STEP: f32 = 1.0 / (1u32 << 25) as f32;
/// Half of f32's unit roundoff, for each of the two operations of `scale*q + bias` in f32.
const F32_HALF_ULP: f32 = f32::EPSILON / 2.0;

/// In f16 (the GPU's compute dtype) each k-quant scale `s = d*sc` and bias `b` is rounded once,
/// to `s(1+e1)` and `b(1+e2)` with |e| <= 2^-11 (plus 2^-25 absolute for subnormals). The weight
/// `s*q + b` then moves by at most `2^-11 (|s| q + |b|) + 2^-25 (q + 1)`; evaluating it in f32 adds
/// at most two f32 roundings of terms no larger than `|s| q + |b|` (with their own f16 error).
/// Q5_0/Q5_1 parameters are f16 already: for them the bound holds with room to spare (they are
/// exact, checked in the f32 test and by the converter).
#[test]
fn f16_scales_stay_within_one_rounding_per_group() {
    let mut rng = StdRng::seed_from_u64(21);
    for ty in NEW_TYPES {
        let (block, _) = ty.block_geometry();
        let (rows, cols) = (4, 2 * block);
        let bytes = random_blocks(ty, rows, 2, &mut rng);
        let t = to_mlx_affine(ty, &bytes, rows, cols).unwrap();
        let r = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| f16::from_f32(x).to_f32()).collect() };
        let got = t.dequantize_with(&r(&t.scales), &r(&t.biases));
        let want = dequantize(ty, &bytes, rows * cols).unwrap();
        let mut rounded_any = false;
        for (i, q) in t.codes().into_iter().enumerate() {
            let g = i / t.group;
            let (s, b, q) = (t.scales[g].abs(), t.biases[g].abs(), q as f32);
            let magnitude = s * q + b;
            let bound = F16_HALF_ULP * magnitude
                + F16_SUBNORMAL_HALF_STEP * (q + 1.0)
                + 2.0 * F32_HALF_ULP * (1.0 + F16_HALF_ULP) * magnitude;
            let err = (got[i] - want[i]).abs();
            assert!(err <= bound, "{ty}: element {i}: {} vs {}, error {err} > bound {bound}", got[i], want[i]);
            rounded_any |= got[i] != want[i];
        }
        if matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1) {
            assert!(!rounded_any, "{ty}: f16 parameters must be exact");
        } else {
            assert!(rounded_any, "{ty}: random products never needed rounding, so the bound was not exercised");
        }
    }
}

#[test]
fn wrong_sizes_and_unrepresentable_scales_are_clear_errors() {
    for ty in NEW_TYPES {
        let (block, size) = ty.block_geometry();
        let err = to_mlx_affine(ty, &vec![0; 2 * size - 1], 1, 2 * block).unwrap_err();
        assert_eq!(err, DequantError::Length { ty, n_elements: 2 * block, expected: 2 * size, got: 2 * size - 1 });
        assert!(err.to_string().contains(&format!("need {} bytes, got {}", 2 * size, 2 * size - 1)), "{err}");
        // A row that ends inside a block.
        let err = to_mlx_affine(ty, &vec![0; size], 2, block / 2).unwrap_err();
        assert_eq!(err, DequantError::PartialBlock { ty, n_elements: block / 2, block });
    }
    let err = to_mlx_affine_as(GgmlType::Q4_K, AffineLayout { bits: 8, group: 32 }, &[0; 144], 1, 256).unwrap_err();
    assert_eq!(err, DequantError::Layout { ty: GgmlType::Q4_K, bits: 8, group: 32 });
    // Q4_K: d = 2048 and sub-scale 63 give a scale of 129024, beyond f16's 65504.
    let mut b = [0u8; 144];
    b[0..2].copy_from_slice(&f16::from_f32(2048.0).to_le_bytes());
    b[4] = 63;
    let err = to_mlx_affine(GgmlType::Q4_K, &b, 1, 256).unwrap_err();
    assert_eq!(err, DequantError::ParamRange { block: 0, scale: 129024.0, bias: -0.0 });
}

/// The Qwen2.5-Coder Q4_K_M checkpoint mixes Q4_K and Q6_K (ffn_down) with Q5_0: every one
/// converts exactly.
#[test]
fn real_k_quant_tensors_match_gguf_dequant_exactly() {
    let f = GgufFile::open(test_support::assets::qwen2()).unwrap();
    let mut seen = Vec::new();
    for info in f.tensors() {
        if seen.contains(&info.ggml_type) || info.shape().len() != 2 {
            continue;
        }
        seen.push(info.ggml_type);
        for &layout in affine_layouts(info.ggml_type) {
            let t = f.to_mlx_affine_as(&info.name, layout).unwrap();
            let what = format!("{} as {} bits", info.name, layout.bits);
            assert_values_eq(&t.dequantize(), &f.dequantize(&info.name).unwrap(), &what);
        }
    }
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q5_0] {
        assert!(seen.contains(&ty), "the Qwen checkpoint has no {ty} tensor");
    }
}

/// Half of f32's unit roundoff times the terms summed: the recursive-summation bound `K u` on
/// a dot product of `K` terms (the kernel's 8-lane partial sums only tighten it).
fn f32_dot_bound(k: usize, magnitude: f64) -> f64 {
    k as f64 * F32_HALF_ULP as f64 * magnitude
}

/// The CPU matvec the engine runs on these triplets (Q6_K's group of 16 and 6-bit Q5_x are new to
/// it) gives `x W^T` of the reference weights within f32 summation error. Its terms are
/// `scale * (q . x) + bias * sum(x)` per group, so the error scales with `sum |x| (|s| q + |b|)`,
/// not with `sum |x w|` (a zero weight may be `32 s - 32 s`).
#[test]
fn cpu_matvec_reads_the_new_layouts() {
    let mut rng = StdRng::seed_from_u64(22);
    for ty in NEW_TYPES {
        let (block, _) = ty.block_geometry();
        let (n, k, rows) = (9, 2 * block, 2);
        let bytes = random_blocks(ty, n, 2, &mut rng);
        let w = dequantize(ty, &bytes, n * k).unwrap();
        let xs: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let x = Array::from_slice(&xs, &[rows as i32, k as i32]);
        let mut tried = 0;
        for &layout in affine_layouts(ty) {
            if !mlx_ext::cpu::supports(layout.bits as u8, layout.group, k) {
                continue;
            }
            tried += 1;
            let t = to_mlx_affine_as(ty, layout, &bytes, n, k).unwrap();
            let [wr, wc] = t.weight_shape();
            let [sr, sc] = t.scales_shape();
            let packed = Array::from_slice(&t.weight, &[wr as i32, wc as i32]);
            let s = Array::from_slice(&t.scales, &[sr as i32, sc as i32]);
            let b = Array::from_slice(&t.biases, &[sr as i32, sc as i32]);
            let y = mlx_ext::cpu::quantized_matvec(&x, &packed, &s, &b, t.group as i32, t.bits as i32).unwrap();
            let y: Vec<f32> = y.as_slice::<f32>().to_vec();
            let codes = t.codes();
            for m in 0..rows {
                for r in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for e in 0..k {
                        let (i, g) = (r * k + e, (r * k + e) / t.group);
                        want += xs[m * k + e] as f64 * w[i] as f64;
                        mag += (xs[m * k + e].abs() * (t.scales[g].abs() * codes[i] as f32 + t.biases[g].abs())) as f64;
                    }
                    let got = y[m * n + r] as f64;
                    assert!(
                        (got - want).abs() <= f32_dot_bound(k, mag),
                        "{ty} as {} bits: row {m} out {r}: {got} vs {want}",
                        t.bits
                    );
                }
            }
        }
        assert!(tried > 0, "{ty}: the CPU matvec reads none of its layouts");
    }
}
