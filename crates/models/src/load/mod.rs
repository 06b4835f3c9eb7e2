//! Loading a model by path: a `.gguf` file ([`gguf`]) or an MLX/HF directory
//! ([`safetensors`]). The family registry ([`crate::families`]) turns the config into a model.

pub mod gguf;
pub mod safetensors;

use crate::error::{ModelError, Result};
use crate::families::ArchConfig;
use crate::model::LanguageModel;
use crate::tokenizer::Tokenizer;
use mlx_rs::Dtype;
use std::path::Path;

/// A loaded model with its tokenizer.
pub struct Loaded {
    pub model: Box<dyn LanguageModel>,
    pub tokenizer: Tokenizer,
}

/// Loads a `.gguf` file (weights, config and tokenizer from one file).
pub fn load_gguf(path: &Path, dtype: Dtype) -> Result<Loaded> {
    let (cfg, weights, gguf) = gguf::load_any(path, dtype)?;
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
pub fn read_config(path: &Path) -> Result<ArchConfig> {
    if path.is_dir() {
        let file = path.join(safetensors::CONFIG_FILE);
        let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io { path: file.clone(), source })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config { path: file.clone(), reason: format!("invalid JSON: {e}") })?;
        return ArchConfig::from_json(&v).map_err(|reason| ModelError::Config { path: file, reason });
    }
    ArchConfig::from_gguf(&crate::gguf::GgufFile::open(path)?)
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
    let dir = safetensors::load_dir_as(path, Some(dtype))?;
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
