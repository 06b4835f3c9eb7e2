//! Our CPU primitives against float64 references over the same dequantized values: the only
//! differences left are float32 summation order and the polynomial exp, so the bounds are a few
//! float32 ulps of the magnitudes involved, not quantization steps.

mod common;

use common::*;
use mlx_ext::cpu::{dequantize as our_dequantize, quantized_matvec};
use mlx_kv::attention::PackedOperand;
use mlx_kv::store::Packed;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{concatenate, dequantize, quantize};
use mlx_rs::{Array, Dtype};

fn decode_attention(q: &Array, k: PackedOperand, v: PackedOperand, len: usize) -> Result<Array, mlx_ext::ExtError> {
    mlx_ext::cpu::decode_attention(q, k.as_ref(), v.as_ref(), len, None)
}

/// Engine options (the CPU build among them) are process-wide and tests run in parallel: a test
/// that installs a build holds this while it runs, and so does one that compares two calls bit
/// for bit, which must both see the same build (the AVX2 and baseline builds sum in different
/// orders, so a switch between the calls moved the last bits of a result).
static OPTIONS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn options_lock() -> std::sync::MutexGuard<'static, ()> {
    OPTIONS.lock().unwrap_or_else(|e| e.into_inner())
}

fn seed() -> u64 {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000;
    eprintln!("seed {s}");
    s
}

/// Dequantizing with f16 scales would round the values to f16; the kernels compute in f32.
fn f32(a: &Array) -> Array {
    a.as_dtype(Dtype::Float32).unwrap()
}

fn host_matrix(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Array) {
    let h = Host::random([1, 1, rows, cols], seed);
    let a = Array::from_slice(&h.data, &[rows as i32, cols as i32]);
    (h.data, a)
}

#[test]
fn matvec_matches_the_dequantized_product() {
    let base = seed();
    for (i, &(bits, group, rows, n, k, f16)) in [
        (4u8, 32usize, 1usize, 96usize, 576usize, false),
        (4, 64, 3, 40, 256, true),
        (8, 32, 1, 33, 128, true),
        (8, 128, 5, 17, 384, false),
        (2, 32, 2, 50, 192, false),
        (2, 64, 1, 9, 64, true),
        (6, 32, 3, 21, 192, true),
        (6, 64, 1, 40, 128, false),
        (6, 128, 5, 7, 256, true),
        (3, 64, 2, 19, 192, false),
        (3, 128, 1, 11, 256, true),
    ]
    .iter()
    .enumerate()
    {
        let (_, wf) = host_matrix(n, k, base + 10 * i as u64);
        let (xh, x) = host_matrix(rows, k, base + 10 * i as u64 + 1);
        let (w, mut s, mut b) = quantize(&wf, group as i32, bits as i32).unwrap();
        if f16 {
            s = s.as_dtype(Dtype::Float16).unwrap();
            b = b.as_dtype(Dtype::Float16).unwrap();
        }
        let deq = to_vec(&dequantize(&w, f32(&s), &f32(&b), group as i32, bits as i32).unwrap());
        let y = to_vec(&quantized_matvec(&x, &w, &s, &b, group as i32, bits as i32).unwrap());
        assert_eq!(y.len(), rows * n);
        for m in 0..rows {
            for r in 0..n {
                let (mut want, mut mag) = (0.0f64, 0.0f64);
                for e in 0..k {
                    let p = xh[m * k + e] as f64 * deq[r * k + e] as f64;
                    want += p;
                    mag += p.abs();
                }
                let got = y[m * n + r] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * mag + 1e-6,
                    "bits {bits} group {group} row {m} col {r}: {got} vs {want} (sum |x w| {mag})"
                );
            }
        }
    }
}

/// Our dequantization (prefill's route to BLAS) against MLX's over the same packed matrix: the
/// same `scale * code + bias` per element in natural order, so the only difference allowed is
/// one f32 rounding (our kernel fuses the multiply-add): 2^-23 of |scale * code| + |bias|.
#[test]
fn dequantize_matches_mlx_element_for_element() {
    let base = seed();
    for (i, &(bits, group, n, k, f16)) in
        [
            (4u8, 32usize, 96usize, 576usize, false),
            (4, 64, 40, 256, true),
            (8, 32, 33, 128, true),
            (8, 128, 17, 384, false),
            (2, 32, 50, 192, false),
            (2, 64, 9, 64, true),
            (6, 32, 21, 192, true),
            (6, 64, 13, 64, false),
            (3, 64, 11, 192, true),
        ]
            .iter()
            .enumerate()
    {
        let (_, wf) = host_matrix(n, k, base + 20 * i as u64);
        let (w, mut s, mut b) = quantize(&wf, group as i32, bits as i32).unwrap();
        if f16 {
            s = s.as_dtype(Dtype::Float16).unwrap();
            b = b.as_dtype(Dtype::Float16).unwrap();
        }
        let want = to_vec(&dequantize(&w, f32(&s), &f32(&b), group as i32, bits as i32).unwrap());
        let got = our_dequantize(&w, &s, &b, group as i32, bits as i32).unwrap();
        assert_eq!(got.shape(), &[n as i32, k as i32]);
        let (got, sv, bv) = (to_vec(&got), to_vec(&f32(&s)), to_vec(&f32(&b)));
        for r in 0..n {
            for e in 0..k {
                let (sc, bi) = (sv[r * (k / group) + e / group].abs(), bv[r * (k / group) + e / group].abs());
                let bound = f32::EPSILON * (sc * ((1u32 << bits) - 1) as f32 + bi);
                let (g, w) = (got[r * k + e], want[r * k + e]);
                assert!((g - w).abs() <= bound, "bits {bits} group {group} row {r} elem {e}: {g} vs {w}");
            }
        }
    }
    let (_, wf) = host_matrix(8, 64, 1);
    let (w, s, b) = quantize(&wf, 32, 4).unwrap();
    let err = our_dequantize(&w, &s, &b, 32, 5).unwrap_err().to_string();
    assert!(err.contains("bits must be 2, 3, 4, 6 or 8"), "{err}");
}

/// A whole cache buffer of `cap` tokens whose tokens from `len` on are huge: a kernel that read
/// past `len` would be dominated by them.
fn poisoned_cache(h: &Host, cap: usize, group: usize, bits: u8, f16: bool) -> (Packed, Host) {
    let [b, hk, len, d] = h.shape;
    let tail = Array::from_slice(&vec![1.0e4f32; b * hk * (cap - len) * d], &[b as i32, hk as i32, (cap - len) as i32, d as i32]);
    let full = concatenate(&[h.array(), tail], 2).unwrap();
    let (w, mut s, mut bi) = quantize(&full, group as i32, bits as i32).unwrap();
    if f16 {
        s = s.as_dtype(Dtype::Float16).unwrap();
        bi = bi.as_dtype(Dtype::Float16).unwrap();
    }
    let deq = dequantize(&w, f32(&s), &f32(&bi), group as i32, bits as i32).unwrap();
    let deq = Host { data: to_vec(&deq), shape: [b, hk, cap, d] }.tokens(0, len);
    (Packed { w, scales: s, biases: bi }, deq)
}

/// One random case: (hq, hkv, l, d, len, cap, k bits/group, v bits/group, f16 scales).
type Case = (usize, usize, usize, usize, usize, usize, (u8, usize), (u8, usize), bool);

/// Runs `attend` (scaled queries, packed keys and values, len) on each case's random cache
/// (tokens past `len` poisoned) and checks it against float64 attention over the dequantized
/// values, all queries seeing every token or (`causal`) the chunk's own causal prefix. Bound:
/// f32 sums and the polynomial exp over the same values. `before(i)` runs ahead of case i.
fn check_cases(cases: &[Case], base: u64, causal: bool, mut before: impl FnMut(usize), attend: impl Fn(&Array, PackedOperand, PackedOperand, usize) -> Array) {
    for (i, &(hq, hkv, l, d, len, cap, (kb, kg), (vb, vg), f16)) in cases.iter().enumerate() {
        before(i);
        let s = base + 100 * i as u64;
        let scale = 1.0 / (d as f64).sqrt();
        let q = Host::random([1, hq, l, d], s);
        let (kp, kd) = poisoned_cache(&Host::random([1, hkv, len, d], s + 1), cap, kg, kb, f16);
        let (vp, vd) = poisoned_cache(&Host::random([1, hkv, len, d], s + 2), cap, vg, vb, f16);
        let qs = q.array() * Array::from_f32(scale as f32);
        let got = attend(&qs, PackedOperand { full: &kp, bits: kb, group: kg }, PackedOperand { full: &vp, bits: vb, group: vg }, len);
        assert_eq!(got.shape(), &[1, hq as i32, l as i32, d as i32]);
        let want = if causal {
            reference_attention(&q, &kd, &vd, scale, &|qpos, t| t <= qpos)
        } else {
            reference_attention(&q, &kd, &vd, scale, &|_, _| true)
        };
        let err = max_abs_diff(&to_vec(&got), &want);
        let bound = 2e-5 * vd.max_abs().max(1.0);
        assert!(err <= bound, "case {i} (k{kb}/g{kg} v{vb}/g{vg}, l {l}, len {len}, causal {causal}): max error {err} > {bound}");
    }
}

#[test]
fn decode_attention_matches_float64_over_the_dequantized_cache() {
    let cases: [Case; 9] = [
        (9, 3, 1, 64, 4096, 4200, (8, 64), (4, 64), true),
        (4, 2, 1, 128, 777, 800, (8, 64), (4, 32), false),
        (8, 8, 1, 64, 33, 40, (4, 32), (2, 64), true),
        (6, 1, 2, 128, 300, 300, (2, 64), (8, 128), false),
        (3, 3, 1, 128, 1, 16, (8, 128), (8, 64), true),
        (9, 3, 1, 64, 1000, 1024, (6, 64), (6, 32), true),
        (4, 2, 2, 128, 515, 600, (6, 128), (4, 64), false),
        (4, 1, 1, 256, 300, 320, (8, 128), (3, 64), true),
        (2, 2, 1, 64, 70, 80, (3, 64), (6, 64), false),
    ];
    check_cases(&cases, seed(), false, |_| {}, |q, k, v, len| decode_attention(q, k, v, len).unwrap());
}

/// The causal prefill primitive: query i of a chunk of L sees tokens 0..=len - L + i, tiles of
/// 16 query tokens cut the chunk (L not a multiple of 16 included), and rows from the depth
/// before the chunk cross several 256-token key blocks; head_dim 64-256, blocks not a multiple
/// of 8 tokens (padding masked). Same bound as decode, the merge of a tile's blocks included.
/// Cases alternate between the AVX2 and the baseline build.
#[test]
fn prefill_attention_is_causal_and_matches_float64() {
    let _options = options_lock();
    use mlx_ext::{CpuBuild, EngineOptions};
    let base = seed();
    let cases: [Case; 6] = [
        (9, 3, 64, 64, 600, 640, (8, 64), (4, 64), true),
        (4, 2, 37, 128, 37, 48, (8, 64), (4, 32), false),
        (8, 8, 5, 64, 300, 320, (4, 32), (2, 64), true),
        (6, 1, 20, 128, 1030, 1040, (2, 64), (8, 128), false),
        (4, 1, 17, 256, 100, 128, (8, 128), (3, 64), true),
        (9, 3, 1, 64, 50, 64, (6, 64), (6, 32), false),
    ];
    let install = |i: usize| {
        let build = if i.is_multiple_of(2) { CpuBuild::Auto } else { CpuBuild::Generic };
        mlx_ext::options::install(EngineOptions { cpu_build: build, ..EngineOptions::default() }).unwrap();
    };
    check_cases(&cases, base, true, install, |q, k, v, len| mlx_ext::cpu::prefill_attention(q, k.as_ref(), v.as_ref(), len, None).unwrap());
    mlx_ext::options::install(EngineOptions::default()).unwrap();
    // The block path (MLX ops and BLAS) computes the same causal attention, for a 512-token
    // chunk at depth 0 with a strided query and outlier channels (both f32 over the same codes).
    {
        use mlx_kv::attention::{Mask, Segment, Tensor};
        use mlx_kv::store::TokenAxis;
        let (hq, hkv, l, d, len, cap) = (9, 3, 512, 64, 512, 520);
        // Outlier channels, as real keys have, make some rows' softmax peaked.
        let spiky = |mut h: Host, k: f32| {
            for (i, x) in h.data.iter_mut().enumerate() {
                if i % 64 == 3 {
                    *x *= k;
                }
            }
            h
        };
        // Laid out [B, L, Hq, D] and viewed as [B, Hq, L, D], as the model hands it over.
        let q = spiky(Host::random([1, l, hq, d], base + 7), 8.0).array().swap_axes(1, 2).unwrap();
        let (kp, _) = poisoned_cache(&spiky(Host::random([1, hkv, len, d], base + 8), 8.0), cap, 64, 8, true);
        let (vp, _) = poisoned_cache(&spiky(Host::random([1, hkv, len, d], base + 9), 8.0), cap, 64, 4, true);
        let slice = |p: &Packed| Packed { w: p.w.index((.., .., ..len as i32, ..)), scales: p.scales.index((.., .., ..len as i32, ..)), biases: p.biases.index((.., .., ..len as i32, ..)) };
        let clone = |p: &Packed| Packed { w: p.w.clone(), scales: p.scales.clone(), biases: p.biases.clone() };
        let seg = Segment {
            k: Tensor::Quant { p: slice(&kp), bits: 8, group: 64, axis: TokenAxis::Rows, full: Some((clone(&kp), cap)) },
            v: Tensor::Quant { p: slice(&vp), bits: 4, group: 64, axis: TokenAxis::Rows, full: Some((clone(&vp), cap)) },
            len,
        };
        let scale = 0.125;
        let blocks = to_vec(&mlx_kv::attention::cpu::blocks(&q, std::slice::from_ref(&seg), &Mask::Causal, scale.into(), None).unwrap());
        let ours = mlx_kv::attention::cpu::primitive_prefill(
            &q,
            PackedOperand { full: &kp, bits: 8, group: 64 },
            PackedOperand { full: &vp, bits: 4, group: 64 },
            len,
            scale.into(),
        )
        .unwrap();
        let ours: Vec<f64> = to_vec(&ours).iter().map(|&x| x as f64).collect();
        let err = max_abs_diff(&blocks, &ours);
        assert!(err <= 1e-4, "block path and prefill primitive differ by {err}");
    }
    // A chunk longer than the tokens written cannot hold its own keys.
    let q = Array::ones::<f32>(&[1, 2, 8, 64]).unwrap();
    let (kp, _) = poisoned_cache(&Host::random([1, 2, 4, 64], 1), 16, 64, 8, false);
    let op = PackedOperand { full: &kp, bits: 8, group: 64 };
    let err = mlx_ext::cpu::prefill_attention(&q, op.as_ref(), op.as_ref(), 4, None).unwrap_err().to_string();
    assert!(err.contains("causal chunk of 8 queries"), "{err}");
}

/// `poisoned_cache` for per-channel keys, packed as `QuantStore` packs them: each head's K^T
/// `[D, cap]` quantized along tokens (`[B, H, D, cap*bits/32]`, scales `[B, H, D, cap/group]`).
/// `len` is a whole number of groups, so the poisoned tokens have groups of their own.
fn poisoned_channels(h: &Host, cap: usize, group: usize, bits: u8, f16: bool) -> (Packed, Host) {
    let [b, hk, len, d] = h.shape;
    let tail = Array::from_slice(&vec![1.0e4f32; b * hk * (cap - len) * d], &[b as i32, hk as i32, (cap - len) as i32, d as i32]);
    let kt = concatenate(&[h.array(), tail], 2).unwrap().swap_axes(2, 3).unwrap().contiguous().unwrap();
    let (w, mut s, mut bi) = quantize(&kt, group as i32, bits as i32).unwrap();
    assert_eq!(w.shape(), &[b as i32, hk as i32, d as i32, (cap * bits as usize / 32) as i32]);
    if f16 {
        s = s.as_dtype(Dtype::Float16).unwrap();
        bi = bi.as_dtype(Dtype::Float16).unwrap();
    }
    let deq = dequantize(&w, f32(&s), &f32(&bi), group as i32, bits as i32).unwrap().swap_axes(2, 3).unwrap();
    let deq = Host { data: to_vec(&deq), shape: [b, hk, cap, d] }.tokens(0, len);
    (Packed { w, scales: s, biases: bi }, deq)
}

fn concat_tokens(a: &Host, b: &Host) -> Host {
    let c = concatenate(&[a.array(), b.array()], 2).unwrap();
    Host { data: to_vec(&c), shape: [a.shape[0], a.shape[1], a.shape[2] + b.shape[2], a.shape[3]] }
}

/// Per-channel keys (and a float tail after them) against float64 over the same dequantized
/// keys and values: as the per-token case, only f32 summation order and the exp differ.
#[test]
fn decode_attention_reads_per_channel_keys_and_a_float_tail() {
    let _options = options_lock();
    use mlx_ext::cpu::{decode_attention_with, KeyAxis};
    let base = seed();
    // (hq, hkv, l, d, len, cap, k bits/group (tokens), v bits/group, f16, tail tokens)
    let cases = [
        (9, 3, 1, 64, 4096, 4352, (4u8, 64usize), (4u8, 64usize), true, 17),
        (4, 2, 1, 128, 768, 1024, (2, 32), (8, 64), false, 0),
        (8, 8, 1, 64, 32, 256, (8, 32), (2, 32), true, 1),
        (6, 1, 2, 128, 384, 512, (6, 64), (6, 32), false, 40),
        (4, 2, 1, 64, 640, 768, (3, 64), (4, 32), true, 63),
        (4, 1, 1, 64, 1024, 1024, (6, 32), (3, 64), true, 5),
        (3, 3, 1, 128, 256, 256, (8, 128), (4, 128), false, 0),
        (2, 2, 1, 64, 192, 256, (3, 64), (8, 64), false, 200),
    ];
    use mlx_ext::{CpuBuild, EngineOptions};
    // Both builds of the kernels (other tests' bounds hold for either meanwhile).
    for (i, &(hq, hkv, l, d, len, cap, (kb, kg), (vb, vg), f16, n_tail)) in cases.iter().enumerate() {
        let build = if i % 2 == 0 { CpuBuild::Generic } else { CpuBuild::Auto };
        mlx_ext::options::install(EngineOptions { cpu_build: build, ..EngineOptions::default() }).unwrap();
        let s = base + 100 * i as u64;
        let scale = 1.0 / (d as f64).sqrt();
        let q = Host::random([1, hq, l, d], s);
        let (kp, kd) = poisoned_channels(&Host::random([1, hkv, len, d], s + 1), cap, kg, kb, f16);
        let (vp, vd) = poisoned_cache(&Host::random([1, hkv, len, d], s + 2), cap, vg, vb, f16);
        // The tail as the cache hands it over: a token slice of a larger buffer (strided heads).
        let tk_buf = Host::random([1, hkv, n_tail + 3, d], s + 3);
        let tv_buf = Host::random([1, hkv, n_tail + 3, d], s + 4);
        let (tk, tv) = (tk_buf.tokens(1, n_tail + 1), tv_buf.tokens(1, n_tail + 1));
        let view = |a: &Host| a.array().index((.., .., 1..(n_tail + 1) as i32, ..));
        let (tka, tva) = (view(&tk_buf), view(&tv_buf));
        let qs = q.array() * Array::from_f32(scale as f32);
        let got = decode_attention_with(
            &qs,
            PackedOperand { full: &kp, bits: kb, group: kg }.as_ref(),
            PackedOperand { full: &vp, bits: vb, group: vg }.as_ref(),
            len,
            KeyAxis::Channels,
            (n_tail > 0).then_some((&tka, &tva)),
            None,
        )
        .unwrap();
        assert_eq!(got.shape(), &[1, hq as i32, l as i32, d as i32]);
        let got = to_vec(&got);
        let (kr, vr) = if n_tail > 0 { (concat_tokens(&kd, &tk), concat_tokens(&vd, &tv)) } else { (kd, vd) };
        let want = reference_attention(&q, &kr, &vr, scale, &|_, _| true);
        let err = max_abs_diff(&got, &want);
        let bound = 2e-5 * vr.max_abs().max(1.0);
        assert!(err <= bound, "case {i} {build:?} (per-channel k{kb}/g{kg} v{vb}/g{vg}, len {len}, tail {n_tail}): max error {err} > {bound}");
    }
    mlx_ext::options::install(EngineOptions::default()).unwrap();
    // A length that cuts a key group cannot be read.
    let (kp, _) = poisoned_channels(&Host::random([1, 1, 64, 64], 5), 256, 64, 4, true);
    let (vp, _) = poisoned_cache(&Host::random([1, 1, 64, 64], 6), 256, 64, 4, true);
    let q = Array::ones::<f32>(&[1, 2, 1, 64]).unwrap();
    let k = PackedOperand { full: &kp, bits: 4, group: 64 }.as_ref();
    let v = PackedOperand { full: &vp, bits: 4, group: 64 }.as_ref();
    let err = decode_attention_with(&q, k, v, 40, KeyAxis::Channels, None, None).unwrap_err().to_string();
    assert!(err.contains("whole groups of 64 tokens"), "{err}");
}

/// Per-channel keys over body slot ranges (a rotating cache's visible ring runs): a range may
/// start inside a key group, whose older tokens are masked; slots outside every range are never
/// read. Their values are poisoned (1e4; values are quantized per token, so the poison does not
/// touch the visible tokens' codes), so reading one would dominate the output.
#[test]
fn decode_attention_reads_ring_runs_and_masks_a_partial_first_group() {
    let _options = options_lock();
    use mlx_ext::cpu::decode_attention_ranges;
    let base = seed();
    // (hq, hkv, d, slots, k bits/group, v bits/group, ranges, tail)
    type RingCase = (usize, usize, usize, usize, (u8, usize), (u8, usize), &'static [(usize, usize)], usize);
    let cases: [RingCase; 4] = [
        (9, 3, 64, 1024, (6, 64), (6, 64), &[(837, 1024), (0, 320)], 17),
        (4, 2, 128, 256, (4, 32), (8, 64), &[(5, 96)], 0),
        (4, 1, 64, 512, (3, 64), (4, 32), &[(448, 512), (1, 64)], 3),
        (8, 8, 64, 256, (8, 128), (2, 32), &[(0, 256)], 1),
    ];
    for (i, &(hq, hkv, d, slots, (kb, kg), (vb, vg), ranges, n_tail)) in cases.iter().enumerate() {
        let s = base + 100 * i as u64;
        let scale = 1.0 / (d as f64).sqrt();
        let q = Host::random([1, hq, 1, d], s);
        let (kp, kd) = poisoned_channels(&Host::random([1, hkv, slots, d], s + 1), slots, kg, kb, true);
        let mut vh = Host::random([1, hkv, slots, d], s + 2);
        let read = |t: usize| ranges.iter().any(|&(a, b)| (a..b).contains(&t));
        for h in 0..hkv {
            for t in (0..slots).filter(|&t| !read(t)) {
                vh.data[(h * slots + t) * d..(h * slots + t + 1) * d].fill(1.0e4);
            }
        }
        let (vp, vd) = poisoned_cache(&vh, slots, vg, vb, true);
        let tk = Host::random([1, hkv, n_tail.max(1), d], s + 3).tokens(0, n_tail);
        let tv = Host::random([1, hkv, n_tail.max(1), d], s + 4).tokens(0, n_tail);
        let (tka, tva) = (tk.array(), tv.array());
        let qs = q.array() * Array::from_f32(scale as f32);
        let kop = PackedOperand { full: &kp, bits: kb, group: kg };
        let vop = PackedOperand { full: &vp, bits: vb, group: vg };
        let got = decode_attention_ranges(&qs, kop.as_ref(), vop.as_ref(), slots, mlx_ext::cpu::KeyAxis::Channels, ranges, (n_tail > 0).then_some((&tka, &tva)), None).unwrap();
        // The reference sees only the ranges' tokens, then the tail.
        let pick = |h: &Host| {
            let mut data = Vec::new();
            for x in 0..hkv {
                for &(a, b) in ranges {
                    data.extend_from_slice(&h.data[(x * slots + a) * d..(x * slots + b) * d]);
                }
            }
            Host { data, shape: [1, hkv, ranges.iter().map(|(a, b)| b - a).sum(), d] }
        };
        let (kr, vr) = (pick(&kd), pick(&vd));
        let (kr, vr) = if n_tail > 0 { (concat_tokens(&kr, &tk), concat_tokens(&vr, &tv)) } else { (kr, vr) };
        let want = reference_attention(&q, &kr, &vr, scale, &|_, _| true);
        let err = max_abs_diff(&to_vec(&got), &want);
        let bound = 2e-5 * vr.max_abs().max(1.0);
        assert!(err <= bound, "case {i} (ranges {ranges:?}): max error {err} > {bound}");
    }
    // A range that does not end on a key group is refused by name.
    let (kp, _) = poisoned_channels(&Host::random([1, 1, 128, 64], 5), 128, 64, 4, true);
    let (vp, _) = poisoned_cache(&Host::random([1, 1, 128, 64], 6), 128, 64, 4, true);
    let op = |p| PackedOperand { full: p, bits: 4, group: 64 };
    let q = Array::ones::<f32>(&[1, 2, 1, 64]).unwrap();
    let err = decode_attention_ranges(&q, op(&kp).as_ref(), op(&vp).as_ref(), 128, mlx_ext::cpu::KeyAxis::Channels, &[(10, 100)], None, None).unwrap_err().to_string();
    assert!(err.contains("body range 10..100") && err.contains("key group of 64"), "{err}");
}

/// The CPU decode step writes the new token's codes, scales and biases into row `slot` exactly
/// as MLX's `quantize` (then f16) gives them, leaves every other row alone, and attends exactly
/// as the decode primitive does over the first `slot + 1` rows afterwards.
#[test]
fn decode_step_writes_mlx_codes_in_place_and_attends_like_the_primitive() {
    let _options = options_lock();
    use mlx_ext::cpu::decode_step;
    let base = seed();
    // (hq, hkv, d, slot, cap, k bits/group, v bits/group, f16 scales)
    let cases = [
        (9, 3, 64, 300, 512, (8u8, 64usize), (4u8, 64usize), true),
        (4, 2, 128, 0, 256, (6, 64), (3, 64), true),
        (8, 8, 64, 255, 256, (4, 32), (2, 64), false),
        (4, 1, 256, 17, 256, (3, 128), (6, 64), true),
    ];
    for (i, &(hq, hkv, d, slot, cap, (kb, kg), (vb, vg), f16)) in cases.iter().enumerate() {
        let s = base + 100 * i as u64;
        let (kp, _) = poisoned_cache(&Host::random([1, hkv, slot.max(1), d], s + 1), cap, kg, kb, f16);
        let (vp, _) = poisoned_cache(&Host::random([1, hkv, slot.max(1), d], s + 2), cap, vg, vb, f16);
        let before = |p: &Packed| [to_u32(&p.w), to_bits(&p.scales), to_bits(&p.biases)];
        let (k0, v0) = (before(&kp), before(&vp));
        let kn = Host::random([1, hkv, 1, d], s + 3).array() * Array::from_f32(3.0);
        let vn = Host::random([1, hkv, 1, d], s + 4).array();
        let q = Host::random([1, hq, 1, d], s + 5).array() * Array::from_f32(1.0 / (d as f32).sqrt());
        let kop = PackedOperand { full: &kp, bits: kb, group: kg };
        let vop = PackedOperand { full: &vp, bits: vb, group: vg };
        let got = decode_step(&q, &kn, &vn, kop.as_ref(), vop.as_ref(), slot, None).unwrap();
        got.eval().unwrap();
        for (p, old, x, bits, group) in [(&kp, &k0, &kn, kb, kg), (&vp, &v0, &vn, vb, vg)] {
            let (w, sc, bi) = quantize(x, group as i32, bits as i32).unwrap();
            let dt = if f16 { Dtype::Float16 } else { Dtype::Float32 };
            let want = [to_u32(&w), to_bits(&sc.as_dtype(dt).unwrap()), to_bits(&bi.as_dtype(dt).unwrap())];
            let now = before(p);
            for (j, name) in ["codes", "scales", "biases"].iter().enumerate() {
                let per_row = want[j].len() / hkv;
                for h in 0..hkv {
                    let row = |v: &Vec<u32>, t: usize| v[(h * cap + t) * per_row..(h * cap + t + 1) * per_row].to_vec();
                    assert_eq!(row(&now[j], slot), want[j][h * per_row..(h + 1) * per_row].to_vec(), "case {i}: {name} of head {h} differ from MLX's quantize");
                    for t in [0, slot.saturating_sub(1), (slot + 1).min(cap - 1)] {
                        if t != slot {
                            assert_eq!(row(&now[j], t), row(&old[j], t), "case {i}: {name} row {t} changed");
                        }
                    }
                }
            }
        }
        let want = decode_attention(&q, kop, vop, slot + 1).unwrap();
        assert_eq!(to_vec(&got), to_vec(&want), "case {i}: the step attends as the primitive does");
    }
    let (kp, _) = poisoned_cache(&Host::random([1, 1, 4, 64], 9), 8, 64, 8, true);
    let x = Array::zeros::<f32>(&[1, 1, 1, 64]).unwrap();
    let op = PackedOperand { full: &kp, bits: 8, group: 64 };
    let err = decode_step(&Array::zeros::<f32>(&[1, 2, 1, 64]).unwrap(), &x, &x, op.as_ref(), op.as_ref(), 8, None).unwrap_err().to_string();
    assert!(err.contains("slot 8 outside 0..7"), "{err}");
}

/// `x H / sqrt(n)` for each row of `n` values, H the Sylvester Hadamard matrix (entry i, j is
/// -1 to the popcount of i & j), in f64: the frame `--kv-rotate` stores.
fn hadamard_rows(x: &[f64], n: usize) -> Vec<f64> {
    let s = 1.0 / (n as f64).sqrt();
    x.chunks(n).flat_map(|r| (0..n).map(move |j| (0..n).map(|i| if (i & j).count_ones() % 2 == 0 { r[i] } else { -r[i] }).sum::<f64>() * s)).collect()
}

fn host_f64(h: &Host) -> Vec<f64> {
    h.data.iter().map(|&x| x as f64).collect()
}

/// The per-channel decode step writes the new token (rotated into the stored frame where `rot`
/// says) into row `row` of the tail buffers, rounded to their dtype, leaves every other row
/// alone, and attends over sinks, packed body and tail rows `0..=row` as float64 attention over
/// the same stored values does in the keys' frame, its output rotated back from the values'
/// frame. Rounding of the written row: one f16 rounding (2^-11 relative) where the tail is 16-bit,
/// plus f32 sums of D terms.
#[test]
fn channel_step_writes_the_tail_row_and_attends_in_the_stored_frame() {
    let _options = options_lock();
    use mlx_ext::cpu::{channel_decode_step, ChannelBody, ChannelFloats};
    let base = seed();
    // (hq, hkv, d, len, cap, key bits/group (tokens), value bits/group, row, tail cap, f16 tail, sinks, f16 sinks, rot)
    let cases = [
        (9, 3, 64, 4096, 4352, (6u8, 64usize), (6u8, 64usize), 17, 64, true, 1, false, 3u8),
        (9, 3, 64, 128, 256, (6, 128), (6, 64), 0, 128, true, 1, true, 2),
        (4, 2, 128, 256, 256, (8, 64), (4, 32), 63, 64, false, 0, false, 1),
        (6, 1, 64, 0, 256, (4, 64), (8, 64), 5, 16, true, 4, false, 0),
        (4, 4, 128, 512, 768, (3, 64), (2, 32), 31, 64, false, 2, true, 3),
    ];
    for (i, &(hq, hkv, d, len, cap, (kb, kg), (vb, vg), row, tcap, t16, ns, s16, rot)) in cases.iter().enumerate() {
        let s = base + 100 * i as u64;
        let scale = 1.0 / (d as f64).sqrt();
        let (kp, kd) = poisoned_channels(&Host::random([1, hkv, len, d], s + 1), cap, kg, kb, false);
        let (vp, vd) = poisoned_cache(&Host::random([1, hkv, len, d], s + 2), cap, vg, vb, true);
        let tdt = if t16 { Dtype::Float16 } else { Dtype::Float32 };
        // Tail rows past `row` are poisoned: the step must not read them.
        let poison = |h: Host| {
            let mut h = h;
            let [_, hh, tt, dd] = h.shape;
            for x in 0..hh {
                for t in row + 1..tt {
                    h.data[(x * tt + t) * dd..(x * tt + t + 1) * dd].fill(1.0e4);
                }
            }
            h
        };
        let (tk0, tv0) = (poison(Host::random([1, hkv, tcap, d], s + 3)), poison(Host::random([1, hkv, tcap, d], s + 4)));
        let (tk, tv) = (tk0.array().as_dtype(tdt).unwrap(), tv0.array().as_dtype(tdt).unwrap());
        tk.eval().unwrap();
        tv.eval().unwrap();
        let (tk_before, tv_before) = (to_vec(&tk), to_vec(&tv));
        let sdt = if s16 { Dtype::Float16 } else { Dtype::Float32 };
        let (sk, sv) = (Host::random([1, hkv, ns.max(1), d], s + 5), Host::random([1, hkv, ns.max(1), d], s + 6));
        let (ska, sva) = (sk.array().as_dtype(sdt).unwrap(), sv.array().as_dtype(sdt).unwrap());
        let (kn, vn, q) = (Host::random([1, hkv, 1, d], s + 7), Host::random([1, hkv, 1, d], s + 8), Host::random([1, hq, 1, d], s + 9));
        let qs = q.array() * Array::from_f32(scale as f32);
        let floats = ChannelFloats { tail: (&tk, &tv), row, sinks: (ns > 0).then_some((&ska, &sva)) };
        let kop = PackedOperand { full: &kp, bits: kb, group: kg };
        let vop = PackedOperand { full: &vp, bits: vb, group: vg };
        let got = channel_decode_step(&qs, &kn.array(), &vn.array(), kop.as_ref(), vop.as_ref(), ChannelBody { len, ranges: &[] }, floats, rot, None).unwrap();
        got.eval().unwrap();
        let (tk_after, tv_after) = (to_vec(&tk), to_vec(&tv));
        // The written rows: the new token in the stored frame, one rounding to the tail's dtype.
        let frame = |x: &Host, on: bool| if on { hadamard_rows(&host_f64(x), d) } else { host_f64(x) };
        let (kf, vf) = (frame(&kn, rot & 1 != 0), frame(&vn, rot & 2 != 0));
        for (after, before, want, name) in [(&tk_after, &tk_before, &kf, "key"), (&tv_after, &tv_before, &vf, "value")] {
            for h in 0..hkv {
                for t in 0..tcap {
                    let at = (h * tcap + t) * d;
                    if t == row {
                        for e in 0..d {
                            let (g, w) = (after[at + e] as f64, want[h * d + e]);
                            let bound = if t16 { w.abs() * 2f64.powi(-11) } else { 0.0 } + 1e-6 * (1.0 + w.abs());
                            assert!((g - w).abs() <= bound, "case {i}: {name} row {row} head {h} elem {e}: {g} vs {w}");
                        }
                    } else {
                        assert_eq!(after[at..at + d], before[at..at + d], "case {i}: {name} tail row {t} of head {h} changed");
                    }
                }
            }
        }
        // Attention in the stored frame over what the cache holds: sinks, body, tail 0..=row.
        let stored = |data: Vec<f32>, n: usize| Host { data, shape: [1, hkv, n, d] };
        let tail_k = stored(tk_after.clone(), tcap).tokens(0, row + 1);
        let tail_v = stored(tv_after.clone(), tcap).tokens(0, row + 1);
        let (sk_s, sv_s) = (stored(to_vec(&ska), ns.max(1)).tokens(0, ns), stored(to_vec(&sva), ns.max(1)).tokens(0, ns));
        let join = |parts: [&Host; 3]| {
            let mut data = Vec::new();
            for h in 0..hkv {
                for p in parts {
                    let n = p.shape[2];
                    data.extend_from_slice(&p.data[h * n * d..(h + 1) * n * d]);
                }
            }
            Host { data, shape: [1, hkv, parts.iter().map(|p| p.shape[2]).sum(), d] }
        };
        let (kr, vr) = (join([&sk_s, &kd, &tail_k]), join([&sv_s, &vd, &tail_v]));
        let qr = if rot & 1 != 0 { Host { data: hadamard_rows(&host_f64(&q), d).iter().map(|&x| x as f32).collect(), shape: q.shape } } else { Host { data: q.data.clone(), shape: q.shape } };
        let mut want = reference_attention(&qr, &kr, &vr, scale, &|_, _| true);
        if rot & 2 != 0 {
            want = hadamard_rows(&want, d);
        }
        let err = max_abs_diff(&to_vec(&got), &want);
        // The rotated query enters the reference rounded to f32 (a few ulps of |q|, times the
        // scores' sum over |k|), on top of the f32 sums every primitive's bound allows.
        let bound = 2e-5 * vr.max_abs().max(1.0) * if rot != 0 { 4.0 } else { 1.0 };
        assert!(err <= bound, "case {i} (k{kb}/g{kg} v{vb}/g{vg}, len {len}, row {row}, sinks {ns}, rot {rot}): max error {err} > {bound}");
    }
    // A row past the tail's capacity is an error naming it.
    let (kp, _) = poisoned_channels(&Host::random([1, 1, 64, 64], 5), 256, 64, 4, true);
    let (vp, _) = poisoned_cache(&Host::random([1, 1, 64, 64], 6), 256, 64, 4, true);
    let x = Array::zeros::<f32>(&[1, 1, 1, 64]).unwrap();
    let t = Array::zeros::<f32>(&[1, 1, 16, 64]).unwrap();
    let op = |p| PackedOperand { full: p, bits: 4, group: 64 };
    let floats = ChannelFloats { tail: (&t, &t), row: 16, sinks: None };
    let err = channel_decode_step(&Array::zeros::<f32>(&[1, 2, 1, 64]).unwrap(), &x, &x, op(&kp).as_ref(), op(&vp).as_ref(), ChannelBody { len: 64, ranges: &[] }, floats, 0, None).unwrap_err().to_string();
    assert!(err.contains("tail row 16 outside 0..15"), "{err}");
}

fn to_u32(a: &Array) -> Vec<u32> {
    a.as_slice::<u32>().to_vec()
}

/// Scales or biases as bit patterns, so equality is exact whatever the dtype.
fn to_bits(a: &Array) -> Vec<u32> {
    match a.dtype() {
        Dtype::Float16 => a.view::<u16>().unwrap().as_slice::<u16>().iter().map(|&x| x as u32).collect(),
        _ => a.as_slice::<f32>().iter().map(|x| x.to_bits()).collect(),
    }
}

/// A 16-bit dense cache read in place: float64 attention over the same f16 values (the kernel
/// widens them exactly), so only f32 summation order and the exp differ, as for packed caches.
/// Tokens past `len` are huge, and the cache is a token slice of a larger buffer (strided heads).
#[test]
fn dense_decode_attention_reads_a_16_bit_cache_in_place() {
    let _options = options_lock();
    use mlx_ext::cpu::dense_decode_attention;
    use mlx_ext::{CpuBuild, EngineOptions};
    let base = seed();
    // (hq, hkv, l, d, len, cap)
    let cases = [(9, 3, 1, 64, 4096, 4352), (4, 2, 1, 128, 777, 800), (8, 8, 1, 64, 1, 16), (6, 1, 2, 256, 300, 512), (2, 2, 1, 72, 70, 80)];
    for (i, &(hq, hkv, l, d, len, cap)) in cases.iter().enumerate() {
        let build = if i % 2 == 0 { CpuBuild::Generic } else { CpuBuild::Auto };
        mlx_ext::options::install(EngineOptions { cpu_build: build, ..EngineOptions::default() }).unwrap();
        let s = base + 100 * i as u64;
        let scale = 1.0 / (d as f64).sqrt();
        let q = Host::random([1, hq, l, d], s);
        let half = |h: &Host| {
            let poison = Array::from_slice(&vec![1.0e4f32; hkv * (cap - len) * d], &[1, hkv as i32, (cap - len) as i32, d as i32]);
            let full = concatenate(&[h.array(), poison], 2).unwrap().as_dtype(Dtype::Float16).unwrap();
            let exact = Host { data: to_vec(&full.as_dtype(Dtype::Float32).unwrap()), shape: [1, hkv, cap, d] }.tokens(0, len);
            (full, exact)
        };
        let (k, kd) = half(&Host::random([1, hkv, len, d], s + 1));
        let (v, vd) = half(&Host::random([1, hkv, len, d], s + 2));
        let qs = q.array() * Array::from_f32(scale as f32);
        let got = dense_decode_attention(&qs, &k, &v, len, None).unwrap();
        assert_eq!(got.shape(), &[1, hq as i32, l as i32, d as i32]);
        let want = reference_attention(&q, &kd, &vd, scale, &|_, _| true);
        let err = max_abs_diff(&to_vec(&got), &want);
        let bound = 2e-5 * vd.max_abs().max(1.0);
        assert!(err <= bound, "case {i} {build:?} (dense f16, d {d}, len {len}): max error {err} > {bound}");
        // The same cache read by a causal prefill chunk of its last tokens (d 72: the 8-wide tail).
        let lc = (len / 3).clamp(1, 40);
        let qc = Host::random([1, hq, lc, d], s + 3);
        let got = mlx_ext::cpu::dense_prefill_attention(&(qc.array() * Array::from_f32(scale as f32)), &k, &v, len, None).unwrap();
        let want = reference_attention(&qc, &kd, &vd, scale, &|qpos, t| t <= qpos);
        let err = max_abs_diff(&to_vec(&got), &want);
        assert!(err <= bound, "case {i} {build:?} (dense f16 prefill of {lc}, d {d}, len {len}): max error {err} > {bound}");
    }
    mlx_ext::options::install(EngineOptions::default()).unwrap();
    let k = Array::zeros::<f32>(&[1, 2, 10, 64]).unwrap().as_dtype(Dtype::Float16).unwrap();
    let q = Array::ones::<f32>(&[1, 4, 1, 64]).unwrap();
    let err = dense_decode_attention(&q, &k, &k, 11, None).unwrap_err().to_string();
    assert!(err.contains("len 11 outside 1..10"), "{err}");
    let err = dense_decode_attention(&q, &k.as_dtype(Dtype::Float32).unwrap(), &k, 5, None).unwrap_err().to_string();
    assert!(err.contains("must be float16"), "{err}");
}

#[test]
fn bad_arguments_are_errors_not_crashes() {
    let (_, wf) = host_matrix(8, 64, 1);
    let (w, s, b) = quantize(&wf, 32, 4).unwrap();
    let x = Array::ones::<f32>(&[1, 64]).unwrap();
    let err = quantized_matvec(&x, &w, &s, &b, 32, 5).unwrap_err().to_string();
    assert!(err.contains("bits must be 2, 3, 4, 6 or 8"), "{err}");
    let err = quantized_matvec(&Array::ones::<f32>(&[1, 32]).unwrap(), &w, &s, &b, 32, 4).unwrap_err().to_string();
    assert!(err.contains("K = 32"), "{err}");

    let h = Host::random([1, 2, 10, 64], 3);
    let (p, _) = poisoned_cache(&h, 10, 64, 8, true);
    let q = Array::ones::<f32>(&[1, 4, 1, 64]).unwrap();
    let side = || PackedOperand { full: &p, bits: 8, group: 64 };
    let err = decode_attention(&q, side(), side(), 11).unwrap_err().to_string();
    assert!(err.contains("len 11 outside 1..10"), "{err}");
    let err = decode_attention(&Array::ones::<f32>(&[1, 3, 1, 64]).unwrap(), side(), side(), 5).unwrap_err().to_string();
    assert!(err.contains("multiple of KV heads"), "{err}");
}

fn max_diff(a: &Array, b: &Array) -> f32 {
    let (a, b) = (to_vec(a), to_vec(b));
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn max_abs(a: &Array) -> f32 {
    to_vec(a).iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// How far two float32 RMSNorms of rows of `dims` values may be apart, for outputs up to
/// `max_out`. Each side sums `dims` squares (relative error up to dims/2 eps in any order), takes
/// a reciprocal square root (2 roundings) and multiplies by x and w (2 roundings): relative
/// error (dims/2 + 4) eps per side, twice that between the two.
fn rms_norm_bound(dims: usize, max_out: f32) -> f32 {
    max_out * f32::EPSILON * (dims as f32 + 8.0)
}

/// How far two float32 RoPEs may be apart. Each side forms the angle (offset + t) scale inv_freq
/// with a frequency from a power (within 2 ulp) and two products (half an ulp each): 3 eps
/// relative, so the angles differ by up to 6 eps max_angle. An angle error d moves
/// x1 cos - x2 sin by at most (|x1| + |x2|) d, with `max_pair` the largest |x1| + |x2|. Sine and
/// cosine are within an ulp on each side (2 eps between them), and the two products and their
/// sum round by up to 1.5 eps (|x1| + |x2|) on each side (3 eps between them).
/// The angle term dominates at large offsets: one ulp of a 300 rad angle is 3e-5.
fn rope_bound(max_pair: f32, max_angle: f32) -> f32 {
    max_pair * f32::EPSILON * (6.0 * max_angle + 5.0)
}

#[test]
fn rms_norm_and_rope_match_mlx_fast() {
    use mlx_ext::cpu::{rms_norm, rope};
    let s = seed();
    // A transposed view, as attention layers pass them, and a plain row-major array.
    let host = Host::random([2, 5, 3, 64], s);
    let x = host.array();
    let xt = x.transpose_axes(&[0, 2, 1, 3]).unwrap();
    let w = Host::random([1, 1, 1, 64], s + 1).array().reshape(&[64]).unwrap();
    // Positions run along the second-to-last axis: 3 rows in x, 5 in xt.
    let positions = 5;
    let max_pair = 2.0 * host.max_abs() as f32;
    for (name, a) in [("row-major", &x), ("transposed", &xt)] {
        for (weight, eps) in [(Some(&w), 1e-5), (None, 1e-6)] {
            let theirs = mlx_rs::fast::rms_norm(a, weight, eps).unwrap();
            let d = max_diff(&rms_norm(a, weight, eps).unwrap(), &theirs);
            let bound = rms_norm_bound(64, max_abs(&theirs));
            assert!(d <= bound, "rms_norm {name} weight={}: {d} > {bound}", weight.is_some());
        }
        let min_freq = 1.5f32;
        let freqs = Array::from_slice(&(0..16).map(|i| 10000f32.powf(i as f32 / 16.0) * min_freq).collect::<Vec<_>>(), &[16]);
        for (traditional, dims, base, scale, offset, f) in [
            (false, 64, Some(10000.0), 1.0, 0, None),
            (false, 64, Some(500000.0), 1.0, 4093, None),
            (true, 64, Some(10000.0), 0.5, 17, None),
            (false, 32, Some(10000.0), 1.0, 300, None),
            (false, 32, None, 1.0, 1234, Some(&freqs)),
        ] {
            let ours = rope(a, dims, traditional, base, scale, offset, f).unwrap();
            let theirs = mlx_rs::fast::rope(a, dims, traditional, base, scale, offset, f).unwrap();
            let d = max_diff(&ours, &theirs);
            // The fastest frequency is base^0 = 1, or 1 / the smallest given period.
            let max_inv_freq = if f.is_some() { 1.0 / min_freq } else { 1.0 };
            let max_angle = (offset + positions - 1) as f32 * scale * max_inv_freq;
            let bound = rope_bound(max_pair, max_angle);
            assert!(d <= bound, "rope {name} traditional={traditional} dims={dims} offset={offset}: {d} > {bound}");
        }
    }
}

#[test]
fn the_baseline_build_chosen_by_option_matches_the_dequantized_product_too() {
    let _options = options_lock();
    use mlx_ext::{CpuBuild, EngineOptions};
    // Other tests of this binary may run under either build meanwhile; their bounds hold for both.
    let (xh, x) = host_matrix(3, 256, 7);
    let (_, wf) = host_matrix(40, 256, 8);
    let (w, sc, bi) = quantize(&wf, 64, 4).unwrap();
    let wd = f32(&dequantize(&w, &sc, &bi, 64, 4).unwrap());
    let want: Vec<f64> = to_vec(&mlx_rs::ops::matmul(&x, wd.t()).unwrap()).into_iter().map(f64::from).collect();
    // Two f32 dot products of K = 256 terms each: within K eps sum|x||w| of the exact one.
    let row_sum = xh.chunks(256).map(|r| r.iter().map(|v| v.abs()).sum::<f32>()).fold(0.0, f32::max);
    let bound = (2.0 * 256.0 * f32::EPSILON * row_sum * max_abs(&wd)) as f64;
    for build in [CpuBuild::Generic, CpuBuild::Auto] {
        mlx_ext::options::install(EngineOptions { cpu_build: build, ..EngineOptions::default() }).unwrap();
        let got = to_vec(&quantized_matvec(&x, &w, &sc, &bi, 64, 4).unwrap());
        let err = max_abs_diff(&got, &want);
        assert!(err <= bound, "{build:?}: {err} > {bound}");
    }
}

/// MXFP4 weights on both builds: our dequantization gives MLX's values exactly (e2m1 codes times
/// powers of two are exact in f32), and the matvec (one row and a few, K = 320: ten groups of 32)
/// stays within K eps sum |x||w| of the product of those values.
#[test]
fn mxfp4_matvec_and_dequantize_match_mlx() {
    let _options = options_lock();
    use mlx_ext::microscaled::{self, MxFormat};
    use mlx_ext::{CpuBuild, EngineOptions};
    let (_, wf) = host_matrix(24, 320, 11);
    let (w, sc) = microscaled::quantize(&(wf * 3.0f32), MxFormat::Mxfp4).unwrap();
    let wd = f32(&microscaled::dequantize(&w, &sc, MxFormat::Mxfp4).unwrap());
    for build in [CpuBuild::Generic, CpuBuild::Auto] {
        mlx_ext::options::install(EngineOptions { cpu_build: build, ..EngineOptions::default() }).unwrap();
        let (ours, want) = (to_vec(&mlx_ext::cpu::mxfp4_dequantize(&w, &sc).unwrap()), to_vec(&wd));
        let first_bad = ours.iter().zip(&want).position(|(a, b)| a != b);
        assert!(first_bad.is_none(), "{build:?}: dequantized value {first_bad:?} differs: {:?} vs {:?}", first_bad.map(|i| ours[i]), first_bad.map(|i| want[i]));
        for rows in [1, 3] {
            let (xh, x) = host_matrix(rows, 320, 12 + rows as u64);
            let want: Vec<f64> = to_vec(&mlx_rs::ops::matmul(&x, wd.t()).unwrap()).into_iter().map(f64::from).collect();
            let row_sum = xh.chunks(320).map(|r| r.iter().map(|v| v.abs()).sum::<f32>()).fold(0.0, f32::max);
            let bound = (2.0 * 320.0 * f32::EPSILON * row_sum * max_abs(&wd)) as f64;
            let got = to_vec(&mlx_ext::cpu::mxfp4_matvec(&x, &w, &sc).unwrap());
            let err = max_abs_diff(&got, &want);
            assert!(err <= bound, "{build:?}, {rows} rows: {err} > {bound}");
        }
    }
    mlx_ext::options::install(EngineOptions::default()).unwrap();
    // Shapes that are not MXFP4 are errors naming the primitive.
    let e = mlx_ext::cpu::mxfp4_matvec(&Array::ones::<f32>(&[1, 64]).unwrap(), &w, &sc).unwrap_err().to_string();
    assert!(e.contains("kvsplit mxfp4 matvec"), "{e}");
}
