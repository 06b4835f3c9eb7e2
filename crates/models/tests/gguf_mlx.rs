//! Q4_0/Q4_1/Q8_0 -> MLX affine triplets: lossless against the GGUF dequantization, in pure Rust
//! and through `mlx_rs::ops::dequantize`.

use std::path::PathBuf;

use half::f16;
use mlx_rs::{ops::dequantize as mlx_dequantize, Array};
use models::gguf::{dequantize, to_mlx_affine, GgmlType, GgufFile, MlxAffine};

fn model_path() -> PathBuf {
    test_support::assets::default_model()
}

fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
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
    assert_eq!((t.scales[0].to_f32(), t.biases[0].to_f32()), (0.75, -6.0));
    assert_bits_eq(&t.dequantize(), &dequantize(GgmlType::Q4_0, &q40, 32).unwrap(), "Q4_0");

    let q8: Vec<u8> = [&d[..], &(0..32).map(|i: i32| (i * 8 - 128) as i8 as u8).collect::<Vec<_>>()].concat();
    let t = to_mlx_affine(GgmlType::Q8_0, &q8, 1, 32).unwrap();
    assert_eq!(t.weight[0] & 0xFF, 0, "-128 maps to 0");
    assert_bits_eq(&t.dequantize(), &dequantize(GgmlType::Q8_0, &q8, 32).unwrap(), "Q8_0");
    assert!(to_mlx_affine(GgmlType::Q4_K, &[0; 144], 1, 256).is_err());
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
        assert_eq!(t.bits, if info.ggml_type == GgmlType::Q8_0 { 8 } else { 4 });
        assert_bits_eq(&t.dequantize(), &f.dequantize(name).unwrap(), name);
    }
}

fn mlx_dequant(t: &MlxAffine, f32_params: bool) -> Vec<f32> {
    let [r, c] = t.weight_shape();
    let [sr, sc] = t.scales_shape();
    let w = Array::from_slice(&t.weight, &[r as i32, c as i32]);
    let (s, b) = if f32_params {
        let s: Vec<f32> = t.scales.iter().map(|x| x.to_f32()).collect();
        let b: Vec<f32> = t.biases.iter().map(|x| x.to_f32()).collect();
        (Array::from_slice(&s, &[sr as i32, sc as i32]), Array::from_slice(&b, &[sr as i32, sc as i32]))
    } else {
        (Array::from_slice(&t.scales, &[sr as i32, sc as i32]), Array::from_slice(&t.biases, &[sr as i32, sc as i32]))
    };
    let out = mlx_dequantize(&w, &s, &b, 32, t.bits as i32).unwrap();
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
            out.push(r(r(t.scales[g].to_f32() * q) + t.biases[g].to_f32()));
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
