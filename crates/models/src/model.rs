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
    use crate::gguf_load::ArchConfig;
    let model: Box<dyn LanguageModel> = match cfg {
        ArchConfig::Llama(cfg) => Box::new(crate::llama::Model::new(cfg, weights, dtype)?),
        ArchConfig::Gemma3(cfg) => Box::new(crate::gemma3::Model::new(cfg, weights, dtype)?),
        ArchConfig::Phi3(cfg) => Box::new(crate::phi3::Model::new(cfg, weights, dtype)?),
    };
    mlx_rs::transforms::eval(model.arrays())?;
    Ok(Loaded { model, tokenizer })
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
    let (cfg, mut weights) = crate::safetensors_load::load_dir(path, dtype)?;
    // Same weight policy as GGUF loading, so both formats run the same arithmetic.
    if crate::weights::dense_weights_preferred() {
        weights.dequantize_all(dtype)?;
    }
    let tokenizer = crate::tokenizer_json::load(path, cfg.eos_token_id.as_ref()).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        reason: format!("tokenizer: {e}"),
    })?;
    let model: Box<dyn LanguageModel> = Box::new(crate::llama::Model::new(cfg, weights, dtype)?);
    mlx_rs::transforms::eval(model.arrays())?;
    Ok(Loaded { model, tokenizer })
}
