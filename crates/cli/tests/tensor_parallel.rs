//! Tensor parallelism over MLX's ring backend (issue #22): two ranks on 127.0.0.1, started by
//! `scripts/launch-local.sh` as MLX's launcher would, must produce the single process's greedy
//! text with each rank holding half of its KV cache, for a 16-bit and a split-precision cache.
//! Qwen2.5-Coder-0.5B (2 KV heads, 14 query heads) splits evenly; the default model (3 KV heads)
//! must be refused with the numbers. Every run is bounded by the launcher's timeout.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROMPT: &str = "def fibonacci(n):";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// (stdout, stderr, success) of `generate` with `args`, alone or as `ranks` ranks.
fn generate(ranks: Option<usize>, model: &Path, kv: &str) -> (String, String, bool) {
    let bin = env!("CARGO_BIN_EXE_kvsplit-mlx");
    let mut args: Vec<String> = ["generate", "--kv", kv, "--max-tokens", "16", "--prompt", PROMPT, "--model"].iter().map(|s| s.to_string()).collect();
    args.push(model.display().to_string());
    let mut cmd = match ranks {
        None => Command::new(bin),
        Some(n) => {
            let mut c = Command::new(root().join("scripts/launch-local.sh"));
            c.args(["--timeout", "300", &n.to_string(), bin, "--distributed", "ring"]);
            c
        }
    };
    let out = cmd.args(&args).output().expect("run kvsplit-mlx");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned(), out.status.success())
}

/// The generated text: stdout up to the summary.
fn text(stdout: &str) -> &str {
    stdout.split("==========").next().unwrap()
}

/// The single process's `KV cache: X MB` figure in bytes.
fn kv_bytes_alone(stdout: &str) -> f64 {
    let mb: f64 = stdout.lines().find_map(|l| l.strip_prefix("KV cache: ")?.split_whitespace().next()?.parse().ok()).expect("a KV cache line");
    mb * 1e6
}

/// Every rank's `rank R of N: KV cache B bytes`.
fn kv_bytes_per_rank(stderr: &str) -> Vec<(usize, f64)> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("] rank ")?.1;
            let rank = rest.split_whitespace().next()?.parse().ok()?;
            let bytes = rest.split_once("KV cache ")?.1.split_whitespace().next()?.parse().ok()?;
            Some((rank, bytes))
        })
        .collect()
}

#[test]
fn two_ranks_give_the_single_process_tokens_with_half_the_cache_each() {
    let model = test_support::assets::qwen2();
    for kv in ["fp16", "8,4"] {
        let (alone, err, ok) = generate(None, &model, kv);
        assert!(ok, "--kv {kv} alone failed: {err}");
        let (group, err, ok) = generate(Some(2), &model, kv);
        assert!(ok, "--kv {kv} over two ranks failed: {err}");
        assert!(text(&alone).trim().len() > 8, "--kv {kv}: too little text to compare: {alone}");
        assert_eq!(text(&group), text(&alone), "--kv {kv}: two ranks generated other text");
        let total = kv_bytes_alone(&alone);
        let mut ranks = kv_bytes_per_rank(&err);
        ranks.sort_by_key(|r| r.0);
        assert_eq!(ranks.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1], "--kv {kv}: one KV line per rank: {err}");
        for (rank, bytes) in ranks {
            // The single process prints MB with three decimals: 500 bytes of rounding.
            assert!((bytes - total / 2.0).abs() <= 500.0, "--kv {kv}: rank {rank} holds {bytes} bytes, single process {total}");
        }
    }
}

#[test]
fn uneven_kv_heads_are_refused_with_the_numbers() {
    let (_, err, ok) = generate(Some(2), &test_support::assets::default_model(), "8,4");
    assert!(!ok, "the default model (3 KV heads) ran over 2 ranks");
    assert!(err.contains("divisible by 2; this model has 3"), "{err}");
}
