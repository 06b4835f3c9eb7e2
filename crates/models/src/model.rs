//! What every model family offers: to the engine, a [`LanguageModel`]; to the registry
//! ([`crate::families`]) and the loaders, a config implementing [`Family`].

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::shard::Shard;
use crate::weights::{Weight, WeightMap};
use mlx_kv::KvCache;
use mlx_rs::ops::concatenate;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Dtype};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A causal language model whose KV cache is passed in.
pub trait LanguageModel {
    /// Logits `[B, L, V]` for `ids` (`[B, L]` int32), or `[B, 1, V]` with `last_only`.
    fn forward(&self, ids: &Array, caches: &mut [KvCache], last_only: bool) -> Result<Array>;
    /// One decode step of `B` sequences: `ids` `[B, 1]` (int32), row `b` continuing the
    /// sequence whose layer caches are `caches[b]`. Logits `[B, 1, V]`. A family that batches
    /// runs every linear layer over the `B` rows at once, so each weight is read once per step,
    /// and attention per sequence over its own cache (own length, own `KvSpec`). This default
    /// runs the sequences one after another.
    fn forward_batch(&self, ids: &Array, caches: &mut [&mut [KvCache]]) -> Result<Array> {
        let mut rows = Vec::with_capacity(caches.len());
        for (b, c) in caches.iter_mut().enumerate() {
            let b = b as i32;
            rows.push(self.forward(&ids.index((b..b + 1, ..)), c, true)?);
        }
        Ok(concatenate(&rows, 0)?)
    }
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

/// A family, as its `config.json` struct: the names it answers to, how llama.cpp's GGUF
/// files store it, and how it builds its model. Checkpoint names are Hugging Face's; a family
/// maps GGUF onto them here, so its model never sees GGUF conventions.
pub trait Family: Sized + Serialize + DeserializeOwned {
    /// `config.json` `model_type` values this family runs.
    const MODEL_TYPES: &'static [&'static str];
    /// `model_type` values this family recognises but refuses, with the whole message.
    const REFUSED_MODEL_TYPES: &'static [(&'static str, &'static str)] = &[];
    /// GGUF `general.architecture` values this family runs.
    const GGUF_ARCHITECTURES: &'static [&'static str];

    /// The config from GGUF metadata (no tensor data is read).
    fn from_gguf(g: &GgufFile) -> Result<Self>;
    /// The `model_type` that `config.json` gets.
    fn model_type(&self) -> &str;
    /// The `architectures` entry that `config.json` gets.
    fn architecture(&self) -> &'static str;
    /// Family fields of the written `config.json` that its struct alone does not get right.
    fn finish_json(&self, _obj: &mut serde_json::Map<String, serde_json::Value>) {}
    fn num_hidden_layers(&self) -> usize;
    /// Width of one attention head: what each layer's KV cache stores per head and token.
    fn head_dim(&self) -> usize;
    /// Whether a stored `lm_head` is dropped at load, the head then being the embedding (a tied
    /// config, as mlx-lm's `sanitize` does for most families).
    fn drops_stored_head(&self) -> bool;
    /// The HF name of GGUF tensor `gguf`; `None` for names the family does not know.
    fn gguf_tensor_name(gguf: &str) -> Option<String>;
    /// Undoes what llama.cpp's converter did to tensor `hf` (already renamed).
    fn undo_gguf_tensor(&self, _hf: &str, w: Weight, _dtype: Dtype) -> Result<Weight> {
        Ok(w)
    }
    /// Builds the model from `weights` (strictly: every key used, none missing).
    fn build(self, weights: WeightMap, dtype: Dtype) -> Result<Box<dyn LanguageModel>>;
    /// This rank's config and weights in tensor-parallel group `shard` ([`crate::shard`]): its
    /// heads and MLP units, sliced from the whole checkpoint. Families that have not
    /// implemented the split refuse by name.
    fn shard(self, _weights: WeightMap, shard: &Shard) -> Result<(Self, WeightMap)> {
        Err(ModelError::Invalid {
            flag: "--distributed",
            message: format!("tensor parallelism over {} processes is not implemented for model_type '{}'", shard.size(), self.model_type()),
        })
    }
}
