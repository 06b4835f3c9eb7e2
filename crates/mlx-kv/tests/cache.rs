//! Cache behaviour against a float64 reference, with bounds derived from the bit widths.

mod common;

use common::*;
use mlx_kv::store::{QuantStore, TokenAxis};
use mlx_kv::{CacheOptions, KeyLayout, KvCache, KvSpec, Rotation};
use mlx_rs::Dtype;

const D: usize = 64;
const SCALE: f64 = 0.125; // 1/sqrt(64)

/// Feeds `k`,`v` in chunks, then checks the attention of each chunk's queries.
fn run_and_check(spec: &KvSpec, opts: CacheOptions, chunks: &[usize], visible: &dyn Fn(usize, usize) -> bool, seed: u64) {
    check_heads(spec, opts, chunks, visible, seed, (4, 2, D));
}

/// As `run_and_check`, for `(query heads, kv heads, head_dim)`.
fn check_heads(
    spec: &KvSpec,
    opts: CacheOptions,
    chunks: &[usize],
    visible: &dyn Fn(usize, usize) -> bool,
    seed: u64,
    (hq, hkv, d): (usize, usize, usize),
) {
    let t: usize = chunks.iter().sum();
    let scale = 1.0 / (d as f64).sqrt();
    let q = Host::random([1, hq, t, d], seed);
    let k = Host::random([1, hkv, t, d], seed + 1);
    let v = Host::random([1, hkv, t, d], seed + 2);
    let (kb, vb) = (spec.k.bits, spec.v.bits);
    let (qh, kh) = if spec.rotation.keys() { (rotate(&q), rotate(&k)) } else { (q.tokens(0, t), k.tokens(0, t)) };
    let vh = if spec.rotation.values() { rotate(&v) } else { v.tokens(0, t) };
    // Centered keys are stored less a mean of keys, so their magnitude is at most twice theirs.
    let k_max = kh.max_abs() * if spec.key_layout == KeyLayout::Centered { 2.0 } else { 1.0 };
    let bound = attention_bound(q_l1_max(&qh), scale, k_max, vh.max_abs(), kb, vb)
        // Rotating the output back sums D terms of the per-element error, each weighted 1/sqrt(D).
        * if spec.rotation.values() { (d as f64).sqrt() } else { 1.0 };
    let mut cache = KvCache::new(spec.clone(), d, opts).unwrap();
    attend_chunks_checked(&mut cache, (&q, &k, &v), 0, chunks.iter().copied(), scale, bound, visible, &spec.to_string());
    assert_eq!(cache.offset(), t);
}

fn rotate(x: &Host) -> Host {
    let h = mlx_kv::rotation::hadamard(x.shape[3], Dtype::Float32).unwrap();
    let r = mlx_rs::ops::matmul(x.array(), &h).unwrap();
    Host { data: to_vec(&r), shape: x.shape }
}

/// The largest magnitude of `x` in the rotated frame, where a rotated cache quantizes it.
fn rotated_max_abs(x: &Host) -> f64 {
    rotate(x).max_abs()
}

fn causal(q: usize, k: usize) -> bool {
    k <= q
}

#[test]
fn every_bit_pair_matches_f64_attention_within_its_bound() {
    for (kb, vb) in [(16, 16), (8, 8), (8, 4), (4, 8), (4, 4), (4, 2), (2, 2), (3, 5), (6, 6)] {
        run_and_check(&KvSpec::bits(kb, vb), CacheOptions::default(), &[37, 1, 1, 16, 1], &causal, 10);
    }
}

#[test]
fn residual_sinks_rotation_layout_and_start_stay_within_bound() {
    let mut specs = Vec::new();
    let mut s = KvSpec::bits(4, 4);
    s.residual = 16;
    specs.push(s.clone());
    s.sinks = 5;
    specs.push(s.clone());
    s.key_layout = KeyLayout::PerChannel;
    s.residual = 64;
    specs.push(s.clone());
    let mut r = KvSpec::bits(4, 4);
    r.rotation = Rotation::Keys;
    specs.push(r.clone());
    r.rotation = Rotation::KeysAndValues;
    specs.push(r.clone());
    r.rotation = Rotation::Values;
    specs.push(r);
    let mut st = KvSpec::bits(8, 4);
    st.quantized_kv_start = 40;
    specs.push(st);
    let mut c = KvSpec::bits(4, 4);
    c.key_layout = KeyLayout::Centered;
    specs.push(c.clone());
    c.rotation = Rotation::KeysAndValues;
    c.residual = 16;
    c.sinks = 3;
    specs.push(c);
    for spec in specs {
        run_and_check(&spec, CacheOptions::default(), &[70, 1, 1, 64, 3, 1], &causal, 20);
    }
}

/// 16/16 stores floats, so the only differences from MLX's fused attention are rounding: on the
/// CPU our softmax uses an exponential with relative error about 1.2e-5 (see
/// `attention::cpu::exp_nonpositive`) and merges segments online; on the GPU it is the same op.
#[test]
fn split_16_16_matches_dense_attention() {
    let t = 50;
    let q = Host::random([1, 4, t, D], 3);
    let k = Host::random([1, 2, t, D], 4);
    let v = Host::random([1, 2, t, D], 5);
    let mut spec = KvSpec::bits(16, 16);
    spec.residual = 8;
    spec.sinks = 3;
    let mut cache = KvCache::new(spec, D, CacheOptions::default()).unwrap();
    let out = cache.update_and_attend(&q.array(), &k.array(), &v.array(), SCALE as f32, None).unwrap();
    let dense = mlx_rs::fast::scaled_dot_product_attention(
        q.array(),
        k.array(),
        v.array(),
        SCALE as f32,
        mlx_rs::fast::ScaledDotProductAttentionMask::Causal,
        None,
    )
    .unwrap();
    let (got, want) = (to_vec(&out), to_vec(&dense));
    let vmax = v.data.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs() as f64).fold(0f64, f64::max);
    // Each output is a convex combination of values: weights off by 1.2e-5 relative (twice:
    // numerator and denominator) plus f32 accumulation over 50 terms. The body stores 16-bit
    // floats (sinks and tail stay f32): keys within 2^-12 relative shift each logit by at most
    // scale·‖q‖₁·max|k|·2^-12 (weights within e^{±2δ}), values add max|v|·2^-12.
    let delta = SCALE * q_l1_max(&q) * k.max_abs() * F16_REL / 2.0;
    let bound = (2.0 * 1.2e-5 + 50.0 * f32::EPSILON as f64) * vmax + vmax * ((2.0 * delta).exp() - 1.0) + vmax * F16_REL / 2.0;
    assert!(worst <= bound, "max |diff| {worst:e} > {bound:e}");
}

#[test]
fn rotating_cache_wraps_over_many_steps() {
    let (w, sinks) = (32, 4);
    let visible = move |q: usize, k: usize| k <= q && (k < sinks || k + (w - sinks) > q);
    let opts = CacheOptions { max_size: Some(w), max_chunk: 16 };
    let mut chunks = vec![16, 16, 7];
    chunks.extend(std::iter::repeat_n(1, 90));
    for (kb, vb, residual) in [(16, 16, 0), (8, 4, 0), (8, 4, 8)] {
        let mut spec = KvSpec::bits(kb, vb);
        spec.sinks = sinks;
        spec.residual = residual;
        run_and_check(&spec, opts, &chunks, &visible, 30);
    }
}

#[test]
fn sinks_and_residual_hold_exact_float_tokens() {
    let t = 100;
    let k = Host::random([1, 2, t, D], 7);
    let mut spec = KvSpec::bits(2, 2);
    spec.sinks = 4;
    spec.residual = 16;
    let mut cache = KvCache::new(spec, D, CacheOptions::default()).unwrap();
    for i in 0..t {
        let x = k.tokens(i, i + 1).array();
        cache.update(&x, &x).unwrap();
    }
    let got = to_vec(&cache.dequantized_keys().unwrap().unwrap());
    let want = k.tokens(0, t);
    let row = |i: usize| (0..2).flat_map(move |h| (0..D).map(move |d| (h, i, d)));
    for i in (0..4).chain(t - 16..t) {
        for (h, _, d) in row(i) {
            assert_eq!(got[(h * t + i) * D + d] as f64, want.at(0, h, i, d), "token {i} should be exact");
        }
    }
    // A 2-bit body token is not exact: the sinks/tail check above is not vacuous.
    let i = 50;
    assert!(row(i).any(|(h, _, d)| got[(h * t + i) * D + d] as f64 != want.at(0, h, i, d)));
}

#[test]
fn quantized_store_roundtrip_is_within_half_a_step() {
    let x = Host::random([1, 2, 256, 128], 11);
    for bits in [2u8, 3, 4, 5, 6, 8] {
        for group in [32usize, 64, 128] {
            let mut s = QuantStore::new(bits, group, TokenAxis::Rows);
            s.append(&x.array()).unwrap();
            let back = to_vec(&s.dequantize(0, 256, Dtype::Float32).unwrap().unwrap());
            let want: Vec<f64> = x.data.iter().map(|&v| v as f64).collect();
            let err = max_abs_diff(&back, &want);
            let bound = quant_elem_bound(x.max_abs(), bits);
            assert!(err <= bound, "bits {bits} group {group}: {err:.3e} > {bound:.3e}");
        }
    }
}

fn key_error(spec: KvSpec, k: &Host) -> f64 {
    let rot = spec.rotation.keys();
    let t = k.shape[2];
    let mut cache = KvCache::new(spec, D, CacheOptions::default()).unwrap();
    cache.update(&k.array(), &k.array()).unwrap();
    let got = to_vec(&cache.dequantized_keys().unwrap().unwrap());
    // Rotation is orthonormal, so the L2 error is the same in the rotated frame.
    let want = if rot { rotate(k) } else { k.tokens(0, t) };
    got.iter().zip(&want.data).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn per_channel_and_rotation_beat_per_token_on_outlier_channels() {
    let mut k = Host::random([1, 2, 256, D], 13);
    for t in 0..256 {
        for h in 0..2 {
            for ch in [3usize, 17] {
                k.data[(h * 256 + t) * D + ch] *= 20.0;
            }
        }
    }
    let per_token = key_error(KvSpec::bits(4, 4), &k);
    let mut pc = KvSpec::bits(4, 4);
    pc.key_layout = KeyLayout::PerChannel;
    let per_channel = key_error(pc, &k);
    let mut rot = KvSpec::bits(4, 4);
    rot.rotation = Rotation::Keys;
    let rotated = key_error(rot, &k);
    assert!(per_channel < per_token, "per-channel {per_channel} should beat per-token {per_token}");
    assert!(rotated < per_token, "rotation {rotated} should beat per-token {per_token}");
}

/// Max |attention error| against f64 of one cache filled with `k` in two chunks.
fn attention_error(spec: KvSpec, k: &Host) -> f64 {
    let t = k.shape[2];
    let q = Host::random([1, 4, t, D], 31);
    let v = Host::random([1, 2, t, D], 32);
    let mut cache = KvCache::new(spec, D, CacheOptions::default()).unwrap();
    let half = t / 2;
    cache.update(&k.tokens(0, half).array(), &v.tokens(0, half).array()).unwrap();
    let out = cache.update_and_attend(&q.tokens(half, t).array(), &k.tokens(half, t).array(), &v.tokens(half, t).array(), SCALE as f32, None).unwrap();
    let want = reference_attention(&q.tokens(half, t), &k.tokens(0, t), &v.tokens(0, t), SCALE, &causal);
    max_abs_diff(&to_vec(&out), &want)
}

#[test]
fn centering_takes_channel_offsets_out_of_the_key_groups() {
    // Two channels carry a large constant offset (as RoPE's slow channels do): per-token groups
    // spend their range on it; centered keys subtract it and attention is unchanged by that.
    let mut k = Host::random([1, 2, 128, D], 33);
    for t in 0..128 {
        for h in 0..2 {
            for ch in [5usize, 40] {
                k.data[(h * 128 + t) * D + ch] += 12.0;
            }
        }
    }
    let per_token = attention_error(KvSpec::bits(4, 8), &k);
    let mut c = KvSpec::bits(4, 8);
    c.key_layout = KeyLayout::Centered;
    let centered = attention_error(c, &k);
    // The offsets set each group's step at about 12/15 instead of about 2/15.
    assert!(centered * 3.0 < per_token, "centered {centered:.3e} should be well under per-token {per_token:.3e}");
}

#[test]
fn trim_and_reset_rewind_the_offset() {
    let k = Host::random([1, 2, 40, D], 21);
    let mut cache = KvCache::new(KvSpec::bits(8, 4), D, CacheOptions::default()).unwrap();
    cache.update(&k.array(), &k.array()).unwrap();
    assert_eq!(cache.trim(5), 5);
    assert_eq!((cache.offset(), cache.len()), (35, 35));
    let again = k.tokens(35, 40).array();
    cache.update(&again, &again).unwrap();
    let full = to_vec(&cache.dequantized_keys().unwrap().unwrap());
    let mut fresh = KvCache::new(KvSpec::bits(8, 4), D, CacheOptions::default()).unwrap();
    fresh.update(&k.array(), &k.array()).unwrap();
    assert_eq!(full, to_vec(&fresh.dequantized_keys().unwrap().unwrap()), "trim then re-append must equal a straight fill");
    cache.reset();
    assert_eq!((cache.offset(), cache.len(), cache.bytes().total()), (0, 0, 0));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    const BITS: [u8; 7] = [2, 3, 4, 5, 6, 8, 16];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn random_shapes_offsets_and_settings_stay_within_bound(
            kb in 0usize..7, vb in 0usize..7,
            hkv in 1usize..4, rep in 1usize..4, d in prop::sample::select(vec![32usize, 64, 128]),
            chunks in prop::collection::vec(1usize..40, 1..6),
            residual in prop::sample::select(vec![0usize, 8, 32]),
            sinks in 0usize..5,
            seed in 0u64..1000,
        ) {
            let mut spec = KvSpec::bits(BITS[kb], BITS[vb]);
            spec.k.group = 32;
            spec.v.group = 32;
            spec.residual = residual;
            spec.sinks = sinks;
            check_heads(&spec, CacheOptions::default(), &chunks, &causal, seed, (hkv * rep, hkv, d));
        }
    }
}

#[test]
fn long_prefill_chunks_take_the_blockwise_path_within_bound() {
    // 2 x 512 x 3000 score elements per KV head exceed the single-pass limit, so attention walks
    // the cache in blocks with the online-softmax merge (dequantizing one block at a time on CPU).
    for (kb, vb) in [(8, 4), (4, 4), (16, 16)] {
        run_and_check(&KvSpec::bits(kb, vb), CacheOptions::default(), &[2488, 512], &causal, 40);
    }
}

#[test]
fn per_channel_keys_with_many_blocks() {
    // Per-channel keys are packed along tokens, so blocks must end on group boundaries; a chunk
    // of 128 queries over ~600 tokens makes blocks whose natural size (455 tokens) does not.
    let mut s = KvSpec::bits(4, 4);
    s.key_layout = KeyLayout::PerChannel;
    // 9 query heads over 3 KV heads, as SmolLM2: 3 x 384 score rows per block.
    check_heads(&s, CacheOptions::default(), &[200, 200, 128, 128], &causal, 20, (9, 3, D));
    let mut r = s.clone();
    r.residual = 64;
    check_heads(&r, CacheOptions::default(), &[200, 200, 128, 128], &causal, 21, (9, 3, D));
}


/// Feeds `q`, `k`, `v` through `cache` in `chunks` of tokens starting at token `start`, each
/// chunk's output within `bound` of the f64 reference over the tokens `visible(query, key)`
/// allows; returns each chunk's attention path.
#[allow(clippy::too_many_arguments)]
fn attend_chunks_checked(cache: &mut KvCache, (q, k, v): (&Host, &Host, &Host), start: usize, chunks: impl IntoIterator<Item = usize>, scale: f64, bound: f64, visible: &dyn Fn(usize, usize) -> bool, label: &str) -> Vec<mlx_kv::attention::Path> {
    let mut at = start;
    chunks
        .into_iter()
        .map(|n| {
            let (a, z) = (at, at + n);
            let out = cache
                .update_and_attend(&q.tokens(a, z).array(), &k.tokens(a, z).array(), &v.tokens(a, z).array(), scale as f32, None)
                .unwrap();
            let want = reference_attention(&q.tokens(a, z), &k.tokens(0, z), &v.tokens(0, z), scale, visible);
            let err = max_abs_diff(&to_vec(&out), &want);
            assert!(err <= bound, "{label} chunk {a}..{z}: max error {err:.3e} exceeds bound {bound:.3e}");
            at = z;
            cache.last_path().expect("attention ran").path
        })
        .collect()
}

/// Decodes tokens `from..t` one at a time (see [`attend_chunks_checked`]).
fn decode_checked(cache: &mut KvCache, qkv: (&Host, &Host, &Host), from: usize, bound: f64, visible: &dyn Fn(usize, usize) -> bool, label: &str) -> Vec<mlx_kv::attention::Path> {
    let t = qkv.0.shape[2];
    attend_chunks_checked(cache, qkv, from, std::iter::repeat_n(1, t - from), SCALE, bound, visible, label)
}

/// Per-channel caches decode through our CPU primitive or its one-op step (whole key groups in
/// the body, the newer tokens in the float tail, both in one softmax; the step also writes the
/// token and enters the rotated frame), within the same f64 bound as every path; the path
/// check makes sure our ops, not the block path, produced the numbers, and that the step ran.
/// Rotated cases: the bound takes the rotated keys' and values' range (quantization happens
/// in that frame; the rotation itself is exact up to f32 rounding).
#[test]
fn per_channel_decode_takes_the_cpu_primitive_within_bound() {
    use mlx_kv::attention::Path;
    let on_cpu = mlx_kv::Backend::current() == mlx_kv::Backend::Cpu && mlx_ext::options::current().cpu_kernels.on();
    let (hq, hkv, prompt, steps) = (9, 3, 150, 70);
    let t = prompt + steps;
    let cases = [
        (4u8, 4u8, 64usize, 0usize, 0usize, Rotation::None),
        (2, 8, 32, 32, 0, Rotation::None),
        (3, 6, 64, 0, 1, Rotation::None),
        (8, 3, 128, 0, 0, Rotation::None),
        (6, 2, 32, 64, 0, Rotation::None),
        (6, 6, 64, 0, 1, Rotation::KeysAndValues),
        (4, 4, 64, 0, 2, Rotation::Values),
    ];
    for (i, &(kb, vb, group, residual, sinks, rotation)) in cases.iter().enumerate() {
        let seed = 50 + 10 * i as u64;
        let mut spec = KvSpec::bits(kb, vb);
        spec.key_layout = KeyLayout::PerChannel;
        spec.k.group = group;
        spec.residual = residual;
        spec.sinks = sinks;
        spec.rotation = rotation;
        let mut steps_taken = 0;
        let q = Host::random([1, hq, t, D], seed);
        let k = Host::random([1, hkv, t, D], seed + 1);
        let v = Host::random([1, hkv, t, D], seed + 2);
        let range = |x: &Host, on: bool| if on { rotated_max_abs(x) } else { x.max_abs() };
        let bound = attention_bound(q_l1_max(&q), SCALE, range(&k, rotation.keys()), range(&v, rotation.values()), kb, vb);
        let mut cache = KvCache::new(spec.clone(), D, CacheOptions::default()).unwrap();
        cache.update(&k.tokens(0, prompt).array(), &v.tokens(0, prompt).array()).unwrap();
        let paths = decode_checked(&mut cache, (&q, &k, &v), prompt, bound, &causal, &spec.to_string());
        if on_cpu {
            assert!(paths.iter().all(|p| matches!(p, Path::CpuPrimitive | Path::CpuStep)), "{spec}: paths {paths:?}");
            steps_taken = paths.iter().filter(|&&p| p == Path::CpuStep).count();
        }
        let tails: std::collections::BTreeSet<usize> = (prompt + 1..=t).map(|z| z % group).collect();
        // Every token but a group's last (its flush) and those before the first whole group.
        assert!(!on_cpu || steps_taken >= steps - steps.div_ceil(group) - 1, "{spec}: {steps_taken} of {steps} steps took the one-op step");
        // The steps cover tails from none (or just the residual) to a whole group less one.
        assert!(group > steps || (tails.contains(&0) && tails.contains(&(group - 1))), "{spec}: tails {tails:?}");
    }
}

/// A per-channel ring (`--max-kv-size`, or a model's sliding-window layers): the ring keeps a
/// chunk's slack beyond the window, so the window's oldest token falls inside a key group and
/// the ring wraps. On the CPU every decode step still takes our ops (the one-op step, or the
/// primitive for a group's flush), reading the ring's visible runs with the older tokens of the
/// first group masked, never the block path; within the f64 bound throughout, with sinks and
/// rotation too (the bound then takes the rotated range, as the per-channel case above).
#[test]
fn per_channel_ring_decodes_within_bound_on_either_path() {
    use mlx_kv::attention::Path;
    let on_cpu = mlx_kv::Backend::current() == mlx_kv::Backend::Cpu && mlx_ext::options::current().cpu_kernels.on();
    let group = 32usize;
    for (sinks, rotation) in [(0usize, Rotation::None), (1, Rotation::KeysAndValues)] {
        let w = 128 + sinks;
        let window = w - sinks;
        let visible = move |q: usize, k: usize| k <= q && (k < sinks || k + window > q);
        let mut spec = KvSpec::bits(4, 4);
        spec.key_layout = KeyLayout::PerChannel;
        spec.k.group = group;
        spec.sinks = sinks;
        spec.rotation = rotation;
        let (hq, hkv, prompt, t) = (4, 2, 100, 300);
        let q = Host::random([1, hq, t, D], 70);
        let k = Host::random([1, hkv, t, D], 71);
        let v = Host::random([1, hkv, t, D], 72);
        let range = |x: &Host, on: bool| if on { rotated_max_abs(x) } else { x.max_abs() };
        let bound = attention_bound(q_l1_max(&q), SCALE, range(&k, rotation.keys()), range(&v, rotation.values()), 4, 4);
        let mut cache = KvCache::new(spec.clone(), D, CacheOptions { max_size: Some(w), max_chunk: 16 }).unwrap();
        for a in (0..prompt).step_by(16) {
            let z = (a + 16).min(prompt);
            cache.update(&k.tokens(a, z).array(), &v.tokens(a, z).array()).unwrap();
        }
        let paths = decode_checked(&mut cache, (&q, &k, &v), prompt, bound, &visible, &format!("{spec} ring"));
        let steps = paths.iter().filter(|&&p| p == Path::CpuStep).count();
        assert!(!on_cpu || paths.iter().all(|p| matches!(p, Path::CpuPrimitive | Path::CpuStep)), "{spec}: ring paths {paths:?}");
        // Every token but a group's last (its flush) takes the one-op step.
        assert!(!on_cpu || steps >= (t - prompt) - (t - prompt).div_ceil(group) - 1, "{spec}: {steps} ring steps took the one-op step");
    }
}

/// A packed per-token ring (Gemma's sliding layers under a plain preset) decodes on the CPU
/// primitive over its ring's visible runs once it wraps, not the block path, within the bound.
#[test]
fn per_token_ring_decodes_on_the_primitive_within_bound() {
    use mlx_kv::attention::Path;
    let on_cpu = mlx_kv::Backend::current() == mlx_kv::Backend::Cpu && mlx_ext::options::current().cpu_kernels.on();
    let w = 100usize;
    let visible = move |q: usize, k: usize| k <= q && k + w > q;
    let spec = KvSpec::bits(8, 4);
    let (hq, hkv, prompt, t) = (4, 2, 64, 300);
    let q = Host::random([1, hq, t, D], 80);
    let k = Host::random([1, hkv, t, D], 81);
    let v = Host::random([1, hkv, t, D], 82);
    let bound = attention_bound(q_l1_max(&q), SCALE, k.max_abs(), v.max_abs(), 8, 4);
    let mut cache = KvCache::new(spec.clone(), D, CacheOptions { max_size: Some(w), max_chunk: 16 }).unwrap();
    for a in (0..prompt).step_by(16) {
        cache.update(&k.tokens(a, a + 16).array(), &v.tokens(a, a + 16).array()).unwrap();
    }
    let paths = decode_checked(&mut cache, (&q, &k, &v), prompt, bound, &visible, &format!("{spec} ring"));
    assert!(!on_cpu || paths.iter().all(|&p| p == Path::CpuPrimitive), "{spec}: ring paths {paths:?}");
}

/// Decode steps that write the cache in place (the CPU step, the fused GPU step) must stay in
/// order when nothing is evaluated between them: a prompt fed token by token builds every
/// step's graph before any runs, and the steps' queries and keys do not depend on each other.
/// Each step's output must still see exactly the tokens before it.
#[test]
fn lazy_token_by_token_steps_see_every_earlier_token() {
    let (t, hq, hkv) = (40, 4, 2);
    let q = Host::random([1, hq, t, D], 71);
    let k = Host::random([1, hkv, t, D], 72);
    let v = Host::random([1, hkv, t, D], 73);
    for spec in [KvSpec::bits(8, 4), KvSpec::bits(4, 8), KvSpec::dense()] {
        let bound = attention_bound(q_l1_max(&q), SCALE, k.max_abs(), v.max_abs(), spec.k.bits, spec.v.bits);
        let mut cache = KvCache::new(spec.clone(), D, CacheOptions::default()).unwrap();
        let outs: Vec<_> = (0..t)
            .map(|i| cache.update_and_attend(&q.tokens(i, i + 1).array(), &k.tokens(i, i + 1).array(), &v.tokens(i, i + 1).array(), SCALE as f32, None).unwrap())
            .collect();
        mlx_rs::transforms::eval(outs.iter()).unwrap();
        for (i, out) in outs.iter().enumerate() {
            let want = reference_attention(&q.tokens(i, i + 1), &k.tokens(0, i + 1), &v.tokens(0, i + 1), SCALE, &|_, _| true);
            let err = max_abs_diff(&to_vec(out), &want);
            assert!(err <= bound, "{spec} step {i}: max error {err:.3e} exceeds bound {bound:.3e}");
        }
        println!("{spec}: last path {:?}", cache.last_path().map(|c| c.path));
    }
}
