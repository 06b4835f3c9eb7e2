//! What generation needs besides the loop ([`crate::engine::Sequence::generate`]): the KV
//! settings of a run, the context check made before any work, chunked prefill, and the stats.

use crate::error::{ModelError, Result};
use crate::model::LanguageModel;
use mlx_kv::{CacheBytes, CacheOptions, KvCache, KvSpec, LayerOverrides};
use mlx_rs::transforms::eval;
use mlx_rs::Array;
use std::time::Duration;

/// The KV side of a run: the spec, per-layer overrides and the window.
#[derive(Debug, Clone, Default)]
pub struct CacheSettings {
    pub spec: KvSpec,
    pub layers: LayerOverrides,
    pub max_kv_size: Option<usize>,
}

impl CacheSettings {
    /// Checks the settings against a model's shape: per-layer overrides inside its layers, and
    /// every layer's spec against its head width (group sizes, residual blocks, rotation).
    pub fn check(&self, n_layers: usize, head_dim: usize) -> Result<()> {
        self.layers.validate(n_layers)?;
        for i in 0..n_layers {
            self.layers.apply(&self.spec, i, n_layers).validate(head_dim)?;
        }
        Ok(())
    }

    /// One cache per layer, each with its own (possibly overridden) spec.
    pub fn build(&self, model: &dyn LanguageModel, max_chunk: usize) -> Result<Vec<KvCache>> {
        let n = model.n_layers();
        self.layers.validate(n)?;
        (0..n)
            .map(|i| {
                // A sliding-window layer never needs more than its window, whatever the user asked.
                let max_size = match (self.max_kv_size, model.layer_window(i)) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let opts = CacheOptions { max_size, max_chunk };
                Ok(KvCache::new(self.layers.apply(&self.spec, i, n), model.head_dim(), opts)?)
            })
            .collect()
    }

    /// The most tokens any layer needs to take all its code paths once
    /// ([`mlx_kv::KvSpec::first_use_tokens`]).
    pub fn first_use_tokens(&self, n_layers: usize) -> usize {
        (0..n_layers).map(|i| self.layers.apply(&self.spec, i, n_layers).first_use_tokens()).max().unwrap_or(2)
    }

    /// Closed-form bytes one token costs across all layers (K and V, scales and biases).
    pub fn bytes_per_token(&self, model: &dyn LanguageModel) -> f64 {
        let n = model.n_layers();
        let float_bytes = mlx_kv::KvSpec::dense_element_bytes(model.dtype());
        (0..n)
            .map(|i| {
                let (k, v) = self.layers.apply(&self.spec, i, n).bytes_per_token_per_head(model.head_dim(), float_bytes);
                (k + v) * model.n_kv_heads() as f64
            })
            .sum()
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generation_tokens: usize,
    /// From the first generated token to the last: decode steps only.
    pub generation_time: Duration,
    pub peak_memory: usize,
    pub kv_bytes: CacheBytes,
}

impl GenerationStats {
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }
    pub fn generation_tps(&self) -> f64 {
        self.generation_tokens.saturating_sub(1) as f64 / self.generation_time.as_secs_f64().max(1e-9)
    }
}

/// Memory the OS says is available, from /proc/meminfo (None where unknown).
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Fails before any work when `tokens` cannot fit: the model's trained context (unless a window
/// bounds the cache) or the memory the cache would need. The message says what would fit.
pub fn check_context(model: &dyn LanguageModel, cache: &CacheSettings, tokens: usize) -> Result<()> {
    let per_token = cache.bytes_per_token(model);
    let held = cache.max_kv_size.map_or(tokens, |w| w.min(tokens));
    if let Some(avail) = available_memory() {
        let fits = (avail as f64 / per_token) as usize;
        if held > fits {
            return Err(ModelError::Context {
                requested: tokens,
                limit: format!(
                    "available memory: {:.1} GiB holds about {fits} tokens of {} KV cache ({per_token:.0} bytes/token)",
                    avail as f64 / (1u64 << 30) as f64,
                    cache.spec
                ),
            });
        }
    }
    let max = model.max_context();
    if tokens > max {
        let fits = available_memory().map_or(String::new(), |a| format!("; memory would hold about {} tokens with {}", (a as f64 / per_token) as usize, cache.spec));
        return Err(ModelError::Context {
            requested: tokens,
            limit: format!("the model's maximum context of {max} tokens{fits}"),
        });
    }
    Ok(())
}

pub(crate) fn eval_caches(caches: &[KvCache], extra: &Array) -> Result<()> {
    let mut arrays: Vec<&Array> = caches.iter().flat_map(|c| c.arrays()).collect();
    arrays.push(extra);
    Ok(eval(arrays)?)
}

/// Prefills `prompt` in chunks of `step`; returns the logits of the last position.
pub fn prefill(model: &dyn LanguageModel, caches: &mut [KvCache], prompt: &[u32], step: usize) -> Result<Array> {
    let step = step.max(1);
    let mut logits = None;
    for (i, chunk) in prompt.chunks(step).enumerate() {
        let ids = Array::from_slice(chunk, &[1, chunk.len() as i32]).as_dtype(mlx_rs::Dtype::Int32)?;
        let last = (i + 1) * step >= prompt.len();
        let out = model.forward(&ids, caches, true)?;
        // Evaluating per chunk keeps the graph (and its temporaries) one chunk deep.
        eval_caches(caches, &out)?;
        if last {
            logits = Some(out);
        }
    }
    let logits = logits.ok_or_else(|| ModelError::Invalid { flag: "--prompt", message: "the prompt is empty".into() })?;
    let v = logits.shape()[2];
    Ok(logits.reshape(&[1, v])?)
}
