//! Where decode time goes on the default model: the whole step, then its parts timed alone
//! (the weight matmuls of one layer as quantized vs dense f32, the tied output head, one
//! attention step over the cache, and per-op overhead).
//!
//! Usage: decode_profile [DEPTH]   (default 1024 tokens of context)

use mlx_kv::{CacheOptions, KvCache, KvSpec};
use mlx_rs::ops::{dequantize, matmul, quantize, quantized_matmul};
use mlx_rs::{random, Array, Dtype};
use std::time::Instant;

fn median_ms(iters: usize, mut f: impl FnMut() -> Array) -> f64 {
    for _ in 0..3 {
        f().eval().unwrap();
    }
    let mut v: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f().eval().unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// CPU nanoseconds used so far by all threads of this process (scheduler statistics): a
/// measure of work that other jobs on the machine disturb far less than wall time.
fn cpu_ns() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .expect("Linux /proc")
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

fn main() {
    let depth: usize = std::env::args().nth(1).map_or(1024, |s| s.parse().expect("DEPTH must be a number"));
    let home = std::env::var("KVSPLIT_CACHE").unwrap_or_else(|_| format!("{}/.cache/kvsplit-mlx", std::env::var("HOME").unwrap()));
    let path = std::path::PathBuf::from(home).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let loaded = models::load::load(&path, Dtype::Float32).expect("load the default model (scripts/setup.sh)");
    let model = loaded.model.as_ref();
    let ids: Vec<u32> = (0..depth as u32).map(|i| 100 + (i * 7919) % 40000).collect();
    println!("SmolLM2-135M Q4_1, MLX CPU, f32 compute, depth {depth}");
    for (label, spec) in [("fp16", KvSpec::dense()), ("k8v4", KvSpec::bits(8, 4))] {
        let mut caches: Vec<KvCache> = (0..model.n_layers())
            .map(|_| KvCache::new(spec.clone(), model.head_dim(), CacheOptions::default()).unwrap())
            .collect();
        let t = Instant::now();
        models::generate::prefill(model, &mut caches, &ids, 512).unwrap();
        let prefill = t.elapsed().as_secs_f64();
        let mut tok = Array::from_slice(&[42i32], &[1, 1]);
        let step = median_ms(16, || {
            let logits = model.forward(&tok, &mut caches, true).unwrap();
            let next = mlx_rs::ops::indexing::argmax_axis(&logits, -1, None).unwrap().as_dtype(Dtype::Int32).unwrap();
            tok = next.reshape(&[1, 1]).unwrap();
            tok.clone()
        });
        println!("{label}: prefill {:.1} tok/s, decode step {step:.2} ms ({:.1} tok/s)", depth as f64 / prefill, 1e3 / step);
        // The same step split into building the graph (Rust + mlx-c, no computation) and
        // evaluating it (MLX's scheduler and the kernels).
        let (mut build, mut run) = (Vec::new(), Vec::new());
        let c0 = cpu_ns();
        for _ in 0..16 {
            let t = Instant::now();
            let logits = model.forward(&tok, &mut caches, true).unwrap();
            let next = mlx_rs::ops::indexing::argmax_axis(&logits, -1, None).unwrap().as_dtype(Dtype::Int32).unwrap();
            build.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            next.eval().unwrap();
            run.push(t.elapsed().as_secs_f64() * 1e3);
            tok = next.reshape(&[1, 1]).unwrap();
        }
        let cpu = (cpu_ns() - c0) as f64 / 1e6 / 16.0;
        build.sort_by(|a, b| a.partial_cmp(b).unwrap());
        run.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{label}: graph build {:.2} ms, eval {:.2} ms (medians); CPU time {cpu:.2} ms per step (all threads)", build[8], run[8]);
        if let Ok(path) = std::env::var("DECODE_PROFILE_DOT") {
            // One step's graph as Graphviz, to count the ops a decode step schedules.
            let logits = model.forward(&tok, &mut caches, true).unwrap();
            let path = std::ffi::CString::new(format!("{path}.{label}.dot")).unwrap();
            unsafe {
                extern "C" {
                    fn fopen(p: *const std::ffi::c_char, m: *const std::ffi::c_char) -> *mut mlx_sys::FILE;
                    fn fclose(f: *mut mlx_sys::FILE) -> i32;
                }
                let f = fopen(path.as_ptr(), c"w".as_ptr());
                let outs = mlx_sys::mlx_vector_array_new();
                mlx_sys::mlx_vector_array_append_value(outs, logits.as_ptr());
                mlx_sys::mlx_export_to_dot(f, mlx_sys::mlx_node_namer_new(), outs);
                mlx_sys::mlx_vector_array_free(outs);
                fclose(f);
            }
            logits.eval().unwrap();
        }
    }

    // The parts, with SmolLM2's shapes.
    let x = random::normal::<f32>(&[1, 1, 576], None, None, None).unwrap();
    let part = |name: &str, rows: i32, cols: i32, bits: i32| {
        let w = random::normal::<f32>(&[rows, cols], None, None, None).unwrap();
        let (q, s, b) = quantize(&w, 32, bits).unwrap();
        let xin = random::normal::<f32>(&[1, 1, cols], None, None, None).unwrap();
        let dense = dequantize(&q, &s, &b, 32, bits).unwrap();
        mlx_rs::transforms::eval([&q, &s, &b, &dense, &xin]).unwrap();
        let tq = median_ms(20, || quantized_matmul(&xin, &q, &s, &b, true, 32, bits).unwrap());
        let td = median_ms(20, || matmul(&xin, dense.t()).unwrap());
        let tk = median_ms(20, || mlx_ext::cpu::quantized_matvec(&xin, &q, &s, &b, 32, bits).unwrap());
        println!("{name} [{rows}x{cols}] q{bits}: MLX quantized_matmul {tq:.3} ms, dense f32 matmul {td:.3} ms, our matvec {tk:.3} ms");
        (tk, td)
    };
    let mut per_layer = (0.0, 0.0);
    for (n, r, c) in [("q_proj", 576, 576), ("k_proj", 192, 576), ("v_proj", 192, 576), ("o_proj", 576, 576), ("gate_proj", 1536, 576), ("up_proj", 1536, 576), ("down_proj", 576, 1536)] {
        let (a, b) = part(n, r, c, 4);
        per_layer.0 += a;
        per_layer.1 += b;
    }
    println!("weight matmuls per layer: our matvec {:.2} ms, dense {:.2} ms; x30 layers: {:.1} / {:.1} ms", per_layer.0, per_layer.1, 30.0 * per_layer.0, 30.0 * per_layer.1);
    part("lm_head (tied embedding)", 49152, 576, 8);
    let add = median_ms(50, || &x + &x);
    println!("one tiny op (eval round trip): {add:.3} ms");
}
