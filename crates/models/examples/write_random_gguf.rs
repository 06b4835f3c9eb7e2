//! Writes a random-weight Llama model as a Q4_0 GGUF file (`models::random_gguf`), so that this
//! engine (`bench --model FILE`) and llama.cpp (`llama-bench -m FILE`) are timed on the very
//! same file on the lent GPU machine, which cannot download models and whose calls carry at
//! most 64 MiB: the file (4.5 GB for Llama-3.1-8B) is made there in seconds.
//!
//! Usage: write_random_gguf PRESET OUT.gguf [SEED]   (PRESET: llama3.1-8b or tiny; SEED: 0)

use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let usage = "usage: write_random_gguf PRESET OUT.gguf [SEED]   (PRESET: llama3.1-8b, tiny)";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(preset), Some(out)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let seed = match args.get(2).map(|s| s.parse::<u64>()) {
        None => 0,
        Some(Ok(s)) => s,
        Some(Err(_)) => {
            eprintln!("write_random_gguf: SEED '{}' is not a whole number\n{usage}", args[2]);
            std::process::exit(2);
        }
    };
    let out = PathBuf::from(out);
    let t = Instant::now();
    if let Err(e) = models::random_gguf::write_random_llama_gguf(preset, &out, seed) {
        eprintln!("write_random_gguf: {e}");
        std::process::exit(1);
    }
    let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({:.2} GB, preset {preset}, seed {seed}) in {:.1} s", out.display(), bytes as f64 / 1e9, t.elapsed().as_secs_f64());
}
