//! One MoE block's time on the CPU by expert path (issue #21): MLX's `gather_qmm` against our
//! packed matvec per selected expert (the CPU's default) and against the same per-expert route
//! on MLX's own kernels (`--cpu-kernels off`), for TOKENS tokens (default 1: a decode step), at
//! real models' expert shapes: random 4-bit g64 affine weights, and MXFP4 for gpt-oss-20b (as it
//! ships). Prints one CSV row per (shape, path): median ms per block.
//!
//! `cargo run --release -p models --example moe_cpu_decode [REPEATS] [TOKENS] [SHAPE]`

use mlx_ext::microscaled::MxFormat;
use mlx_ext::{EngineOptions, Toggle};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::quantize;
use mlx_rs::{random, Array, Dtype};
use models::decoder::FeedForward;
use models::moe::{ExpertPath, Routing, SparseMoe};
use models::weights::{Weight, WeightMap};
use std::time::Instant;

/// (name, hidden, expert width, experts, top k, MXFP4 experts)
const SHAPES: &[(&str, usize, usize, usize, usize, bool)] = &[
    ("qwen3-30b-a3b", 2048, 768, 128, 8, false),
    ("mixtral-8x7b", 4096, 14336, 8, 2, false),
    ("gpt-oss-20b", 2880, 2880, 32, 4, true),
];

fn quant(shape: &[usize], mxfp4: bool) -> Weight {
    let dims: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
    let w = (random::normal::<f32>(&dims, None, None, None).unwrap() * 0.02).as_dtype(Dtype::Float16).unwrap();
    w.eval().unwrap();
    if mxfp4 {
        // Expert by expert, each evaluated: MLX's CPU quantizer in this mode keeps whole-tensor
        // temporaries, and a 32-expert stack at once ran this 24 GB machine out of memory.
        let (mut ws, mut ss) = (Vec::new(), Vec::new());
        for e in 0..dims[0] {
            let (q, s) = mlx_ext::microscaled::quantize(&w.index(e), MxFormat::Mxfp4).unwrap();
            mlx_rs::transforms::eval([&q, &s]).unwrap();
            ws.push(q);
            ss.push(s);
        }
        let (w, scales) = (mlx_rs::ops::stack(&ws, 0).unwrap(), mlx_rs::ops::stack(&ss, 0).unwrap());
        return Weight::Mx { w, scales, format: MxFormat::Mxfp4 };
    }
    let (w, scales, biases) = quantize(&w, 64, 4).unwrap();
    Weight::Quant { w, scales, biases, bits: 4, group: 64 }
}

fn block(h: usize, inter: usize, e: usize, k: usize, mxfp4: bool) -> SparseMoe {
    let p = "m";
    let mut w = WeightMap::new("random".into());
    w.insert(format!("{p}.gate.weight"), Weight::Dense(random::normal::<f32>(&[e as i32, h as i32], None, None, None).unwrap().as_dtype(Dtype::Float16).unwrap()));
    w.insert(format!("{p}.switch_mlp.gate_proj.weight"), quant(&[e, inter, h], mxfp4));
    w.insert(format!("{p}.switch_mlp.up_proj.weight"), quant(&[e, inter, h], mxfp4));
    w.insert(format!("{p}.switch_mlp.down_proj.weight"), quant(&[e, h, inter], mxfp4));
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
    println!("shape,weights,hidden,expert_width,experts,top_k,tokens,path,median_ms,repeats");
    let only = std::env::args().nth(3);
    for &(name, h, inter, e, k, mxfp4) in SHAPES.iter().filter(|s| only.as_deref().is_none_or(|o| o == s.0)) {
        let mut moe = block(h, inter, e, k, mxfp4);
        let x = random::normal::<f32>(&[1, tokens, h as i32], None, None, None).unwrap().as_dtype(Dtype::Float16).unwrap();
        x.eval().unwrap();
        let paths = [("per-expert-matvec", ExpertPath::PerExpert, Toggle::On), ("per-expert-mlx-kernels", ExpertPath::PerExpert, Toggle::Off), ("gather_qmm", ExpertPath::Gathered, Toggle::On)];
        for (path, how, ours) in paths {
            mlx_ext::options::install(EngineOptions { cpu_kernels: ours, ..EngineOptions::default() }).unwrap();
            moe = moe.with_expert_path(how);
            let ms = median_ms(&moe, &x, repeats);
            let weights = if mxfp4 { "mxfp4" } else { "affine-q4g64" };
            println!("{name},{weights},{h},{inter},{e},{k},{tokens},{path},{ms:.3},{repeats}");
        }
    }
}
