//! Per-channel keys in the pool: whole key groups in the blocks, the unfinished group in each
//! sequence's float tail, one paged op reading both. The pooled cache stores exactly what a
//! cache with its own buffers stores, so their attention agrees to float32 rounding; both stay
//! within the float64 reference's bound for the bit widths.

mod common;

use common::*;
use mlx_kv::pool::SharedTable;
use mlx_kv::{Backend, KeyLayout, KvCache, KvPool, KvSpec, Rotation};
use std::sync::{Arc, Mutex};

const D: usize = 64;
const HQ: usize = 4;
const HKV: usize = 2;

fn per_channel(k_bits: u8, v_bits: u8, group: usize, rotation: Rotation) -> KvSpec {
    let mut s = KvSpec::bits(k_bits, v_bits);
    s.key_layout = KeyLayout::PerChannel;
    s.k.group = group;
    s.rotation = rotation;
    s
}

fn cpu_kernels() -> bool {
    Backend::current() == Backend::Cpu && mlx_ext::options::current().cpu_kernels.on()
}

fn pooled(pool: &KvPool, spec: &KvSpec, tokens: usize) -> KvCache {
    let fmt = mlx_kv::BlockFormat::of(spec, 1).expect("per-channel keys with groups that tile a block live in the pool");
    let table: SharedTable = Arc::new(Mutex::new(pool.reserve(&fmt, tokens).expect("no budget")));
    KvCache::new_paged(spec.clone(), D, table, 0).unwrap()
}

fn rotate(x: &Host) -> Host {
    let h = mlx_kv::rotation::hadamard(x.shape[3], mlx_rs::Dtype::Float32).unwrap();
    Host { data: to_vec(&mlx_rs::ops::matmul(x.array(), &h).unwrap()), shape: x.shape }
}

fn path(c: &KvCache) -> String {
    c.last_path().map(|p| p.to_string()).unwrap_or_default()
}

#[test]
fn a_pooled_per_channel_cache_decodes_like_one_with_its_own_buffers() {
    if !cpu_kernels() {
        return;
    }
    let pool = KvPool::new(mlx_kv::Geometry { layers: 1, kv_heads: HKV, head_dim: D }, None);
    // 4- and 3-bit keys (3-bit codes come in units of 64 tokens), rotated or not; a 100-token
    // prefill leaves a partial group, then decode crosses group edges and the block edge at 256.
    // With sink tokens (kept in float beside the blocks, read first from the tail rows) too.
    let sinks = |mut s: KvSpec, n: usize| {
        s.sinks = n;
        s
    };
    let specs = [
        per_channel(4, 4, 64, Rotation::None),
        per_channel(3, 2, 64, Rotation::KeysAndValues),
        per_channel(4, 4, 128, Rotation::Keys),
        sinks(per_channel(4, 4, 64, Rotation::None), 1),
        sinks(per_channel(3, 3, 128, Rotation::Values), 3),
    ];
    let (prefill, total) = (100usize, 330usize);
    for (n, spec) in specs.iter().enumerate() {
        let seed = 40 + 3 * n as u64;
        let q = Host::random([1, HQ, total, D], seed);
        let k = Host::random([1, HKV, total, D], seed + 1);
        let v = Host::random([1, HKV, total, D], seed + 2);
        let scale = 1.0 / (D as f64).sqrt();
        let mut own = KvCache::new(spec.clone(), D, Default::default()).unwrap();
        let mut paged = pooled(&pool, spec, total);
        let (a, z) = (0, prefill);
        for c in [&mut own, &mut paged] {
            c.update_and_attend(&q.tokens(a, z).array(), &k.tokens(a, z).array(), &v.tokens(a, z).array(), scale as f32, None).unwrap();
        }
        // The bound the widths allow, in the frame the cache stores (rotated K and V spread
        // the output error over D terms of weight 1/sqrt(D) when rotated back).
        let (qh, kh) = if spec.rotation.keys() { (rotate(&q), rotate(&k)) } else { (q.tokens(0, total), k.tokens(0, total)) };
        let vh = if spec.rotation.values() { rotate(&v) } else { v.tokens(0, total) };
        let bound = attention_bound(q_l1_max(&qh), scale, kh.max_abs(), vh.max_abs(), spec.k.bits, spec.v.bits)
            * if spec.rotation.values() { (D as f64).sqrt() } else { 1.0 };
        let mut worst = 0.0f64;
        for t in prefill..total {
            let (qa, ka, va) = (q.tokens(t, t + 1).array(), k.tokens(t, t + 1).array(), v.tokens(t, t + 1).array());
            let want = to_vec(&own.update_and_attend(&qa, &ka, &va, scale as f32, None).unwrap());
            let got = to_vec(&paged.update_and_attend(&qa, &ka, &va, scale as f32, None).unwrap());
            assert!(path(&paged).starts_with("paged-cpu"), "{spec} token {t}: a pooled per-channel step took {}", path(&paged));
            if t + 1 - spec.sinks >= spec.k.group {
                // A first key group still all in the tail has no body for the primitive.
                // The one-op step inside a group, the primitive for the token that flushes it.
                let p = path(&own);
                assert!(p.starts_with("cpu-primitive") || p.starts_with("cpu-step"), "{spec} token {t}: a per-channel step (sinks and all) took {p}");
            }
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff <= 2e-5, "{spec} token {t}: pooled and own-buffer caches differ by {diff:.2e}");
            let reference = reference_attention(&q.tokens(t, t + 1), &k.tokens(0, t + 1), &v.tokens(0, t + 1), scale, &|_, _| true);
            worst = worst.max(max_abs_diff(&got, &reference));
        }
        assert!(worst <= bound, "{spec}: max error {worst:.3e} exceeds bound {bound:.3e}");
        assert_eq!(paged.offset(), total);
        // Only whole groups take blocks; the tail lives with the sequence.
        let ids = paged.paged_table().unwrap().lock().unwrap().ids().len();
        let grouped = (total - spec.sinks) / spec.k.group * spec.k.group;
        assert_eq!(ids, KvPool::blocks_for(grouped), "{spec}: {ids} blocks for {grouped} tokens in whole groups");
    }
}

#[test]
fn a_batch_of_per_channel_sequences_at_different_lengths_matches_each_alone() {
    if !cpu_kernels() {
        return;
    }
    let pool = KvPool::new(mlx_kv::Geometry { layers: 1, kv_heads: HKV, head_dim: D }, None);
    let spec = per_channel(4, 4, 64, Rotation::KeysAndValues);
    // Prefills that leave empty, partial and almost whole tail groups; a per-token k8v4
    // sequence rides along in its own group of the same step.
    let lens = [64usize, 70, 127, 200];
    let steps = 70;
    let mut specs: Vec<KvSpec> = lens.iter().map(|_| spec.clone()).chain([KvSpec::bits(8, 4)]).collect();
    // Two sequences keep a sink token: a group of their own, whose op reads it first.
    specs[1].sinks = 1;
    specs[3].sinks = 1;
    let lens: Vec<usize> = lens.into_iter().chain([33]).collect();
    let s = specs.len();
    let scale = 0.125f32;
    let data: Vec<(Host, Host, Host)> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| (Host::random([1, HQ, n + steps, D], 90 + i as u64), Host::random([1, HKV, n + steps, D], 190 + i as u64), Host::random([1, HKV, n + steps, D], 290 + i as u64)))
        .collect();
    let mut together: Vec<KvCache> = specs.iter().zip(&lens).map(|(sp, &n)| pooled(&pool, sp, n + steps)).collect();
    let mut alone: Vec<KvCache> = specs.iter().zip(&lens).map(|(sp, &n)| pooled(&pool, sp, n + steps)).collect();
    for (i, &n) in lens.iter().enumerate() {
        let (q, k, v) = &data[i];
        for c in [&mut together[i], &mut alone[i]] {
            c.update_and_attend(&q.tokens(0, n).array(), &k.tokens(0, n).array(), &v.tokens(0, n).array(), scale, None).unwrap();
        }
    }
    let stack = |f: &dyn Fn(usize) -> mlx_rs::Array| mlx_rs::ops::concatenate(&(0..s).map(f).collect::<Vec<_>>(), 0).unwrap();
    for step in 0..steps {
        let at = |i: usize| lens[i] + step;
        let q = stack(&|i| data[i].0.tokens(at(i), at(i) + 1).array());
        let k = stack(&|i| data[i].1.tokens(at(i), at(i) + 1).array());
        let v = stack(&|i| data[i].2.tokens(at(i), at(i) + 1).array());
        let mut refs: Vec<&mut KvCache> = together.iter_mut().collect();
        let out = to_vec(&mlx_kv::batch::update_and_attend(&mut refs, &q, &k, &v, scale).unwrap());
        let per = HQ * D;
        for i in 0..s {
            let (q1, k1, v1) = (data[i].0.tokens(at(i), at(i) + 1).array(), data[i].1.tokens(at(i), at(i) + 1).array(), data[i].2.tokens(at(i), at(i) + 1).array());
            let want = to_vec(&alone[i].update_and_attend(&q1, &k1, &v1, scale, None).unwrap());
            let diff = out[i * per..(i + 1) * per].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff <= 2e-5, "sequence {i} ({}) step {step}: batched and alone differ by {diff:.2e}", specs[i]);
            assert!(path(&together[i]).starts_with("paged-cpu"), "sequence {i}: the batch step took {}", path(&together[i]));
        }
    }
    for (i, c) in together.iter().enumerate() {
        assert_eq!(c.offset(), lens[i] + steps);
    }
}

#[test]
fn per_channel_caches_cut_back_only_to_whole_key_groups_and_continue_as_if_never_longer() {
    let spec = per_channel(4, 4, 64, Rotation::None);
    let (n, cut, more) = (200usize, 128usize, 40usize);
    let q = Host::random([1, HQ, n + more, D], 7);
    let k = Host::random([1, HKV, n + more, D], 8);
    let v = Host::random([1, HKV, n + more, D], 9);
    let feed = |c: &mut KvCache, a: usize, z: usize| c.update_and_attend(&q.tokens(a, z).array(), &k.tokens(a, z).array(), &v.tokens(a, z).array(), 0.125, None).unwrap();
    let mut long = KvCache::new(spec.clone(), D, Default::default()).unwrap();
    feed(&mut long, 0, n);
    // 192 tokens in three whole groups, 8 in the float tail.
    assert!(long.can_trim(8) && long.can_trim(72) && long.can_trim(200));
    assert!(!long.can_trim(9) && !long.can_trim(60), "a cut inside a key group");
    assert_eq!(long.reusable(193), 193, "a cut inside the float tail is exact");
    assert_eq!(long.reusable(191), 128);
    assert_eq!(long.reusable(150), 128);
    assert_eq!(long.reusable(63), 0);
    let copy = long.fork(cut).unwrap().expect("a whole-group prefix can be copied");
    assert!(long.fork(150).unwrap().is_none(), "a prefix ending inside a group cannot");
    assert_eq!(long.trim(n - cut), n - cut);
    let mut short = KvCache::new(spec, D, Default::default()).unwrap();
    feed(&mut short, 0, cut);
    let mut copy = copy;
    for t in n..n + more {
        // The same continuation after the cut: token positions differ from the uncut run, but
        // the three caches hold the same codes, so they must agree exactly.
        let (q1, k1, v1) = (q.tokens(t, t + 1).array(), k.tokens(t, t + 1).array(), v.tokens(t, t + 1).array());
        let a = to_vec(&long.update_and_attend(&q1, &k1, &v1, 0.125, None).unwrap());
        let b = to_vec(&short.update_and_attend(&q1, &k1, &v1, 0.125, None).unwrap());
        let c = to_vec(&copy.update_and_attend(&q1, &k1, &v1, 0.125, None).unwrap());
        let d1 = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let d2 = c.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(d1 <= 1e-6 && d2 <= 1e-6, "token {t}: trimmed {d1:.2e}, forked {d2:.2e} from a cache that never held the cut tokens");
    }
}
