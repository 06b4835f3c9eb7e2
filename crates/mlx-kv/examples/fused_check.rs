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
//! 4. The paged decode step (`decode_step_paged`: S sequences of different lengths in one
//!    launch, rows in a shuffled block pool) against f64 attention over the pool's dequantized
//!    rows, its new rows against MLX's `quantize`, the rest of the pool unchanged.
//!
//! 5. Prefill chunks (the MLX-ops path over the quantized cache, which `ppl` uses) against
//!    f64 causal attention.
//!
//! 6. Per-channel keys (`--channels`): decode steps over a per-channel body and its float tail
//!    (`fused::attend_channels`), across a key-group edge (the tail fills and is quantized),
//!    against f64 attention over the dequantized cache; each step must take the fused kernel.
//!
//! 7. The fused step entering the stored frame itself (`--frame`: Hadamard rotations and the key
//!    center inside the launch) against an MLX-ops twin and f64 attention.
//!
//! Usage: fused_check [--quick] [--ops] [--profile] [--prefill] [--check] [--paged] [--channels] [--frame] [--no-mma] [--bits LIST]
//!   --quick    check two bit pairs (k8v4, k4v2), benchmark 4K and 32K only
//!   --bits     the bit pairs of the decode and paged checks instead, e.g. `k6v6,k3v3,k8v6`
//!              (every pair is a few kernel variants to compile on the GPU machine)
//!   --ops      also check and time the MLX-ops path (its quantized_matmul kernels take minutes
//!              of JIT compilation on a fresh GPU machine)
//!   --profile  no checks: a few k8v4 steps at 32K and 128K, for `ncu -k regex:kvsplit_attn`
//!   --prefill  only the prefill-chunk checks
//!   --check    only the decode checks of the default kernels (no prefill, no timings)
//!   --paged    only the paged-step checks: tensor cores on and off, one launch and two (a
//!              run of its own: its ~60 kernel variants would push the full run past a
//!              10-minute device call; `--check` runs the default one, tensor cores and fold)
//!   --channels only the per-channel key checks (`--bits` picks their pairs too)
//!   --frame    only the checks of the fused step entering the stored frame itself (rotations,
//!              key center; `--bits` picks their pairs too; `--check` runs them as well)
//!   --no-mma   tensor cores off for `--check`: every case on the CUDA-core variant

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
fn bound(k_bits: u8, v_bits: u8, rep: i32, d: i32, v: &[f32]) -> f64 {
    bound_vmax(k_bits, v_bits, rep, d, v.iter().fold(0.0f64, |m, x| m.max((*x as f64).abs())))
}

/// [`bound`] given max |v|.
fn bound_vmax(k_bits: u8, v_bits: u8, rep: i32, d: i32, vmax: f64) -> f64 {
    let mma = mlx_ext::options::current().gpu_fused_mma.on() && mlx_kv::attention::fused::mma_covers(k_bits, 64, v_bits, 64, d as usize, rep as usize, Dtype::Float16);
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

/// One decode step as a model layer calls it (`update_and_attend`, with the fused path on and
/// outputs poisoned so an element the kernel fails to write reads NaN): the new token's K and
/// V (`[1, hkv, 1, d]`) and the query (`[1, hkv * rep, 1, d]`) drawn in f16 from `seed`.
/// Returns the output on the host, then K, V and the query.
fn poisoned_step(cache: &mut KvCache, seed: u64, hkv: i32, rep: i32, d: i32, scale: f32) -> (Vec<f32>, Array, Array, Array) {
    let ki = random::key(seed).unwrap();
    let (k1, k2) = random::split(&ki, 2).unwrap();
    let kn = random::normal::<f32>(&[1, hkv, 1, d], None, None, &k1).unwrap().as_dtype(Dtype::Float16).unwrap();
    let vn = random::normal::<f32>(&[1, hkv, 1, d], None, None, &k2).unwrap().as_dtype(Dtype::Float16).unwrap();
    let q = random::normal::<f32>(&[1, hkv * rep, 1, d], None, None, &ki).unwrap().as_dtype(Dtype::Float16).unwrap();
    set_fused(true);
    mlx_kv::attention::fused::poison_outputs(true);
    let out = host(&cache.update_and_attend(&q, &kn, &vn, scale, None).unwrap());
    mlx_kv::attention::fused::poison_outputs(false);
    (out, kn, vn, q)
}

/// Bit pairs of the correctness checks: `--bits` if given, else all; `--quick` keeps two (every
/// variant is compiled on first use, about 3 s each on the GPU machine). 3- and 6-bit pairs run
/// on CUDA cores only (see `fused::mma_applies`); k8v6 and k6v4 also check the 2/4/8-bit code
/// paths of that variant where the tensor cores would otherwise take them.
fn bit_pairs(quick: bool) -> Vec<(u8, u8)> {
    if let Some(pairs) = bits_flag() {
        return pairs;
    }
    if quick {
        vec![(8, 4), (4, 2)]
    } else {
        vec![(8, 8), (8, 4), (4, 8), (4, 4), (4, 2), (8, 2), (2, 2), (6, 6), (8, 6), (6, 4), (4, 6), (3, 3), (6, 3)]
    }
}

/// `--bits k6v6,k3v3`: the pairs to check, if given (exits with a message on a bad pair).
fn bits_flag() -> Option<Vec<(u8, u8)>> {
    let args: Vec<String> = std::env::args().collect();
    let list = args.iter().position(|a| a == "--bits").map(|i| args.get(i + 1).cloned().unwrap_or_default())?;
    let pairs: Vec<(u8, u8)> = list
        .split(',')
        .map(|p| match KvSpec::parse(p) {
            Ok(s) if !s.is_dense() && s.k.is_quantized() && s.v.is_quantized() => (s.k.bits, s.v.bits),
            _ => {
                eprintln!("fused_check: --bits wants pairs like k6v6,k8v4; got '{p}'");
                std::process::exit(2);
            }
        })
        .collect();
    Some(pairs)
}

fn correctness(seed: u64, with_ops: bool, quick: bool) -> bool {
    let key = random::key(seed).unwrap();
    let mut ok = true;
    println!("correctness (seed {seed}, tensor cores {}): max |out - f64 ref over dequantized cache|", mlx_ext::options::current().gpu_fused_mma.on());
    for &(hkv, rep, d, t) in &[(8, 4, 128, 1000), (3, 3, 64, 777), (1, 8, 256, 300), (2, 1, 64, 5000)] {
        for &(kb, vb) in &bit_pairs(quick) {
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
            let pass = ef < bound(kb, vb, rep, d, &vd);
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
        for &(kb, vb) in &bit_pairs(quick) {
            let spec = KvSpec::bits(kb, vb);
            let (mut cache, _, _) = fill(&spec, hkv, t - 3, d, &key);
            let (mut twin, _, _) = fill(&spec, hkv, t - 3, d, &key);
            let scale = 1.0 / (d as f32).sqrt();
            let mut token_err = 0.0f64;
            let mut out = Vec::new();
            let mut q = None;
            for i in 0..3u64 {
                let (step_out, kn, vn, qi) = poisoned_step(&mut cache, seed ^ (1000 + i), hkv, rep, d, scale);
                out = step_out;
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
            let pass = err < bound(kb, vb, rep, d, &vd) && token_err == 0.0 && cache.len() == t as usize;
            ok &= pass;
            println!(
                "  hkv={hkv} rep={rep} d={d} t={t} k{kb}v{vb}: new tokens vs MLX quantize {token_err:.2e}  out {err:.2e}  {}",
                if pass { "pass" } else { "FAIL" }
            );
        }
    }
    ok
}

/// `x` (rows of `d`) times the Sylvester Hadamard matrix over sqrt(d), in f64: the frame change
/// the cache's rotations make (its own inverse).
fn hadamard_rows(x: &[f64], d: usize) -> Vec<f64> {
    let h = |j: usize, c: usize| if (j & c).count_ones().is_multiple_of(2) { 1.0 } else { -1.0 } / (d as f64).sqrt();
    x.chunks(d).flat_map(|row| (0..d).map(move |c| (0..d).map(|j| row[j] * h(j, c)).sum::<f64>())).collect()
}

/// The fused decode step entering the cache's stored frame itself (`fused::StoredFrame`: the
/// Hadamard rotations of keys and values, the key center of `KeyLayout::Centered`), as the
/// general choice (`rotkv`) and the recipes' per-token layers (`kc-rotkv`, `rotv`) run it. Per
/// case, three steps through `update_and_attend` on a filled cache and, beside it, a twin cache
/// that takes the same tokens through the MLX-ops write (rotation as an f16 matmul, center
/// subtracted, MLX's `quantize`):
/// - each new token as stored against the twin's: the kernel rotates in f32 and the twin in
///   f16, so a code may round the other way; the bound is one quantization step of the row
///   (its range 2 max|x| over 2^bits - 1) plus 2^-9 max|x| for the f16 scale and bias;
/// - the last output against f64 attention with the query rotated in f64 over the
///   dequantized cache (stored frame), rotated back in f64 when values are rotated, within
///   [`bound`];
/// - every step on the fused step path.
fn frame_step_correctness(seed: u64, quick: bool) -> bool {
    set_option(|o| o.gpu_fused_step = Toggle::On);
    set_option(|o| o.gpu_fused_fold = Toggle::On);
    set_option(|o| o.gpu_fused_rotate = Toggle::On);
    let key = random::key(seed ^ 53).unwrap();
    let mut ok = true;
    println!("fused step in the stored frame (seed {seed}, tensor cores {}): new token vs MLX-ops twin; max |out - f64 ref|; paths", mlx_ext::options::current().gpu_fused_mma.on());
    let pairs = bits_flag().unwrap_or_else(|| if quick { vec![(8, 4), (8, 6)] } else { vec![(8, 4), (4, 4), (8, 6), (6, 6), (4, 2), (2, 3)] });
    // (hkv, rows, d, tokens after the steps, rotation, centered keys): SmolLM2's general choice,
    // Qwen2.5's centered rotated layers (14 query heads over 2), Gemma-3's `rotv` layers,
    // keys alone, and centering alone.
    let cases = [
        (3, 3, 64, 771, mlx_kv::Rotation::KeysAndValues, false),
        (2, 7, 64, 500, mlx_kv::Rotation::KeysAndValues, true),
        (1, 4, 256, 300, mlx_kv::Rotation::Values, false),
        (8, 4, 128, 1000, mlx_kv::Rotation::Keys, false),
        (2, 7, 64, 300, mlx_kv::Rotation::None, true),
    ];
    for &(hkv, rep, d, t, rotation, centered) in &cases {
        for &(kb, vb) in &pairs {
            let mut spec = KvSpec::bits(kb, vb);
            spec.rotation = rotation;
            if centered {
                spec.key_layout = mlx_kv::KeyLayout::Centered;
            }
            let (mut cache, _, _) = fill(&spec, hkv, t - 3, d, &key);
            let (mut twin, _, _) = fill(&spec, hkv, t - 3, d, &key);
            let scale = 1.0 / (d as f32).sqrt();
            let (du, hkvu) = (d as usize, hkv as usize);
            let (mut token_err, mut token_bound, mut paths) = (0.0f64, f64::INFINITY, Vec::new());
            let (mut out, mut q) = (Vec::new(), None);
            for i in 0..3u64 {
                let (step_out, kn, vn, qi) = poisoned_step(&mut cache, seed ^ (3000 + i), hkv, rep, d, scale);
                out = step_out;
                paths.push(cache.last_path().map_or("none", |c| c.path.name()));
                twin.update(&kn, &vn).unwrap();
                twin.eval().unwrap();
                let n = (t - 2 + i as i32) as usize;
                for (mine, theirs, bits) in [
                    (cache.dequantized_keys().unwrap().unwrap(), twin.dequantized_keys().unwrap().unwrap(), kb),
                    (cache.dequantized_values().unwrap().unwrap(), twin.dequantized_values().unwrap().unwrap(), vb),
                ] {
                    let (a, b) = (last_rows(&host(&mine), hkvu, n, du), last_rows(&host(&theirs), hkvu, n, du));
                    for (ra, rb) in a.chunks(du).zip(b.chunks(du)) {
                        let max = rb.iter().fold(0.0f64, |m, x| m.max((*x as f64).abs()));
                        let lim = 2.0 * max / ((1u32 << bits) - 1) as f64 + max * 2f64.powi(-9);
                        token_bound = token_bound.min(lim);
                        let e = ra.iter().zip(rb).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
                        token_err = token_err.max(e / lim);
                    }
                }
                q = Some(qi);
            }
            let kd = host(&cache.dequantized_keys().unwrap().unwrap());
            let vd = host(&cache.dequantized_values().unwrap().unwrap());
            let q64: Vec<f64> = host(q.as_ref().unwrap()).iter().map(|x| *x as f64).collect();
            let q64 = if rotation.keys() { hadamard_rows(&q64, du) } else { q64 };
            let qs: Vec<f32> = q64.iter().map(|x| (x * scale as f64) as f32).collect();
            let mut want = reference(&qs, &kd, &vd, Dims { hq: (hkv * rep) as usize, hkv: hkvu, l: 1, t: t as usize, d: du }, 1.0);
            if rotation.values() {
                want = hadamard_rows(&want, du);
            }
            let err = out.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
            let pass = err < bound(kb, vb, rep, d, &vd) && token_err <= 1.0 && paths.iter().all(|p| *p == "fused-step") && cache.len() == t as usize;
            ok &= pass;
            println!(
                "  hkv={hkv} rep={rep} d={d} t={t} k{kb}v{vb} {rotation:?}{}: new tokens {token_err:.2} of a step (tightest {token_bound:.1e})  out {err:.2e}  paths {paths:?}  {}",
                if centered { " centered" } else { "" },
                if pass { "pass" } else { "FAIL" }
            );
        }
    }
    ok
}

/// Per-channel keys (`attend_channels`): a cache of `t - 3` tokens, then three decode steps
/// (`update_and_attend`, the cache writing each token into its float tail first, as a model
/// layer calls it), each checked against f64 attention over the dequantized cache (body and
/// tail) with the bound of [`bound`], and each required to take the fused kernel. The cases
/// put a key-group edge inside the three steps (the tail fills, is quantized, and the next
/// step runs with an empty tail) or leave a long tail, and cover the recipes' shapes: SmolLM2
/// (D 64, 3 rows), Llama-3.1-8B (D 128, 4 rows), Gemma-3 (D 256, 4 rows, value groups of 128),
/// with keys rotated in one and keys and values in another (the fused step rotates inside its
/// launch, elsewhere MLX ops rotate around the kernel), and with float sink tokens before the
/// body (`--kv-sinks`, read by one warp of the first split).
///
/// With `step` the cache hands each token that fits its tail to the fused per-channel step
/// (`fused::step_channels`, path fused-step: the kernel writes the token into the tail buffers
/// in place), and the reference reads the tail back from those buffers; a step that completes a
/// key group takes the MLX-ops write and fused-gpu. Without `step` every step is fused-gpu.
fn channel_correctness(seed: u64, quick: bool, step: bool) -> bool {
    set_option(|o| o.gpu_fused_step = Toggle::from_bool(step));
    // The in-kernel rotation (on by default) is what this check verifies, whatever the flags say.
    set_option(|o| o.gpu_fused_rotate = Toggle::On);
    let key = random::key(seed ^ 31).unwrap();
    let mut ok = true;
    println!("per-channel keys (seed {seed}, fused step {step}): three decode steps; max |out - f64 ref over dequantized body + tail|; paths");
    let pairs = bits_flag().unwrap_or_else(|| if quick { vec![(6, 6), (4, 4)] } else { vec![(6, 6), (6, 8), (4, 4), (4, 3), (3, 3), (3, 2), (2, 2), (8, 4)] });
    // (hkv, rows, d, key group, value group, tokens after the steps, keys rotated): 770, 1154
    // and 4098 reach a group edge in their first step (the tail fills, is quantized, and that
    // step attends with an empty tail), then start a new tail; 1000 keeps a tail of 104.
    // Rotation: 0 none, 1 keys, 3 keys and values (the fused step rotates inside its one
    // launch; elsewhere matmul ops around the kernel). Sink tokens (last field, `--kv-sinks`)
    // as the shipped recipes keep them: one on SmolLM2's and Gemma's shapes, and 5 once.
    let cases = [
        (3, 3, 64, 64, 64, 770, 0u8, 0usize),
        (8, 4, 128, 128, 64, 1000, 0, 0),
        (1, 4, 256, 64, 128, 1154, 1, 0),
        (2, 1, 64, 128, 64, 4098, 0, 0),
        (3, 3, 64, 128, 64, 1000, 3, 0),
        (3, 3, 64, 128, 64, 1001, 3, 1),
        (1, 4, 256, 64, 128, 1155, 1, 1),
        (8, 4, 128, 128, 64, 1003, 0, 5),
    ];
    for &(hkv, rep, d, gk, gv, t, rot_mode, sinks) in &cases {
        let rotated = rot_mode & 1 != 0;
        for &(kb, vb) in &pairs {
            let mut spec = KvSpec::bits(kb, vb);
            spec.key_layout = mlx_kv::KeyLayout::PerChannel;
            spec.k.group = gk;
            spec.v.group = gv;
            spec.sinks = sinks;
            spec.rotation = match rot_mode {
                0 => mlx_kv::Rotation::None,
                1 => mlx_kv::Rotation::Keys,
                _ => mlx_kv::Rotation::KeysAndValues,
            };
            let (mut cache, _, _) = fill(&spec, hkv, t - 3, d, &key);
            let scale = 1.0 / (d as f32).sqrt();
            let (mut worst, mut paths, mut pass) = (0.0f64, Vec::new(), true);
            for i in 0..3u64 {
                let (out, _, _, q) = poisoned_step(&mut cache, seed ^ (2000 + i), hkv, rep, d, scale);
                let path = cache.last_path().map_or("none", |c| c.path.name());
                paths.push(path);
                // The query as the engine hands it to the kernel: rotated by the same op when
                // keys are; the kernel scales it (in f32), the reference in f64.
                let qr = if rotated {
                    let h = mlx_kv::rotation::hadamard(d as usize, Dtype::Float32).unwrap().as_dtype(q.dtype()).unwrap();
                    mlx_rs::ops::matmul(&q, &h).unwrap()
                } else {
                    q
                };
                let qs: Vec<f32> = host(&qr).iter().map(|x| (*x as f64 * scale as f64) as f32).collect();
                let n = (t - 2 + i as i32) as usize;
                let kd = host(&cache.dequantized_keys().unwrap().unwrap());
                let vd = host(&cache.dequantized_values().unwrap().unwrap());
                let mut want = reference(&qs, &kd, &vd, Dims { hq: (hkv * rep) as usize, hkv: hkv as usize, l: 1, t: n, d: d as usize }, 1.0);
                if rot_mode & 2 != 0 {
                    // Values rotated: the output leaves their frame (times the Hadamard matrix).
                    want = hadamard_rows(&want, d as usize);
                }
                let err = out.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0f64, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) });
                worst = worst.max(err);
                // The step runs where the tail has room: every step but one that completes a
                // key group (t - 2 + i tokens a multiple of gk) or must grow the tail buffer
                // (16-token steps: the tail holding a nonzero multiple of 16 before the token; an
                // emptied tail keeps its buffer).
                let tail_before = (n - 1 - sinks) % gk;
                let room = tail_before == 0 || !tail_before.is_multiple_of(16);
                let want_path = if step && tail_before + 1 < gk && room { "fused-step" } else { "fused-gpu" };
                pass &= err < bound(kb, vb, rep, d, &vd) && path == want_path && cache.len() == n;
            }
            ok &= pass;
            let rot = ["", "-rotk", "", "-rotkv"][rot_mode as usize];
            let sk = if sinks > 0 { format!("-s{sinks}") } else { String::new() };
            println!("  hkv={hkv} rep={rep} d={d} g{gk},{gv} t={}..{t} k{kb}v{vb}-pc{rot}{sk}: out {worst:.2e}  paths {paths:?}  {}", t - 2, if pass { "pass" } else { "FAIL" });
        }
    }
    ok
}

/// Tokens per pool block in the paged check (the serving pool's).
const BLOCK: usize = 256;

/// A pool layer as MLX's `quantize` makes it: codes, scales, biases.
type Pool = (Array, Array, Array);

/// A pool's arrays on the host: u32 code words, and scales and biases as f32 (f16 widens
/// exactly, so equality is bit equality).
struct HostPool {
    w: Vec<u32>,
    s: Vec<f32>,
    b: Vec<f32>,
}

fn host_pool(p: &Pool) -> HostPool {
    // The kernel writes the evaluated arrays in place; reading them again sees its writes.
    HostPool { w: p.0.as_slice::<u32>().to_vec(), s: host(&p.1), b: host(&p.2) }
}

/// Code `j` of row `row` (`wpr` u32 words per row), as MLX packs them: one little-endian bit
/// stream per row, code j at bit j * bits (a 3- or 6-bit code may straddle two words).
fn code(w: &[u32], row: usize, wpr: usize, bits: usize, j: usize) -> u32 {
    let (word, shift) = (row * wpr + j * bits / 32, j * bits % 32);
    let hi = if shift + bits > 32 { (w[word + 1] as u64) << 32 } else { 0 };
    (((hi | w[word] as u64) >> shift) & ((1u64 << bits) - 1)) as u32
}

/// Row `row` of a pool dequantized exactly (code * scale + bias, groups of 64, in f64).
fn dequant_row(p: &HostPool, row: usize, d: usize, bits: usize) -> Vec<f64> {
    let (wpr, gpr) = (d * bits / 32, d / 64);
    (0..d).map(|j| code(&p.w, row, wpr, bits, j) as f64 * p.s[row * gpr + j / 64] as f64 + p.b[row * gpr + j / 64] as f64).collect()
}

/// Shapes of the paged check: KV heads, query rows per KV head, head_dim, and the sequences'
/// lengths after the step (1 token; exactly a block; one token into a new block; many splits
/// with short sequences whose later splits are empty; with S * Hkv >= 1022 the fold does not
/// apply and two launches run).
fn paged_cases(quick: bool) -> Vec<(i32, i32, i32, Vec<usize>)> {
    let mut cases = vec![
        (8, 4, 128, vec![1]),
        (3, 3, 64, vec![1, 256, 257]),
        (2, 8, 128, vec![1, 256, 257, 512, 513, 1000, 31, 32, 33, 100, 768, 769, 2000, 5, 300, 1500]),
        (1, 5, 128, vec![5000, 3, 512]),
        (2, 1, 64, vec![769, 32, 33]),
    ];
    if !quick {
        cases.push((8, 1, 64, (0..128).map(|i| i * 37 % 300 + 1).collect()));
    }
    cases
}

/// The paged decode step (`decode_step_paged`): S sequences whose rows live in a shuffled
/// block pool with spare blocks, one launch per layer. Checks each new row against MLX's
/// `quantize` of the same token (codes within one step where a rounding tie may break the
/// other way, scales and biases within the narrower dtype's rounding), that no other row of
/// the pool changed, that the arrival counters are zero again, and the output against f64
/// attention over the pool's dequantized rows with queries scaled in f64 (the bound of
/// [`bound`] plus the output dtype's rounding).
fn paged_correctness(seed: u64, quick: bool, fold: bool) -> bool {
    use mlx_kv::attention::fused::{decode_step_paged, poison_outputs, PagedPool};
    use rand::{seq::SliceRandom, SeedableRng};
    set_option(|o| o.gpu_fused_fold = Toggle::from_bool(fold));
    let launches = if fold { "one launch where it fits" } else { "two launches" };
    println!("paged decode step, {launches} (seed {seed}, tensor cores {}): new rows vs MLX quantize; rest of pool; ctr; max |out - f64 ref|", mlx_ext::options::current().gpu_fused_mma.on());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 21);
    // One counter array for every launch, as a server keeps it: each launch must leave it zero.
    // A device buffer of its own, as a server would make it (see `fused::decode_step_paged`).
    let zeros = || Array::from_slice(&[0i32; 1024], &[1024]).add(Array::from_int(0)).unwrap();
    let mut ctr = zeros();
    ctr.eval().unwrap();
    let pairs: Vec<(u8, u8)> = bits_flag().unwrap_or_else(|| if quick { vec![(8, 4)] } else { vec![(8, 4), (4, 4), (8, 8), (6, 6), (3, 3)] });
    let mut ok = true;
    for (ci, (hkv, rep, d, lens)) in paged_cases(quick).into_iter().enumerate() {
        let (s, ud, uh) = (lens.len(), d as usize, hkv as usize);
        let blocks: Vec<usize> = lens.iter().map(|t| t.div_ceil(BLOCK)).collect();
        // One zero column past the longest sequence's blocks, and spare blocks no table names.
        let width = 2 + blocks.iter().max().unwrap();
        let nb = blocks.iter().sum::<usize>() + 3;
        let mut ids: Vec<usize> = (0..nb).collect();
        ids.shuffle(&mut rng);
        let mut table = vec![0i32; s * width];
        let mut next = ids.into_iter();
        for (i, (&t, &n)) in lens.iter().zip(&blocks).enumerate() {
            table[i * width] = t as i32;
            for j in 0..n {
                table[i * width + 1 + j] = next.next().unwrap() as i32;
            }
        }
        let table_arr = Array::from_slice(&table, &[s as i32, width as i32]);
        let max_t = *lens.iter().max().unwrap();
        let row_of = |i: usize, h: usize, t: usize| (table[i * width + 1 + t / BLOCK] as usize * uh + h) * BLOCK + t % BLOCK;
        let shown = if s <= 3 { format!("T={lens:?}") } else { format!("S={s} T=1..{max_t}") };
        for (bi, &(kb, vb)) in pairs.iter().enumerate() {
            let qdt = if (ci + bi) % 2 == 0 { Dtype::Float16 } else { Dtype::Bfloat16 };
            let keys = random::split(random::key(seed ^ (5000 + 16 * ci as u64 + bi as u64)).unwrap(), 2).unwrap();
            let (k1, k2) = random::split(&keys.0, 2).unwrap();
            let (k3, k4) = random::split(&keys.1, 2).unwrap();
            let pool = |bits: u8, key: &Array| -> Pool {
                let x = random::normal::<f32>(&[nb as i32, hkv, BLOCK as i32, d], None, None, key).unwrap().as_dtype(Dtype::Float16).unwrap();
                let p = mlx_rs::ops::quantize(&x, 64, bits as i32).unwrap();
                eval([&p.0, &p.1, &p.2]).unwrap();
                p
            };
            let (kp, vp) = (pool(kb, &k1), pool(vb, &k2));
            let new = |key: &Array| random::normal::<f32>(&[s as i32, hkv, 1, d], None, None, key).unwrap().as_dtype(qdt).unwrap();
            let (kn, vn) = (new(&k3), new(&k4));
            let q = random::normal::<f32>(&[s as i32, hkv * rep, 1, d], None, None, &keys.1).unwrap().as_dtype(qdt).unwrap();
            let (before_k, before_v) = (host_pool(&kp), host_pool(&vp));
            let scale = 1.0 / (d as f32).sqrt();
            fn operand(p: &Pool, bits: u8) -> PagedPool<'_> {
                PagedPool { w: &p.0, scales: &p.1, biases: &p.2, bits, group: 64 }
            }
            poison_outputs(true);
            let got = decode_step_paged(&q, &kn, &vn, operand(&kp, kb), operand(&vp, vb), &table_arr, &ctr, max_t, scale).map(|o| host(&o));
            poison_outputs(false);
            let out = match got {
                Ok(o) => o,
                Err(e) => {
                    println!("  hkv={hkv} rep={rep} d={d} {shown} k{kb}v{vb}: {e}  FAIL");
                    ok = false;
                    continue;
                }
            };
            let (after_k, after_v) = (host_pool(&kp), host_pool(&vp));
            let ctr_zero = ctr.as_slice::<i32>().iter().all(|&c| c == 0);
            // New rows against MLX's quantize of the same tokens; every other row unchanged.
            let (mut code_diff, mut codes_differ, mut sb_err, mut untouched) = (0u32, 0usize, 0.0f64, true);
            let sb_tol = if qdt == Dtype::Float16 { 2f64.powi(-11) } else { 2f64.powi(-8) };
            for (new_x, bits, before, after) in [(&kn, kb as usize, &before_k, &after_k), (&vn, vb as usize, &before_v, &after_v)] {
                let (mw, ms, mb) = mlx_rs::ops::quantize(new_x, 64, bits as i32).unwrap();
                let (mw, ms, mb) = (mw.as_dtype(Dtype::Uint32).unwrap(), host(&ms), host(&mb));
                mw.eval().unwrap();
                let mw = mw.as_slice::<u32>();
                let (wpr, gpr) = (ud * bits / 32, ud / 64);
                let mut fresh = vec![false; nb * uh * BLOCK];
                for (i, &t) in lens.iter().enumerate() {
                    for h in 0..uh {
                        let row = row_of(i, h, t - 1);
                        fresh[row] = true;
                        for j in 0..ud {
                            let (a, b) = (code(&after.w, row, wpr, bits, j), code(mw, i * uh + h, wpr, bits, j));
                            code_diff = code_diff.max(a.abs_diff(b));
                            codes_differ += (a != b) as usize;
                        }
                        for g in 0..gpr {
                            for (x, y) in [(after.s[row * gpr + g], ms[(i * uh + h) * gpr + g]), (after.b[row * gpr + g], mb[(i * uh + h) * gpr + g])] {
                                let e = (x as f64 - y as f64).abs() / (x.abs().max(y.abs()) as f64).max(1e-6);
                                sb_err = if e.is_nan() { f64::INFINITY } else { sb_err.max(e) };
                            }
                        }
                    }
                }
                for row in (0..nb * uh * BLOCK).filter(|r| !fresh[*r]) {
                    untouched &= before.w[row * wpr..(row + 1) * wpr] == after.w[row * wpr..(row + 1) * wpr]
                        && before.s[row * gpr..(row + 1) * gpr] == after.s[row * gpr..(row + 1) * gpr]
                        && before.b[row * gpr..(row + 1) * gpr] == after.b[row * gpr..(row + 1) * gpr];
                }
            }
            // f64 attention over the pool rows the table names, the kernel's new rows included.
            let qh = host(&q);
            let hq = uh * rep as usize;
            let (mut err, mut worst, mut vmax) = (0.0f64, 0.0f64, 0.0f64);
            let out_u = if qdt == Dtype::Float16 { 2f64.powi(-11) } else { 2f64.powi(-8) };
            let mut want = vec![0.0f64; s * hq * ud];
            for (i, &len) in lens.iter().enumerate() {
                for h in 0..uh {
                    let kr: Vec<Vec<f64>> = (0..len).map(|t| dequant_row(&after_k, row_of(i, h, t), ud, kb as usize)).collect();
                    let vr: Vec<Vec<f64>> = (0..len).map(|t| dequant_row(&after_v, row_of(i, h, t), ud, vb as usize)).collect();
                    vmax = vr.iter().flatten().fold(vmax, |m, x| m.max(x.abs()));
                    for r in 0..rep as usize {
                        let o = (i * hq + h * rep as usize + r) * ud;
                        let qr: Vec<f64> = qh[o..o + ud].iter().map(|x| *x as f64 * scale as f64).collect();
                        let sc: Vec<f64> = kr.iter().map(|k| k.iter().zip(&qr).map(|(a, b)| a * b).sum()).collect();
                        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for x in 0..ud {
                            want[o + x] = vr.iter().zip(&e).map(|(v, p)| v[x] * p).sum::<f64>() / z;
                        }
                    }
                }
            }
            let b = bound_vmax(kb, vb, rep, d, vmax);
            for (g, w) in out.iter().zip(&want) {
                let e = (*g as f64 - w).abs();
                let e = if e.is_nan() { f64::INFINITY } else { e };
                err = err.max(e);
                worst = worst.max(e / (b + w.abs() * out_u));
            }
            let pass = worst <= 1.0 && code_diff <= 1 && sb_err <= sb_tol + 2f64.powi(-11) && untouched && ctr_zero;
            ok &= pass;
            println!(
                "  hkv={hkv} rep={rep} d={d} {shown} k{kb}v{vb} q={qdt:?}: new rows: codes off by <= {code_diff} ({codes_differ} differ), scales/biases rel {sb_err:.1e}; rest of pool {}; ctr {}; out {err:.2e} ({:.0}% of bound)  {}",
                if untouched { "unchanged" } else { "CHANGED" },
                if ctr_zero { "zero" } else { "NOT ZERO" },
                worst * 100.0,
                if pass { "pass" } else { "FAIL" }
            );
            if !ctr_zero {
                // Later launches would start from wrong counts: reset so they are judged alone.
                ctr = zeros();
                ctr.eval().unwrap();
            }
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
    if std::env::args().any(|a| a == "--no-mma") {
        set_option(|o| o.gpu_fused_mma = Toggle::from_bool(false));
    }
    if std::env::args().any(|a| a == "--check") {
        // The default path only (tensor cores where they apply unless --no-mma, one launch per step).
        let ok = correctness(seed, false, quick) & step_correctness(seed, quick, true) & paged_correctness(seed, quick, true) & frame_step_correctness(seed, quick);
        finish(ok);
    }
    if std::env::args().any(|a| a == "--frame") {
        finish(frame_step_correctness(seed, quick));
    }
    if std::env::args().any(|a| a == "--channels") {
        let mut ok = true;
        for (step, fold) in [(true, true), (true, false), (false, true)] {
            set_option(|o| o.gpu_fused_fold = Toggle::from_bool(fold));
            ok &= channel_correctness(seed, quick, step);
        }
        finish(ok);
    }
    if std::env::args().any(|a| a == "--paged") {
        let mut ok = true;
        for mma in [true, false] {
            set_option(|o| o.gpu_fused_mma = Toggle::from_bool(mma));
            ok &= paged_correctness(seed, quick, false);
            ok &= paged_correctness(seed, quick, true);
        }
        finish(ok);
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
        for (label, spec) in [
            ("fp16", KvSpec::dense()),
            ("k8v8", KvSpec::bits(8, 8)),
            ("k8v4", KvSpec::bits(8, 4)),
            ("k6v6", KvSpec::bits(6, 6)),
            ("k4v4", KvSpec::bits(4, 4)),
            ("k4v2", KvSpec::bits(4, 2)),
        ] {
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
    finish(ok);
}

/// The summary line, and the exit status: non-zero if any check failed.
fn finish(ok: bool) -> ! {
    println!("fused_check: {}", if ok { "PASS" } else { "FAIL" });
    std::process::exit(if ok { 0 } else { 1 });
}
