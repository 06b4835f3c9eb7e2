//! One MoE block's time on the CPU by expert path (issue #21): MLX's `gather_qmm` against our
//! packed matvec per selected expert (the CPU's default), for
//! TOKENS tokens (default 1: a decode step), at real models' expert shapes with random 4-bit
//! g64 weights. Prints one CSV row per (shape, path): median ms per block.
//!
//! `cargo run --release -p models --example moe_cpu_decode [REPEATS] [TOKENS]`

use mlx_rs::ops::quantize;
use mlx_rs::{random, Array, Dtype};
use models::decoder::FeedForward;
use models::moe::{ExpertPath, Routing, SparseMoe};
use models::weights::{Weight, WeightMap};
use std::time::Instant;

/// (name, hidden, expert width, experts, top k)
const SHAPES: &[(&str, usize, usize, usize, usize)] =
    &[("qwen3-30b-a3b", 2048, 768, 128, 8), ("mixtral-8x7b", 4096, 14336, 8, 2)];

fn quant(shape: &[usize]) -> Weight {
    let dims: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
    let w = (random::normal::<f32>(&dims, None, None, None).unwrap() * 0.02).as_dtype(Dtype::Float16).unwrap();
    let (w, scales, biases) = quantize(&w, 64, 4).unwrap();
    Weight::Quant { w, scales, biases, bits: 4, group: 64 }
}

fn block(h: usize, inter: usize, e: usize, k: usize) -> SparseMoe {
    let p = "m";
    let mut w = WeightMap::new("random".into());
    w.insert(format!("{p}.gate.weight"), Weight::Dense(random::normal::<f32>(&[e as i32, h as i32], None, None, None).unwrap().as_dtype(Dtype::Float16).unwrap()));
    w.insert(format!("{p}.switch_mlp.gate_proj.weight"), quant(&[e, inter, h]));
    w.insert(format!("{p}.switch_mlp.up_proj.weight"), quant(&[e, inter, h]));
    w.insert(format!("{p}.switch_mlp.down_proj.weight"), quant(&[e, h, inter]));
    let moe = SparseMoe::load(&mut w, p, h, inter, e, k, Routing::SoftmaxThenTopK { renormalize: true }).unwrap();
    mlx_rs::transforms::eval(moe.arrays()).unwrap();
    moe
}

fn median_ms(moe: &SparseMoe, x: &Array, repeats: usize) -> f64 {
    for _ in 0..2 {
        moe.forward(x).unwrap().eval().unwrap();
    }
    let mut t: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            moe.forward(x).unwrap().eval().unwrap();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let arg = |i: usize, default: usize| std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (repeats, tokens) = (arg(1, 10), arg(2, 1) as i32);
    println!("shape,hidden,expert_width,experts,top_k,tokens,path,median_ms,repeats");
    for &(name, h, inter, e, k) in SHAPES {
        let mut moe = block(h, inter, e, k);
        let x = random::normal::<f32>(&[1, tokens, h as i32], None, None, None).unwrap().as_dtype(Dtype::Float16).unwrap();
        x.eval().unwrap();
        for (path, how) in [("per-expert-matvec", ExpertPath::PerExpert), ("gather_qmm", ExpertPath::Gathered)] {
            moe = moe.with_expert_path(how);
            let ms = median_ms(&moe, &x, repeats);
            println!("{name},{h},{inter},{e},{k},{tokens},{path},{ms:.3},{repeats}");
        }
    }
}
