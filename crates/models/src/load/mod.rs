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
    /// Which weights these are, for saved caches ([`model_id`]).
    pub id: ModelId,
}

/// The identity of a model's files: a saved KV cache is only valid with the weights that
/// computed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelId {
    /// SHA-256 (its first 16 bytes, in hex) over each file's name, size, first and last MiB.
    pub hash: String,
    /// The file or directory name, for messages.
    pub name: String,
}

/// Bytes hashed at each end of a weight file. The start holds the header (GGUF metadata and
/// tokenizer, the safetensors index of names and shapes), the end holds tensor data, so two
/// fine-tunes of one architecture differ there even when their headers match. Reading a few MiB
/// keeps this cheap beside a load that reads the whole file.
const ID_SPAN: u64 = 1 << 20;

/// [`ModelId`] of a `.gguf` file or a model directory (its config.json and safetensors files).
pub fn model_id(path: &Path) -> Result<ModelId> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ModelError::Io { path: p, source }
    };
    let mut files = vec![path.to_path_buf()];
    if path.is_dir() {
        files = std::fs::read_dir(path)
            .map_err(io(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") || p.file_name().is_some_and(|n| n == safetensors::CONFIG_FILE))
            .collect();
        files.sort();
    }
    let mut h = Sha256::new();
    for f in &files {
        let mut file = std::fs::File::open(f).map_err(io(f))?;
        let size = file.metadata().map_err(io(f))?.len();
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update(size.to_le_bytes());
        let mut buf = Vec::new();
        (&mut file).take(ID_SPAN).read_to_end(&mut buf).map_err(io(f))?;
        if size > ID_SPAN {
            file.seek(SeekFrom::Start(size.saturating_sub(ID_SPAN).max(ID_SPAN))).map_err(io(f))?;
            file.read_to_end(&mut buf).map_err(io(f))?;
        }
        h.update(&buf);
    }
    let hash: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    Ok(ModelId { hash, name })
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
    Ok(Loaded { model, tokenizer, id: model_id(path)? })
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
    Ok(Loaded { model, tokenizer, id: model_id(path)? })
}
