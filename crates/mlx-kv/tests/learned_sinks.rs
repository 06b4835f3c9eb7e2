//! Learned attention sinks (gpt-oss: a logit per query head that joins the softmax denominator
//! and contributes no value) on every path that takes them, against float64 references built
//! from that definition (tests/common `reference_attention_sinks`: each output row is the
//! sink-free one times `Z / (Z + e^s)`).
//!
//! A sink of -inf adds `exp(-inf) = 0` to the denominator: it must give the sink-free output,
//! bit for bit where the same path runs both. Sinks of a few units bite: every test also checks
//! that the sink-free reference lies well outside its bound.

mod common;

use common::*;
use mlx_kv::attention::{cpu, mlx_ops, Mask, Scoring, Segment, Tensor};
use mlx_kv::store::{Packed, TokenAxis};
use mlx_kv::{CacheOptions, KeyLayout, KvCache, KvPool, KvSpec};
use std::sync::{Arc, Mutex};
use mlx_rs::ops::{dequantize, quantize};
use mlx_rs::{Array, Dtype};

const D: usize = 64;
const SCALE: f64 = 0.125;
/// Per query head: from hardly any weight to most of it (scores here span a few units).
const SINKS: [f64; 8] = [-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0];

fn sink_array(hq: usize) -> Array {
    let s: Vec<f32> = SINKS[..hq].iter().map(|&x| x as f32).collect();
    Array::from_slice(&s, &[hq as i32])
}

/// `h` packed per token (f16 scales, as the cache stores them) and its dequantized values.
fn packed(h: &Host, group: usize, bits: u8) -> (Packed, Host) {
    let (w, s, b) = quantize(h.array(), group as i32, bits as i32).unwrap();
    let (s, b) = (s.as_dtype(Dtype::Float16).unwrap(), b.as_dtype(Dtype::Float16).unwrap());
    let f32 = |a: &Array| a.as_dtype(Dtype::Float32).unwrap();
    let deq = dequantize(&w, f32(&s), &f32(&b), group as i32, bits as i32).unwrap();
    (Packed { w, scales: s, biases: b }, Host { data: to_vec(&deq), shape: h.shape })
}

/// f32 sums over the same (dequantized) values: a few ulps of the values' magnitude.
fn f32_bound(v: &Host) -> f64 {
    2e-5 * v.max_abs().max(1.0)
}

type Path = fn(&Array, &[Segment], &Mask, Scoring, Option<&Array>) -> mlx_kv::Result<Array>;

/// The MLX-ops path (what runs on CUDA and Metal for a layer with sinks), MLX's sdpa (float
/// caches on the GPU) and the CPU block path, over a packed body and over two float runs,
/// causal prefill and decode.
#[test]
fn every_path_that_takes_sinks_matches_the_definition() {
    let (hq, hkv, len, l) = (8, 2, 200, 24);
    let q = Host { data: Host::random([1, hq, l, D], 1).data.iter().map(|x| x * 4.0).collect(), shape: [1, hq, l, D] };
    let (kp, kd) = packed(&Host::random([1, hkv, len, D], 2), 64, 8);
    let (vp, vd) = packed(&Host::random([1, hkv, len, D], 3), 64, 4);
    let quant = |p: &Packed, bits| Tensor::Quant { p: Packed { w: p.w.clone(), scales: p.scales.clone(), biases: p.biases.clone() }, bits, group: 64, axis: TokenAxis::Rows, full: None };
    let packed_seg = || vec![Segment { k: quant(&kp, 8), v: quant(&vp, 4), len }];
    let float_seg = || (0..2).map(|i| Segment { k: Tensor::Float(kd.tokens(i * 100, i * 100 + 100).array()), v: Tensor::Float(vd.tokens(i * 100, i * 100 + 100).array()), len: 100 }).collect::<Vec<_>>();
    let (sinks, none) = (sink_array(hq), Array::from_slice(&[f32::NEG_INFINITY; 8], &[8]));
    let scoring = Scoring::from(SCALE as f32);
    let causal = |qpos: usize, t: usize| t <= qpos;
    let all = |_: usize, _: usize| true;
    let last = q.tokens(l - 1, l);
    let bound = f32_bound(&vd);
    let paths: [(&str, Path); 3] = [("mlx-ops", mlx_ops::quantized), ("blocks", cpu::blocks), ("sdpa", mlx_ops::sdpa)];
    for (seg_name, segs) in [("packed", packed_seg()), ("float", float_seg())] {
        for (path_name, path) in paths {
            if path_name == "sdpa" && seg_name == "packed" {
                continue;
            }
            for (mode, qh, mask, visible) in [("causal", &q, Mask::Causal, &causal as &dyn Fn(usize, usize) -> bool), ("decode", &last, Mask::None, &all)] {
                let what = format!("{path_name} {seg_name} {mode}");
                let got = to_vec(&path(&qh.array(), &segs, &mask, scoring, Some(&sinks)).unwrap());
                let want = reference_attention_sinks(qh, &kd, &vd, SCALE, &SINKS[..hq], visible);
                let err = max_abs_diff(&got, &want);
                assert!(err <= bound, "{what}: max error {err:.3e} from the definition > {bound:.3e}");
                let plain = max_abs_diff(&got, &reference_attention(qh, &kd, &vd, SCALE, visible));
                assert!(plain > 10.0 * bound, "{what}: the sinks do not bite ({plain:.3e})");
                // -inf: no sink at all.
                let without = to_vec(&path(&qh.array(), &segs, &mask, scoring, None).unwrap());
                let minus_inf = to_vec(&path(&qh.array(), &segs, &mask, scoring, Some(&none)).unwrap());
                if path_name == "blocks" {
                    // The running state starts at (m = -inf, den = 1, acc = 0): the first block's
                    // rescale factor is exp(-inf) = 0, which leaves its sums exactly as they are.
                    assert_eq!(minus_inf, without, "{what}: a sink of -inf changed the output");
                } else {
                    // A softmax over one more column (the -inf one) may sum in another order.
                    let err = max_abs_diff(&minus_inf, &without.iter().map(|&x| x as f64).collect::<Vec<_>>());
                    assert!(err <= bound, "{what}: a sink of -inf moved the output by {err:.3e}");
                }
            }
        }
    }
}

/// The cache end to end, as a gpt-oss layer drives it: a prompt in chunks, then decode steps,
/// split-precision (per token, per channel, in pool blocks) and dense, global and on a small
/// rotating window (sliding layers). Sinks keep every layer off the paged and fused steps. The sink logit is exact while every score may move by the key bound, so
/// the quantization bound of tests/common (weights within `e^{±2δ}`) holds unchanged.
#[test]
fn a_cache_with_sinks_stays_within_the_quantization_bound_in_every_layer_kind() {
    let (hq, hkv, prompt, t) = (4, 2, 40, 60);
    let q = Host { data: Host::random([1, hq, t, D], 21).data.iter().map(|x| x * 2.0).collect(), shape: [1, hq, t, D] };
    let k = Host::random([1, hkv, t, D], 22);
    let v = Host::random([1, hkv, t, D], 23);
    let sinks = sink_array(hq);
    let mut per_channel = KvSpec::bits(8, 4);
    per_channel.key_layout = KeyLayout::PerChannel;
    let pool = KvPool::new(mlx_kv::Geometry { layers: 1, kv_heads: hkv, head_dim: D }, None);
    // (spec, window, in pool blocks)
    let kinds = [
        (KvSpec::bits(8, 4), None, false),
        (KvSpec::bits(8, 4), Some(8), false),
        (KvSpec::bits(8, 4), None, true),
        (KvSpec::bits(8, 8), Some(8), false),
        (per_channel, None, false),
        (KvSpec::dense(), None, false),
        (KvSpec::dense(), Some(8), false),
    ];
    for (spec, window, paged) in kinds {
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
            let out = cache.update_and_attend(&q.tokens(at, z).array(), &k.tokens(at, z).array(), &v.tokens(at, z).array(), SCALE as f32, Some(&sinks)).unwrap();
            let out = to_vec(&out);
            let want = reference_attention_sinks(&q.tokens(at, z), &k.tokens(0, z), &v.tokens(0, z), SCALE, &SINKS[..hq], &visible);
            let err = max_abs_diff(&out, &want);
            assert!(err <= bound, "{spec} window {window:?} tokens {at}..{z}: max error {err:.3e} > {bound:.3e}");
            bites = bites.max(max_abs_diff(&out, &reference_attention(&q.tokens(at, z), &k.tokens(0, z), &v.tokens(0, z), SCALE, &visible)));
            paths.extend(cache.last_path().map(|c| c.path.name()));
            at = z;
        }
        paths.dedup();
        eprintln!("{spec} window {window:?} paged {paged}: paths {paths:?}, bound {bound:.3e}, sink-free reference {bites:.3e} away");
        assert!(paths.iter().all(|p| ["cpu-blocks", "mlx-quantized", "widened-sdpa", "sdpa"].contains(p)), "{spec}: sinks reached {paths:?}");
        let margin = if spec.k.is_quantized() { 1.0 } else { 10.0 };
        assert!(bites > margin * bound, "{spec} window {window:?}: the sinks do not bite ({bites:.3e})");
    }
}
