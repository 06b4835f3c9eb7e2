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
//!
//! Usage: fused_check [--quick] [--ops] [--profile]
//!   --quick    benchmark 4K and 32K only
//!   --ops      also check and time the MLX-ops path (its quantized_matmul kernels take minutes
//!              of JIT compilation on a fresh GPU machine)
//!   --profile  no checks: a few k8v4 steps at 32K and 128K, for `ncu -k regex:kvsplit_attn`

use mlx_kv::{CacheOptions, KvCache, KvSpec};
use mlx_rs::{random, transforms::eval, Array, Dtype};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn host(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap().contiguous().unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

/// f64 attention of one (already scaled) query row per q head over `t` tokens; k/v `[hkv, t, d]`.
fn reference(q: &[f32], k: &[f32], v: &[f32], hq: usize, hkv: usize, t: usize, d: usize) -> Vec<f64> {
    let rep = hq / hkv;
    let mut out = vec![0.0; hq * d];
    for h in 0..hq {
        let kh = h / rep;
        let s: Vec<f64> = (0..t)
            .map(|j| (0..d).map(|x| q[h * d + x] as f64 * k[(kh * t + j) * d + x] as f64).sum::<f64>())
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for x in 0..d {
            out[h * d + x] = (0..t).map(|j| e[j] * v[(kh * t + j) * d + x] as f64).sum::<f64>() / z;
        }
    }
    out
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

fn set_fused(on: bool) {
    mlx_kv::fused::poison_outputs(false);
    std::env::set_var("KVSPLIT_FUSED", if on { "1" } else { "0" });
}

fn correctness(seed: u64, with_ops: bool) -> bool {
    let key = random::key(seed).unwrap();
    let mut ok = true;
    println!("correctness (seed {seed}): max |out - f64 ref over dequantized cache|");
    for &(hkv, rep, d, t) in &[(8, 4, 128, 1000), (3, 3, 64, 777), (1, 8, 256, 300), (2, 1, 64, 5000)] {
        for (kb, vb) in [(8, 8), (8, 4), (4, 8), (4, 4), (4, 2), (8, 2), (2, 2)] {
            let spec = KvSpec::bits(kb, vb);
            let (cache, _, _) = fill(&spec, hkv, t, d, &key);
            // f16 queries: what the GPU path computes in (CUDA qmm has no f32-activation kernel
            // for these shapes).
            let q = random::normal::<f32>(&[1, hkv * rep, 1, d], None, None, &key).unwrap().as_dtype(Dtype::Float16).unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            set_fused(true);
            mlx_kv::fused::poison_outputs(true);
            let fused = host(&cache.attend(&q, scale, None).unwrap());
            mlx_kv::fused::poison_outputs(false);
            set_fused(false);
            let ops = if with_ops { host(&cache.attend(&q, scale, None).unwrap()) } else { Vec::new() };
            let kd = host(&cache.dequantized_keys().unwrap().unwrap());
            let vd = host(&cache.dequantized_values().unwrap().unwrap());
            // The engine scales q in its own dtype before the kernel: the reference starts from
            // that same rounded product, so only the kernels' arithmetic is judged.
            let qs = host(&(&q * Array::from_f32(scale).as_dtype(q.dtype()).unwrap()));
            let want = reference(&qs, &kd, &vd, (hkv * rep) as usize, hkv as usize, t as usize, d as usize);
            let err = |got: &[f32]| got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
            let (ef, eo) = (err(&fused), if with_ops { err(&ops) } else { f64::NAN });
            // f32 accumulation over t terms of magnitude <= max|v| ~ 5: a generous 1e-3.
            let pass = ef < 1e-3;
            ok &= pass;
            println!("  hkv={hkv} rep={rep} d={d} t={t} k{kb}v{vb}: fused {ef:.2e}  ops {eo:.2e}  {}", if pass { "pass" } else { "FAIL" });
        }
    }
    ok
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
    let ok = correctness(seed, with_ops);
    let bw = copy_bandwidth();
    println!("measured copy bandwidth: {:.0} GB/s", bw / 1e9);
    let depths: &[i32] = if quick { &[4096, 32768] } else { &[4096, 16384, 32768, 65536, 131072] };
    println!("\ndecode attention step, {} q heads / {hkv} kv heads, D={d}, f16 queries", hkv * rep);
    println!("csv: depth,config,path,timing,n_caches,ms_per_call,bytes_read_per_call,gb_per_s,fraction_of_copy_bw");
    for &t in depths {
        // Enough distinct caches that together they are at least twice the L2 (50 MB).
        let n_batch = if t <= 32768 { 16 } else { 8 };
        for (label, spec) in [("fp16", KvSpec::dense()), ("k8v8", KvSpec::bits(8, 8)), ("k8v4", KvSpec::bits(8, 4)), ("k4v4", KvSpec::bits(4, 4)), ("k4v2", KvSpec::bits(4, 2))] {
            let caches: Vec<KvCache> = (0..n_batch).map(|i| fill(&spec, hkv, t, d, &random::key(seed ^ (100 + i as u64)).unwrap()).0).collect();
            let bytes = {
                let (kb, vb) = spec.bytes_per_token_per_head(d as usize, 2);
                (kb + vb) * (t * hkv) as f64
            };
            let paths: &[(&str, bool)] = match (spec.is_dense(), with_ops) {
                (true, _) => &[("sdpa", false)],
                (false, true) => &[("fused", true), ("mlx-ops", false)],
                (false, false) => &[("fused", true)],
            };
            for &(path, fused) in paths {
                set_fused(fused);
                let s = time_step(&caches[0], &q, scale, if quick { 10 } else { 30 });
                println!("csv: {t},{label},{path},step,1,{:.4},{bytes:.0},{:.1},{:.3}", s * 1e3, bytes / s / 1e9, bytes / s / bw);
                // The MLX-ops path is the slow reference; batching it only costs device time.
                if path != "mlx-ops" {
                    let s = time_batched(&caches, &q, scale, if quick { 5 } else { 10 });
                    println!("csv: {t},{label},{path},batched,{n_batch},{:.4},{bytes:.0},{:.1},{:.3}", s * 1e3, bytes / s / 1e9, bytes / s / bw);
                }
            }
        }
    }
    if !ok {
        eprintln!("fused kernel correctness FAILED");
        std::process::exit(1);
    }
}
