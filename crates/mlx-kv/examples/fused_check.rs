//! GPU check and benchmark of the fused split-precision decode-attention kernel.
//!
//! 1. Correctness: fresh random inputs each run; the fused kernel and the MLX-ops path are both
//!    compared with float64 attention over the *dequantized* cache (so only the kernels'
//!    arithmetic is judged, not quantization). Outputs are poisoned with NaN before the kernel
//!    runs, so an element it fails to write fails the check.
//! 2. Speed: one decode-attention step at depths 4K..128K, fused vs MLX ops vs a dense f16 cache,
//!    with achieved bandwidth = bytes that must be read / time, against measured copy bandwidth.
//!    Two timings per row: `step` is one attention call evaluated alone (graph building, launch
//!    and MLX's eval included: what a one-layer model would see); `batched` evaluates one call on
//!    each of N distinct caches (like N layers) in one graph and divides by N, so fixed per-eval
//!    costs are spread and the caches together are far larger than the 50 MB L2.
//!    `layer-step` times what a model layer calls per decode token (cache write + attention,
//!    `update_and_attend`), one call per cache in one graph.
//! 3. The fused decode step (the kernel writes the new token into the cache itself) is checked
//!    against MLX's `quantize` of the same token and against float64 attention.
//!
//! 4. Prefill chunks (the MLX-ops path over the quantized cache, which `ppl` uses) against
//!    f64 causal attention.
//!
//! Usage: fused_check [--quick] [--ops] [--profile] [--prefill] [--check]
//!   --quick    check two bit pairs (k8v4, k4v2), benchmark 4K and 32K only
//!   --ops      also check and time the MLX-ops path (its quantized_matmul kernels take minutes
//!              of JIT compilation on a fresh GPU machine)
//!   --profile  no checks: a few k8v4 steps at 32K and 128K, for `ncu -k regex:kvsplit_attn`
//!   --prefill  only the prefill-chunk checks
//!   --check    only the decode checks of the default kernels (no prefill, no timings)

use mlx_ext::{EngineOptions, Toggle};
use mlx_kv::{CacheOptions, KvCache, KvSpec};
use mlx_rs::{random, transforms::eval, Array, Dtype};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn host(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap().contiguous().unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

fn fill(spec: &KvSpec, hkv: i32, t: i32, d: i32, key: &Array) -> (KvCache, Array, Array) {
    let (k1, k2) = random::split(key, 2).unwrap();
    let k = random::normal::<f32>(&[1, hkv, t, d], None, None, &k1).unwrap().as_dtype(Dtype::Float16).unwrap();
    let v = random::normal::<f32>(&[1, hkv, t, d], None, None, &k2).unwrap().as_dtype(Dtype::Float16).unwrap();
    let mut c = KvCache::new(spec.clone(), d as usize, CacheOptions::default()).unwrap();
    // Fill in chunks so no single quantize is huge.
    let step = 8192;
    let mut a = 0;
    while a < t {
        let z = (a + step).min(t);
        use mlx_rs::ops::indexing::IndexOp;
        c.update(&k.index((.., .., a..z, ..)), &v.index((.., .., a..z, ..))).unwrap();
        c.eval().unwrap();
        a = z;
    }
    (c, k, v)
}

/// Error bound against f64 attention over the dequantized cache: f32 accumulation over the
/// tokens stays far below a generous 1e-3. The tensor-core variant also rounds each dequantized
/// value and each softmax weight to f16 (relative error at most 2^-11 each), which moves the
/// output by at most 2^-10 max|v|.
fn bound(k_bits: u8, rep: i32, d: i32, v: &[f32]) -> f64 {
    let mma = mlx_ext::options::current().gpu_fused_mma.on() && mlx_kv::attention::fused::mma_covers(k_bits, 64, 64, d as usize, rep as usize, Dtype::Float16);
    let vmax = v.iter().fold(0.0f64, |m, x| m.max((*x as f64).abs()));
    if mma { 1e-3 + vmax * 2f64.powi(-10) } else { 1e-3 }
}

/// Changes one engine option (this tool compares paths in one process).
fn set_option(f: impl FnOnce(&mut EngineOptions)) {
    let mut o = mlx_ext::options::current();
    f(&mut o);
    mlx_ext::options::install(o).expect("no thread-count change");
}

fn set_fused(on: bool) {
    mlx_kv::attention::fused::poison_outputs(false);
    set_option(|o| o.gpu_fused = Toggle::from_bool(on));
}

/// Bit pairs of the correctness checks; `--quick` keeps two (every variant is compiled on first
/// use, about 3 s each on the GPU machine).
fn bit_pairs(quick: bool) -> &'static [(u8, u8)] {
    if quick {
        &[(8, 4), (4, 2)]
    } else {
        &[(8, 8), (8, 4), (4, 8), (4, 4), (4, 2), (8, 2), (2, 2)]
    }
}

fn correctness(seed: u64, with_ops: bool, quick: bool) -> bool {
    let key = random::key(seed).unwrap();
    let mut ok = true;
    println!("correctness (seed {seed}, tensor cores {}): max |out - f64 ref over dequantized cache|", mlx_ext::options::current().gpu_fused_mma.on());
    for &(hkv, rep, d, t) in &[(8, 4, 128, 1000), (3, 3, 64, 777), (1, 8, 256, 300), (2, 1, 64, 5000)] {
        for &(kb, vb) in bit_pairs(quick) {
            let spec = KvSpec::bits(kb, vb);
            let (cache, _, _) = fill(&spec, hkv, t, d, &key);
            // f16 queries: what the GPU path computes in (CUDA qmm has no f32-activation kernel
            // for these shapes).
            let q = random::normal::<f32>(&[1, hkv * rep, 1, d], None, None, &key).unwrap().as_dtype(Dtype::Float16).unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            set_fused(true);
            mlx_kv::attention::fused::poison_outputs(true);
            let fused = host(&cache.attend(&q, scale, None).unwrap());
            mlx_kv::attention::fused::poison_outputs(false);
            set_fused(false);
            let ops = if with_ops { host(&cache.attend(&q, scale, None).unwrap()) } else { Vec::new() };
            let kd = host(&cache.dequantized_keys().unwrap().unwrap());
            let vd = host(&cache.dequantized_values().unwrap().unwrap());
            // The engine scales q in its own dtype before the kernel: the reference starts from
            // that same rounded product, so only the kernels' arithmetic is judged.
            let qs = host(&(&q * Array::from_f32(scale).as_dtype(q.dtype()).unwrap()));
            let want = reference(&qs, &kd, &vd, Dims { hq: (hkv * rep) as usize, hkv: hkv as usize, l: 1, t: t as usize, d: d as usize }, 1.0);
            let err = |got: &[f32]| got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
            let (ef, eo) = (err(&fused), if with_ops { err(&ops) } else { f64::NAN });
            let pass = ef < bound(kb, rep, d, &vd);
            ok &= pass;
            println!("  hkv={hkv} rep={rep} d={d} t={t} k{kb}v{vb}: fused {ef:.2e}  ops {eo:.2e}  {}", if pass { "pass" } else { "FAIL" });
        }
    }
    ok
}

/// Attention shapes: `hq` query heads over `hkv` KV heads, `l` query rows per head, `t` tokens,
/// head_dim `d`.
#[derive(Clone, Copy)]
struct Dims {
    hq: usize,
    hkv: usize,
    l: usize,
    t: usize,
    d: usize,
}

/// f64 causal attention of `l` query rows per q head (`q`: `[hq, l, d]`, multiplied by `scale`
/// here) over `t` tokens (`k`, `v`: `[hkv, t, d]`); query `i` sees keys `0..=t-l+i` (with
/// `l = 1`: every key, a decode step). `[hq, l, d]`.
fn reference(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f64) -> Vec<f64> {
    let Dims { hq, hkv, l, t, d } = dims;
    let rep = hq / hkv;
    let mut out = vec![0.0; hq * l * d];
    for h in 0..hq {
        let kh = h / rep;
        for i in 0..l {
            let vis = t - l + i + 1;
            let qr = &q[(h * l + i) * d..(h * l + i + 1) * d];
            let s: Vec<f64> = (0..vis).map(|j| scale * (0..d).map(|x| qr[x] as f64 * k[(kh * t + j) * d + x] as f64).sum::<f64>()).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for x in 0..d {
                out[(h * l + i) * d + x] = (0..vis).map(|j| e[j] * v[(kh * t + j) * d + x] as f64).sum::<f64>() / z;
            }
        }
    }
    out
}

/// A prefill chunk (`l` new tokens after `prior` cached ones) through `update_and_attend`, as
/// `ppl` and `generate`'s prompt feed it: the MLX-ops path over the quantized cache (the fused
/// kernels are decode-only). Against f64 causal attention over the dequantized cache; the
/// bound allows f16 outputs and f16 probabilities (2^-10 max|v|) on top of 1e-3.
fn prefill_correctness(seed: u64) -> bool {
    let key = random::key(seed ^ 11).unwrap();
    let mut ok = true;
    println!("prefill chunks (seed {seed}): max |out - f64 causal ref over dequantized cache|");
    for &(hkv, rep, d, prior, l) in &[(3, 3, 64, 0, 128), (3, 3, 64, 384, 128), (8, 4, 128, 896, 128), (2, 4, 128, 3000, 64)] {
        for &(kb, vb) in &[(8u8, 4u8), (8, 8), (4, 4)] {
            let spec = KvSpec::bits(kb, vb);
            let mut cache = if prior > 0 { fill(&spec, hkv, prior, d, &key).0 } else { KvCache::new(spec.clone(), d as usize, CacheOptions::default()).unwrap() };
            let (k1, k2) = random::split(random::key(seed ^ 12).unwrap(), 2).unwrap();
            let kn = random::normal::<f32>(&[1, hkv, l, d], None, None, &k1).unwrap().as_dtype(Dtype::Float16).unwrap();
            let vn = random::normal::<f32>(&[1, hkv, l, d], None, None, &k2).unwrap().as_dtype(Dtype::Float16).unwrap();
            let q = random::normal::<f32>(&[1, hkv * rep, l, d], None, None, &key).unwrap().as_dtype(Dtype::Float16).unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            let out = host(&cache.update_and_attend(&q, &kn, &vn, scale, None).unwrap());
            let t = (prior + l) as usize;
            let kd = host(&cache.dequantized_keys().unwrap().unwrap());
            let vd = host(&cache.dequantized_values().unwrap().unwrap());
            let dims = Dims { hq: (hkv * rep) as usize, hkv: hkv as usize, l: l as usize, t, d: d as usize };
            let want = reference(&host(&q), &kd, &vd, dims, scale as f64);
            let err = out.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
            let vmax = vd.iter().fold(0.0f64, |m, x| m.max((*x as f64).abs()));
            let pass = err < 1e-3 + vmax * 2f64.powi(-10) && cache.len() == t;
            ok &= pass;
            println!("  hkv={hkv} rep={rep} d={d} prior={prior} l={l} k{kb}v{vb}: {err:.2e}  {}", if pass { "pass" } else { "FAIL" });
        }
    }
    ok
}

/// Rows `[hkv, t, d]` → the last token's row of each head.
fn last_rows(x: &[f32], hkv: usize, t: usize, d: usize) -> Vec<f32> {
    (0..hkv).flat_map(|h| x[(h * t + t - 1) * d..(h * t + t) * d].to_vec()).collect()
}

/// The fused decode step (`update_and_attend` with one token: the kernel quantizes the token
/// and writes it into the cache itself): three steps in a row per case (the device-side
/// position counter advances), each new token as stored compared with what MLX's `quantize`
/// stores on a twin cache (the write path the step replaces), and the last step's output with
/// f64 attention over the dequantized cache, queries scaled in f64.
fn step_correctness(seed: u64, quick: bool, fold: bool) -> bool {
    let key = random::key(seed ^ 7).unwrap();
    let mut ok = true;
    set_option(|o| o.gpu_fused_fold = Toggle::from_bool(fold));
    let launches = if fold { "one launch (merge folded)" } else { "two launches" };
    println!("fused decode step, {launches} (seed {seed}, tensor cores {}): new token vs MLX quantize; max |out - f64 ref|", mlx_ext::options::current().gpu_fused_mma.on());
    // t: tokens after the three steps; 1 + 2 = 3 starts from an empty cache, 771 grows the
    // buffer (768 = 3 x 256 filled before the steps).
    for &(hkv, rep, d, t) in &[(8, 4, 128, 1000), (3, 3, 64, 771), (1, 8, 256, 300), (2, 1, 64, 5000), (2, 4, 128, 3)] {
        for &(kb, vb) in bit_pairs(quick) {
            let spec = KvSpec::bits(kb, vb);
            let (mut cache, _, _) = fill(&spec, hkv, t - 3, d, &key);
            let (mut twin, _, _) = fill(&spec, hkv, t - 3, d, &key);
            let scale = 1.0 / (d as f32).sqrt();
            let mut token_err = 0.0f64;
            let mut out = Vec::new();
            let mut q = None;
            for i in 0..3u64 {
                let ki = random::key(seed ^ (1000 + i)).unwrap();
                let (k1, k2) = random::split(&ki, 2).unwrap();
                let kn = random::normal::<f32>(&[1, hkv, 1, d], None, None, &k1).unwrap().as_dtype(Dtype::Float16).unwrap();
                let vn = random::normal::<f32>(&[1, hkv, 1, d], None, None, &k2).unwrap().as_dtype(Dtype::Float16).unwrap();
                let qi = random::normal::<f32>(&[1, hkv * rep, 1, d], None, None, &ki).unwrap().as_dtype(Dtype::Float16).unwrap();
                set_fused(true);
                mlx_kv::attention::fused::poison_outputs(true);
                out = host(&cache.update_and_attend(&qi, &kn, &vn, scale, None).unwrap());
                mlx_kv::attention::fused::poison_outputs(false);
                twin.update(&kn, &vn).unwrap();
                twin.eval().unwrap();
                let n = (t - 2 + i as i32) as usize;
                for (a, b) in [
                    (cache.dequantized_keys().unwrap().unwrap(), twin.dequantized_keys().unwrap().unwrap()),
                    (cache.dequantized_values().unwrap().unwrap(), twin.dequantized_values().unwrap().unwrap()),
                ] {
                    let (a, b) = (last_rows(&host(&a), hkv as usize, n, d as usize), last_rows(&host(&b), hkv as usize, n, d as usize));
                    token_err = a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(token_err, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
                }
                q = Some(qi);
            }
            let kd = host(&cache.dequantized_keys().unwrap().unwrap());
            let vd = host(&cache.dequantized_values().unwrap().unwrap());
            let qs: Vec<f32> = host(q.as_ref().unwrap()).iter().map(|x| (*x as f64 * scale as f64) as f32).collect();
            let want = reference(&qs, &kd, &vd, Dims { hq: (hkv * rep) as usize, hkv: hkv as usize, l: 1, t: t as usize, d: d as usize }, 1.0);
            let err = out.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
            // The kernel's quantizer repeats MLX's formulas in the same order: expect the same
            // codes, scales and biases (0 difference); attention bound as above.
            let pass = err < bound(kb, rep, d, &vd) && token_err == 0.0 && cache.len() == t as usize;
            ok &= pass;
            println!(
                "  hkv={hkv} rep={rep} d={d} t={t} k{kb}v{vb}: new tokens vs MLX quantize {token_err:.2e}  out {err:.2e}  {}",
                if pass { "pass" } else { "FAIL" }
            );
        }
    }
    ok
}

/// Seconds per layer of a decode step (`update_and_attend` with one new token, as a model
/// layer calls it) when one step on each cache is evaluated in one graph. The caches grow by
/// one token per call.
fn time_layer_steps(caches: &mut [KvCache], q: &Array, kv: &Array, scale: f32, iters: usize) -> f64 {
    let run = |caches: &mut [KvCache]| {
        let mut outs: Vec<Array> = caches.iter_mut().map(|c| c.update_and_attend(q, kv, kv, scale, None).unwrap()).collect();
        for c in caches.iter() {
            outs.extend(c.arrays().into_iter().cloned());
        }
        eval(outs.iter()).unwrap();
    };
    run(caches);
    run(caches);
    let mut v: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            run(caches);
            t.elapsed().as_secs_f64() / caches.len() as f64
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time_step(cache: &KvCache, q: &Array, scale: f32, iters: usize) -> f64 {
    for _ in 0..3 {
        cache.attend(q, scale, None).unwrap().eval().unwrap();
    }
    let mut v: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            cache.attend(q, scale, None).unwrap().eval().unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Seconds per call when one call on each cache is evaluated in one graph.
fn time_batched(caches: &[KvCache], q: &Array, scale: f32, iters: usize) -> f64 {
    let run = || {
        let outs: Vec<Array> = caches.iter().map(|c| c.attend(q, scale, None).unwrap()).collect();
        eval(outs.iter()).unwrap();
    };
    run();
    run();
    let mut v: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64() / caches.len() as f64
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn copy_bandwidth() -> f64 {
    let x = random::normal::<f32>(&[256, 1024, 1024], None, None, None).unwrap().as_dtype(Dtype::Float16).unwrap();
    x.eval().unwrap();
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        let y = &x + Array::from_f32(1.0).as_dtype(Dtype::Float16).unwrap();
        eval([&y]).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * x.nbytes() as f64 / best
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (hkv, rep, d) = (8, 4, 128);
    let scale = 1.0 / (d as f32).sqrt();
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let key = random::key(seed ^ 1).unwrap();
    let q = random::normal::<f32>(&[1, hkv * rep, 1, d], None, None, &key).unwrap().as_dtype(Dtype::Float16).unwrap();
    if std::env::args().any(|a| a == "--profile") {
        set_fused(true);
        for t in [32768, 131072] {
            let (cache, _, _) = fill(&KvSpec::bits(8, 4), hkv, t, d, &key);
            for _ in 0..5 {
                cache.attend(&q, scale, None).unwrap().eval().unwrap();
            }
        }
        return;
    }
    let with_ops = std::env::args().any(|a| a == "--ops");
    if std::env::args().any(|a| a == "--check") {
        // The default path only (tensor cores where they apply, one launch per step).
        let ok = correctness(seed, false, quick) & step_correctness(seed, quick, true);
        std::process::exit(if ok { 0 } else { 1 });
    }
    let mut ok = prefill_correctness(seed);
    if std::env::args().any(|a| a == "--prefill") {
        std::process::exit(if ok { 0 } else { 1 });
    }
    for mma in [true, false] {
        set_option(|o| o.gpu_fused_mma = Toggle::from_bool(mma));
        ok &= correctness(seed, with_ops && mma, quick);
        ok &= step_correctness(seed, quick, false);
        ok &= step_correctness(seed, quick, true);
    }
    set_option(|o| o.gpu_fused_mma = Toggle::from_bool(true));
    set_option(|o| o.gpu_fused_fold = Toggle::from_bool(true));
    let bw = copy_bandwidth();
    println!("measured copy bandwidth: {:.0} GB/s", bw / 1e9);
    let depths: &[i32] = if quick { &[4096, 32768] } else { &[4096, 16384, 32768, 65536, 131072] };
    println!("\ndecode attention step, {} q heads / {hkv} kv heads, D={d}, f16 queries", hkv * rep);
    println!("csv: depth,config,path,timing,n_caches,ms_per_call,bytes_read_per_call,gb_per_s,fraction_of_copy_bw");
    for &t in depths {
        // Enough distinct caches that together they are at least twice the L2 (50 MB).
        let n_batch = if t <= 32768 { 16 } else { 8 };
        for (label, spec) in [("fp16", KvSpec::dense()), ("k8v8", KvSpec::bits(8, 8)), ("k8v4", KvSpec::bits(8, 4)), ("k4v4", KvSpec::bits(4, 4)), ("k4v2", KvSpec::bits(4, 2))] {
            let mut caches: Vec<KvCache> = (0..n_batch).map(|i| fill(&spec, hkv, t, d, &random::key(seed ^ (100 + i as u64)).unwrap()).0).collect();
            let bytes = {
                let (kb, vb) = spec.bytes_per_token_per_head(d as usize, 2);
                (kb + vb) * (t * hkv) as f64
            };
            let paths: &[(&str, bool, bool)] = match (spec.is_dense(), with_ops) {
                (true, _) => &[("sdpa", false, false)],
                (false, true) => &[("fused-mma", true, true), ("fused", true, false), ("mlx-ops", false, false)],
                (false, false) => &[("fused-mma", true, true), ("fused", true, false)],
            };
            for &(path, fused, mma) in paths {
                set_fused(fused);
                set_option(|o| o.gpu_fused_mma = Toggle::from_bool(mma));
                let s = time_step(&caches[0], &q, scale, if quick { 10 } else { 30 });
                println!("csv: {t},{label},{path},step,1,{:.4},{bytes:.0},{:.1},{:.3}", s * 1e3, bytes / s / 1e9, bytes / s / bw);
                // The MLX-ops path is the slow reference; batching it only costs device time.
                if path != "mlx-ops" {
                    let s = time_batched(&caches, &q, scale, if quick { 5 } else { 10 });
                    println!("csv: {t},{label},{path},batched,{n_batch},{:.4},{bytes:.0},{:.1},{:.3}", s * 1e3, bytes / s / 1e9, bytes / s / bw);
                }
            }
            // A whole layer's decode attention as the model calls it (cache write + attention),
            // one call per cache in one graph: fp16 (slice updates + sdpa), k8v4 through the
            // fused step (write inside the kernel) and through the MLX-ops write + fused kernel.
            if matches!(label, "fp16" | "k8v4") {
                let kv = random::normal::<f32>(&[1, hkv, 1, d], None, None, &key).unwrap().as_dtype(Dtype::Float16).unwrap();
                let variants: &[(&str, &str, &str)] =
                    if label == "fp16" { &[("sdpa", "1", "0")] } else { &[("fused-step-fold-mma", "1", "1"), ("fused-step", "1", "0"), ("fused-step-fold", "1", "1"), ("fused-opswrite", "0", "0")] };
                for &(path, step, fold) in variants {
                    set_fused(true);
                    set_option(|o| o.gpu_fused_mma = Toggle::from_bool(path.ends_with("-mma")));
                    set_option(|o| o.gpu_fused_step = Toggle::from_bool(step == "1"));
                    set_option(|o| o.gpu_fused_fold = Toggle::from_bool(fold == "1"));
                    let s = time_layer_steps(&mut caches, &q, &kv, scale, if quick { 5 } else { 10 });
                    set_option(|o| o.gpu_fused_step = Toggle::from_bool(true));
                    set_option(|o| o.gpu_fused_fold = Toggle::from_bool(true));
                    println!("csv: {t},{label},{path},layer-step,{n_batch},{:.4},{bytes:.0},{:.1},{:.3}", s * 1e3, bytes / s / 1e9, bytes / s / bw);
                }
            }
        }
    }
    if !ok {
        eprintln!("fused kernel correctness FAILED");
        std::process::exit(1);
    }
}
