//! Attention logit soft-capping (Gemma 2: each scaled score `s` becomes `cap * tanh(s / cap)`
//! before the mask and softmax) on every path this machine runs, against float64 references.
//!
//! Queries are scaled up so that scores reach several times the cap: there tanh is far from
//! linear, and every test also checks that the uncapped reference lies well outside its bound,
//! so a path that ignored the cap would fail.

mod common;

use common::*;
use mlx_ext::cpu::KeyAxis;
use mlx_kv::attention::{cpu, mlx_ops, Mask, PackedOperand, Scoring, Segment, Tensor};
use mlx_kv::store::{Packed, TokenAxis};
use mlx_kv::{Backend, CacheOptions, KvCache, KvPool, KvSpec};
use std::sync::{Arc, Mutex};
use mlx_rs::ops::{dequantize, quantize};
use mlx_rs::{Array, Dtype};

const D: usize = 64;
const SCALE: f64 = 0.125;
/// Scores of these queries reach about +-4: a cap of 1 squashes most of them.
const Q_GAIN: f32 = 8.0;
const CAP: f64 = 1.0;

fn cpu_kernels() -> bool {
    Backend::current() == Backend::Cpu && mlx_ext::options::current().cpu_kernels.on()
}

fn queries(shape: [usize; 4], seed: u64) -> Host {
    scaled_queries(shape, seed, Q_GAIN)
}

fn scaled_queries(shape: [usize; 4], seed: u64, gain: f32) -> Host {
    let h = Host::random(shape, seed);
    Host { data: h.data.iter().map(|x| x * gain).collect(), shape }
}

/// `h` packed per token (f16 scales, as the cache stores them) and its dequantized values.
fn packed(h: &Host, group: usize, bits: u8) -> (Packed, Host) {
    let (w, s, b) = quantize(h.array(), group as i32, bits as i32).unwrap();
    let (s, b) = (s.as_dtype(Dtype::Float16).unwrap(), b.as_dtype(Dtype::Float16).unwrap());
    let f32 = |a: &Array| a.as_dtype(Dtype::Float32).unwrap();
    let deq = dequantize(&w, f32(&s), &f32(&b), group as i32, bits as i32).unwrap();
    (Packed { w, scales: s, biases: b }, Host { data: to_vec(&deq), shape: h.shape })
}

/// `got` within `bound` of the capped reference, and the uncapped one more than ten bounds away.
fn check(what: &str, got: &Array, q: &Host, k: &Host, v: &Host, bound: f64, visible: &dyn Fn(usize, usize) -> bool) {
    let got = to_vec(got);
    let err = max_abs_diff(&got, &reference_attention_capped(q, k, v, SCALE, Some(CAP), visible));
    assert!(err <= bound, "{what}: max error {err:.3e} from the capped reference > {bound:.3e}");
    let plain = max_abs_diff(&got, &reference_attention(q, k, v, SCALE, visible));
    assert!(plain > 10.0 * bound, "{what}: the cap does not bite ({plain:.3e} from the uncapped reference)");
}

/// Float32 sums, the polynomial exp and f32 tanh over the same dequantized values: a few ulps
/// of the values' magnitude, as in tests/cpu_kernels.rs.
fn f32_bound(v: &Host) -> f64 {
    2e-5 * v.max_abs().max(1.0)
}

/// Both builds of the kernels: AVX2 caps eight scores at once (tanh from the polynomial exp),
/// the baseline one score at a time with `std::tanh`. (Other tests of this binary may run under
/// either build meanwhile; their bounds hold for both.)
#[test]
fn the_cpu_primitives_cap_every_score() {
    use mlx_ext::{CpuBuild, EngineOptions};
    for build in [CpuBuild::Generic, CpuBuild::Auto] {
        mlx_ext::options::install(EngineOptions { cpu_build: build, ..EngineOptions::default() }).unwrap();
        eprintln!("{build:?}");
        cpu_primitives_cap_every_score();
    }
}

fn cpu_primitives_cap_every_score() {
    let (hq, hkv, len) = (8, 2, 300);
    let q = queries([1, hq, 1, D], 1);
    let (kp, kd) = packed(&Host::random([1, hkv, len, D], 2), 64, 8);
    let (vp, vd) = packed(&Host::random([1, hkv, len, D], 3), 64, 4);
    let (k, v) = (PackedOperand { full: &kp, bits: 8, group: 64 }, PackedOperand { full: &vp, bits: 4, group: 64 });
    let qs = q.array() * Array::from_f32(SCALE as f32);
    let cap = Some(CAP as f32);
    let all = |_: usize, _: usize| true;
    let bound = f32_bound(&vd);
    check("decode", &mlx_ext::cpu::decode_attention(&qs, k.as_ref(), v.as_ref(), len, cap).unwrap(), &q, &kd, &vd, bound, &all);

    // A prefill chunk of 40: tiles of 16 queries, masked tails (the cap must not unmask them).
    let qc = queries([1, hq, 40, D], 4);
    let qcs = qc.array() * Array::from_f32(SCALE as f32);
    let causal = |qpos: usize, t: usize| t <= qpos;
    check("prefill", &mlx_ext::cpu::prefill_attention(&qcs, k.as_ref(), v.as_ref(), len, cap).unwrap(), &qc, &kd, &vd, bound, &causal);

    // The decode step writes token `len - 1` itself, then attends exactly like the primitive
    // over the buffers it wrote (re-quantizing a dequantized token need not give the same codes,
    // so the float64 check is the primitive's, above).
    let (ks, _) = packed(&kd, 64, 8);
    let (vs, _) = packed(&vd, 64, 4);
    let (kn, vn) = (kd.tokens(len - 1, len).array(), vd.tokens(len - 1, len).array());
    let (ks, vs) = (PackedOperand { full: &ks, ..k }, PackedOperand { full: &vs, ..v });
    let step = mlx_ext::cpu::decode_step(&qs, &kn, &vn, ks.as_ref(), vs.as_ref(), len - 1, cap).unwrap();
    step.eval().unwrap();
    let after = mlx_ext::cpu::decode_attention(&qs, ks.as_ref(), vs.as_ref(), len, cap).unwrap();
    assert_eq!(to_vec(&step), to_vec(&after), "the capped step attends as the capped primitive does");
    let uncapped = mlx_ext::cpu::decode_attention(&qs, ks.as_ref(), vs.as_ref(), len, None).unwrap();
    assert_ne!(to_vec(&step), to_vec(&uncapped), "the step ignored its cap");

    // A 16-bit dense cache, decode and prefill.
    let (kh, vh) = (kd.array().as_dtype(Dtype::Float16).unwrap(), vd.array().as_dtype(Dtype::Float16).unwrap());
    let widen = |a: &Array| Host { data: to_vec(a), shape: [1, hkv, len, D] };
    let (khd, vhd) = (widen(&kh), widen(&vh));
    check("dense decode", &mlx_ext::cpu::dense_decode_attention(&qs, &kh, &vh, len, cap).unwrap(), &q, &khd, &vhd, bound, &all);
    check("dense prefill", &mlx_ext::cpu::dense_prefill_attention(&qcs, &kh, &vh, len, cap).unwrap(), &qc, &khd, &vhd, bound, &causal);

    // Per-channel keys (K^T quantized along tokens) and a float tail in the same softmax.
    let (body, tail) = (256, len - 256);
    let kt = kd.tokens(0, body).array().swap_axes(2, 3).unwrap().contiguous().unwrap();
    let (w, s, b) = quantize(&kt, 64, 4).unwrap();
    let f32 = |a: &Array| a.as_dtype(Dtype::Float32).unwrap();
    let kcd = dequantize(&w, f32(&s), &f32(&b), 64, 4).unwrap().swap_axes(2, 3).unwrap();
    let kc = Packed { w, scales: s, biases: b };
    let (tk, tv) = (kd.tokens(body, len).array(), vd.tokens(body, len).array());
    let kall = Host { data: to_vec(&mlx_rs::ops::concatenate(&[kcd, tk.clone()], 2).unwrap()), shape: [1, hkv, len, D] };
    let got = mlx_ext::cpu::decode_attention_with(&qs, PackedOperand { full: &kc, bits: 4, group: 64 }.as_ref(), v.as_ref(), body, KeyAxis::Channels, Some((&tk, &tv)), cap).unwrap();
    assert!(tail > 0);
    check("per-channel keys and tail", &got, &q, &kall, &vd, bound, &all);

    let err = mlx_ext::cpu::decode_attention(&qs, k.as_ref(), v.as_ref(), len, Some(-1.0)).unwrap_err().to_string();
    assert!(err.contains("softcap -1"), "{err}");
}

/// The MLX-ops paths (the fallback everywhere, what a capped layer runs on CUDA) and the CPU
/// block path, over a packed body and over float segments, causal and unmasked.
#[test]
fn the_mlx_ops_and_block_paths_cap_every_score() {
    let (hq, hkv, len, l) = (8, 2, 200, 24);
    let q = queries([1, hq, l, D], 11);
    let (kp, kd) = packed(&Host::random([1, hkv, len, D], 12), 64, 8);
    let (vp, vd) = packed(&Host::random([1, hkv, len, D], 13), 64, 4);
    let quant = |p: &Packed, bits| Tensor::Quant { p: Packed { w: p.w.clone(), scales: p.scales.clone(), biases: p.biases.clone() }, bits, group: 64, axis: TokenAxis::Rows, full: None };
    let packed_seg = || vec![Segment { k: quant(&kp, 8), v: quant(&vp, 4), len }];
    // Two float runs (as sinks and a tail are), read in one softmax.
    let float_seg = || (0..2).map(|i| Segment { k: Tensor::Float(kd.tokens(i * 100, i * 100 + 100).array()), v: Tensor::Float(vd.tokens(i * 100, i * 100 + 100).array()), len: 100 }).collect::<Vec<_>>();
    let scoring = Scoring::capped(SCALE as f32, CAP as f32);
    let causal = |qpos: usize, t: usize| t <= qpos;
    let last = q.tokens(l - 1, l);
    let bound = f32_bound(&vd);
    for (name, segs) in [("packed", packed_seg()), ("float", float_seg())] {
        let got = mlx_ops::quantized(&q.array(), &segs, &Mask::Causal, scoring, None).unwrap();
        check(&format!("mlx-ops {name} causal"), &got, &q, &kd, &vd, bound, &causal);
        let got = cpu::blocks(&q.array(), &segs, &Mask::Causal, scoring, None).unwrap();
        check(&format!("blocks {name} causal"), &got, &q, &kd, &vd, bound, &causal);
        let got = mlx_ops::quantized(&last.array(), &segs, &Mask::None, scoring, None).unwrap();
        check(&format!("mlx-ops {name} decode"), &got, &last, &kd, &vd, bound, &|_, _| true);
    }
    // MLX's fused sdpa has no cap: handed one, it runs the ops instead of dropping it.
    let got = mlx_ops::sdpa(&q.array(), &float_seg(), &Mask::Causal, scoring, None).unwrap();
    check("sdpa float causal", &got, &q, &kd, &vd, bound, &causal);
}

/// The cache end to end, as a Gemma 2 layer drives it: a prompt in chunks then decode steps,
/// split-precision and dense, global and on a small rotating window (sliding layers). Bound
/// from the bit widths (tests/common): tanh is 1-Lipschitz, so capping never widens the score
/// error that bound starts from. Milder queries and cap than above (scores up to about 2, cap
/// 0.5), so that the bound of 8-bit keys is not vacuous.
#[test]
fn a_capped_cache_stays_within_the_quantization_bound_in_every_layer_kind() {
    let (hq, hkv, prompt, t, cap) = (4, 2, 40, 60, 0.5);
    let q = scaled_queries([1, hq, t, D], 21, 2.0);
    let k = Host::random([1, hkv, t, D], 22);
    let v = Host::random([1, hkv, t, D], 23);
    let scoring = Scoring::capped(SCALE as f32, cap as f32);
    let pool = KvPool::new(mlx_kv::Geometry { layers: 1, kv_heads: hkv, head_dim: D }, None);
    // (spec, window, in pool blocks)
    let kinds = [(KvSpec::bits(8, 4), None, false), (KvSpec::bits(8, 4), Some(8), false), (KvSpec::bits(8, 4), None, true), (KvSpec::bits(8, 8), Some(8), false), (KvSpec::dense(), None, false), (KvSpec::dense(), Some(8), false)];
    for (spec, window, paged) in kinds {
        {
            let visible = move |qpos: usize, j: usize| j <= qpos && window.is_none_or(|w| j + w > qpos);
            let bound = attention_bound(q_l1_max(&q), SCALE, k.max_abs(), v.max_abs(), spec.k.bits, spec.v.bits);
            let mut cache = if paged {
                let fmt = mlx_kv::BlockFormat::of(&spec, 1).expect("k8v4 lives in pool blocks");
                KvCache::new_paged(spec.clone(), D, Arc::new(Mutex::new(pool.reserve(&fmt, t).unwrap())), 0).unwrap()
            } else {
                KvCache::new(spec.clone(), D, CacheOptions { max_size: window, max_chunk: 16 }).unwrap()
            };
            let (mut paths, mut at, mut bites) = (Vec::new(), 0, 0.0f64);
            while at < t {
                let z = if at < prompt { (at + 16).min(prompt) } else { at + 1 };
                let out = cache.update_and_attend(&q.tokens(at, z).array(), &k.tokens(at, z).array(), &v.tokens(at, z).array(), scoring, None).unwrap();
                let want = reference_attention_capped(&q.tokens(at, z), &k.tokens(0, z), &v.tokens(0, z), SCALE, Some(cap), &visible);
                let err = max_abs_diff(&to_vec(&out), &want);
                assert!(err <= bound, "{spec} window {window:?} tokens {at}..{z}: max error {err:.3e} > {bound:.3e}");
                let plain = reference_attention(&q.tokens(at, z), &k.tokens(0, z), &v.tokens(0, z), SCALE, &visible);
                bites = bites.max(max_abs_diff(&to_vec(&out), &plain));
                paths.extend(cache.last_path().map(|c| c.path.name()));
                at = z;
            }
            paths.dedup();
            eprintln!("{spec} window {window:?} paged {paged}: paths {paths:?}, bound {bound:.3e}, uncapped reference {bites:.3e} away");
            // Even the loose k8v4 bound leaves the uncapped reference outside it; the 16-bit
            // cache's bound is tight enough to leave it far outside.
            let margin = if spec.k.is_quantized() { 1.0 } else { 10.0 };
            assert!(bites > margin * bound, "{spec} window {window:?}: the cap does not bite ({bites:.3e})");
            assert!(!paged || paths.contains(&"paged-cpu") || !cpu_kernels(), "{spec} in pool blocks: decode took {paths:?}");
        }
    }
}
