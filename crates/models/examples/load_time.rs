//! Load time of model files and directories (weights, config and tokenizer, evaluated), for
//! comparing a GGUF with its converted MLX directory. Each path is loaded REPEATS times in this
//! process, alternating between paths so both see the same machine load; one JSON line per
//! path gives every time and the median, and the median time of building the tokenizer alone
//! (the `tokenizers` pipeline from GGUF metadata, or from a directory's tokenizer.json).
//!
//! Usage: load_time [--dense] REPEATS PATH [PATH ...]   (`--dense`: the engine's `--weights dense`)

use mlx_rs::Dtype;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let usage = "usage: load_time [--dense] REPEATS PATH [PATH ...]";
    if args.peek().is_some_and(|a| a == "--dense") {
        args.next();
        let o = mlx_ext::EngineOptions { weights: mlx_ext::WeightMode::Dense, ..Default::default() };
        mlx_ext::options::install(o).expect("no kernel has run yet");
    }
    let repeats: usize = args.next().and_then(|s| s.parse().ok()).filter(|&r| r > 0).expect(usage);
    let paths: Vec<std::path::PathBuf> = args.map(Into::into).collect();
    assert!(!paths.is_empty(), "{usage}");
    let mut times = vec![Vec::new(); paths.len()];
    let mut tok_times = vec![Vec::new(); paths.len()];
    for _ in 0..repeats {
        for (i, p) in paths.iter().enumerate() {
            let t = Instant::now();
            let loaded = models::load::load(p, Dtype::Float32).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            times[i].push(t.elapsed().as_secs_f64());
            drop(loaded);
            let t = Instant::now();
            if p.is_dir() {
                models::tokenizer_json::load(p, None).unwrap();
            } else {
                models::tokenizer::Tokenizer::from_gguf(&models::gguf::GgufFile::open(p).unwrap()).unwrap();
            }
            tok_times[i].push(t.elapsed().as_secs_f64());
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    for ((p, mut t), tok) in paths.iter().zip(times).zip(tok_times) {
        let all = t.clone();
        t.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{{\"path\": {:?}, \"repeats\": {repeats}, \"median_s\": {:.3}, \"tokenizer_median_s\": {:.3}, \"times_s\": {:?}, \"weights\": {:?}}}",
            p.display().to_string(),
            t[t.len() / 2],
            median(tok),
            all.iter().map(|x| (x * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            format!("{:?}", mlx_ext::options::current().weights),
        );
    }
}
