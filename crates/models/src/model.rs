//! What every model family offers the engine, and loading a model by path.

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use mlx_kv::KvCache;
use mlx_rs::{Array, Dtype};
use std::path::Path;

/// A causal language model whose KV cache is passed in.
pub trait LanguageModel {
    /// Logits `[B, L, V]` for `ids` (`[B, L]` int32), or `[B, 1, V]` with `last_only`.
    fn forward(&self, ids: &Array, caches: &mut [KvCache], last_only: bool) -> Result<Array>;
    fn n_layers(&self) -> usize;
    fn head_dim(&self) -> usize;
    fn n_kv_heads(&self) -> usize;
    /// The trained context length.
    fn max_context(&self) -> usize;
    fn dtype(&self) -> Dtype;
    /// Sliding-window layers return their window; they get a rotating cache of that size.
    fn layer_window(&self, _layer: usize) -> Option<usize> {
        None
    }
    /// Every weight array, to evaluate after loading.
    fn arrays(&self) -> Vec<&Array>;
    /// A short family name for reports (`llama`, `qwen2`, ...).
    fn family(&self) -> &str;
}

/// A loaded model with its tokenizer.
pub struct Loaded {
    pub model: Box<dyn LanguageModel>,
    pub tokenizer: Tokenizer,
}

/// Loads a `.gguf` file (weights, config and tokenizer from one file).
pub fn load_gguf(path: &Path, dtype: Dtype) -> Result<Loaded> {
    let (cfg, weights, gguf) = crate::gguf_load::load_any(path, dtype)?;
    let tokenizer = Tokenizer::from_gguf(&gguf).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        reason: format!("tokenizer: {e}"),
    })?;
    let model = cfg.build(weights, dtype)?;
    mlx_rs::transforms::eval(model.arrays())?;
    Ok(Loaded { model, tokenizer })
}

/// A model's config from a `.gguf` file's metadata or a directory's `config.json`, without
/// reading any weight: enough to check settings against the model before a slow load.
pub fn read_config(path: &Path) -> Result<crate::config::ArchConfig> {
    if path.is_dir() {
        let file = path.join(crate::safetensors_load::CONFIG_FILE);
        let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io { path: file.clone(), source })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config { path: file.clone(), reason: format!("invalid JSON: {e}") })?;
        return crate::config::ArchConfig::from_json(&v).map_err(|reason| ModelError::Config { path: file, reason });
    }
    crate::gguf_load::arch_config(&crate::gguf::GgufFile::open(path)?)
}

/// Loads a model from a `.gguf` file or a local model directory.
pub fn load(path: &Path, dtype: Dtype) -> Result<Loaded> {
    if path.is_dir() {
        return load_dir(path, dtype);
    }
    load_gguf(path, dtype)
}

/// Loads an MLX/HF model directory (config.json, safetensors, tokenizer.json).
pub fn load_dir(path: &Path, dtype: Dtype) -> Result<Loaded> {
    let dir = crate::safetensors_load::load_dir_as(path, Some(dtype))?;
    let mut weights = dir.weights;
    // Same weight policy as GGUF loading, so both formats run the same arithmetic.
    if crate::weights::dense_weights_preferred() {
        weights.dequantize_all(dtype)?;
    }
    let tokenizer = crate::tokenizer_json::load(path, dir.raw.get("eos_token_id")).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        reason: format!("tokenizer: {e}"),
    })?;
    let model = dir.config.build(weights, dtype)?;
    mlx_rs::transforms::eval(model.arrays())?;
    Ok(Loaded { model, tokenizer })
}
