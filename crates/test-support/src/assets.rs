//! Real assets for tests. Each is looked up in the cache (`$KVSPLIT_CACHE`, default
//! `~/.cache/kvsplit-mlx`) and, when missing, fetched once by the script that setup uses for it,
//! so `cargo test --workspace` needs no fetch step run by hand. When a script cannot provide the
//! asset, the test process stops with one line that names the script to run; no test panics
//! over a missing file.
//!
//! The scripts are found through this crate's manifest directory: this crate only serves tests,
//! which always run inside the source tree.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Tests in one binary run on several threads; one fetch at a time, and a second asker finds
/// the file the first one fetched.
static FETCH: Mutex<()> = Mutex::new(());

pub fn cache_dir() -> PathBuf {
    match std::env::var_os("KVSPLIT_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kvsplit-mlx"),
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Ends the test process with one line. A panic would print per test, with a location that
/// says nothing about the fix.
fn stop(msg: String) -> ! {
    eprintln!("test asset unavailable: {msg}");
    std::process::exit(2)
}

/// `path`, after `script` (relative to the repository root) has run if `path` was missing.
fn ensure(path: PathBuf, script: &str, what: &str) -> PathBuf {
    if path.exists() {
        return path;
    }
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if path.exists() {
        return path;
    }
    eprintln!("[test-support] {what} is not in the cache; running {script}");
    match Command::new("bash").arg(repo_root().join(script)).status() {
        Ok(s) if s.success() && path.exists() => path,
        Ok(s) if s.success() => stop(format!("{script} ran but {} is still missing; {what} needs it", path.display())),
        Ok(s) => stop(format!("{script} failed ({s}) while fetching {what}; run {script} to see why")),
        Err(e) => stop(format!("cannot run {script} ({e}); run it by hand to fetch {what}")),
    }
}

/// The default model, SmolLM2-135M-Instruct Q4_1 (scripts/setup.sh).
pub fn default_model() -> PathBuf {
    ensure(cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"), "scripts/setup.sh", "the default model")
}

/// Gemma-3-270M Q4_K_M (scripts/fetch-models.sh).
pub fn gemma3() -> PathBuf {
    ensure(cache_dir().join("models/gemma-3-270m-q4_k_m.gguf"), "scripts/fetch-models.sh", "Gemma-3-270M")
}

/// Qwen2.5-Coder-0.5B-Instruct Q4_K_M (scripts/fetch-models.sh).
pub fn qwen2() -> PathBuf {
    ensure(cache_dir().join("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"), "scripts/fetch-models.sh", "Qwen2.5-Coder-0.5B")
}

/// A model file in the cache by name (one of the above).
pub fn model(file: &str) -> PathBuf {
    match file {
        "SmolLM2-135M-Instruct.Q4_1.gguf" => default_model(),
        "gemma-3-270m-q4_k_m.gguf" => gemma3(),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" => qwen2(),
        other => stop(format!("no fetch script knows the model '{other}'")),
    }
}

/// llama.cpp's vocabulary-only GGUFs with their test vectors (scripts/fetch-test-data.sh).
pub fn llama_vocab_dir() -> PathBuf {
    let dir = cache_dir().join("testdata/llama-vocab");
    ensure(dir.join("ggml-vocab-gpt-2.gguf.inp"), "scripts/fetch-test-data.sh", "llama.cpp's tokenizer test vectors");
    dir
}

/// WikiText-2 raw, test split. Setup copies it into the cache from `../shared/data` beside the
/// clone; `kvsplit-mlx ppl wikitext` fetches it from the hub where that is absent.
pub fn wikitext_test() -> PathBuf {
    ensure(
        cache_dir().join("data/wikitext-2-raw/wiki.test.raw"),
        "scripts/setup.sh",
        "WikiText-2 (setup copies ../shared/data/wikitext-2-raw; or run `kvsplit-mlx ppl wikitext` once with network)",
    )
}

/// The WikiText-2 test text as the engine reads it (CRLF as LF).
pub fn wikitext_text() -> String {
    let p = wikitext_test();
    std::fs::read_to_string(&p).unwrap_or_else(|e| stop(format!("{}: {e}", p.display()))).replace("\r\n", "\n")
}
