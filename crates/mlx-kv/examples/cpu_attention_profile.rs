//! CPU cost of one attention call through `KvCache` per K/V setting (SmolLM2-135M's shape: 9
//! query heads over 3 KV heads, head_dim 64), as CPU time summed over all threads, which a busy
//! machine disturbs far less than wall time. Run with `OPENBLAS_NUM_THREADS=1` to count work
//! rather than spinning BLAS threads.
//!
//! Usage: cpu_attention_profile [DEPTHS=64,1024,4096,16384] [QUERIES=1] [ITERS=50]

use mlx_kv::{CacheOptions, KvCache, KvSpec};
use mlx_rs::random;
use std::time::Instant;

/// CPU nanoseconds used so far by all threads of this process (scheduler statistics).
fn cpu_ns() -> u64 {
    let tasks = std::fs::read_dir("/proc/self/task").expect("Linux /proc");
    tasks
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

fn main() {
    let arg = |i: usize, d: &str| std::env::args().nth(i).unwrap_or_else(|| d.to_string());
    let depths: Vec<usize> = arg(1, "64,1024,4096,16384").split(',').map(|s| s.parse().expect("DEPTHS: numbers")).collect();
    let l: i32 = arg(2, "1").parse().expect("QUERIES: a number");
    let iters: usize = arg(3, "50").parse().expect("ITERS: a number");
    let (hkv, rep, d) = (3, 3, 64);
    let rand = |shape: &[i32]| random::normal::<f32>(shape, None, None, None).unwrap();
    println!("| kv | depth | queries | update+attend cpu ms | attend cpu ms | wall ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    for &t in &depths {
        for (name, spec) in [("fp16", KvSpec::dense()), ("k8v8", KvSpec::bits(8, 8)), ("k8v4", KvSpec::bits(8, 4)), ("k4v4", KvSpec::bits(4, 4))] {
            let opts = CacheOptions { max_size: None, max_chunk: 1024 };
            let mut cache = KvCache::new(spec, d as usize, opts).unwrap();
            let mut filled = 0;
            while filled < t {
                let n = (t - filled).min(1024) as i32;
                cache.update(&rand(&[1, hkv, n, d]), &rand(&[1, hkv, n, d])).unwrap();
                filled += n as usize;
            }
            let (q, k, v) = (rand(&[1, hkv * rep, l, d]), rand(&[1, hkv, l, d]), rand(&[1, hkv, l, d]));
            mlx_rs::transforms::eval([&q, &k, &v]).unwrap();
            let mut step = || {
                cache.update_and_attend(&q, &k, &v, 0.125, None).unwrap().eval().unwrap();
                cache.trim(l as usize);
            };
            for _ in 0..3 {
                step();
            }
            let (c0, w0) = (cpu_ns(), Instant::now());
            for _ in 0..iters {
                step();
            }
            let both = (cpu_ns() - c0) as f64 / 1e6 / iters as f64;
            let wall = w0.elapsed().as_secs_f64() * 1e3 / iters as f64;
            let c1 = cpu_ns();
            for _ in 0..iters {
                cache.attend(&q, 0.125, None).unwrap().eval().unwrap();
            }
            let attend = (cpu_ns() - c1) as f64 / 1e6 / iters as f64;
            println!("| {name} | {t} | {l} | {both:.3} | {attend:.3} | {wall:.3} |");
        }
    }
}
