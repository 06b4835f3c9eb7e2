//! Generation: chunked prefill through the split cache, then pipelined decode (the next step
//! is queued with `async_eval` before the host reads the current token).

use crate::error::{ModelError, Result};
use crate::model::LanguageModel;
use crate::sample::{Sampler, SamplerSettings};
use mlx_kv::{CacheBytes, CacheOptions, KvCache, KvSpec, LayerOverrides};
use mlx_rs::transforms::{async_eval, eval};
use mlx_rs::Array;
use std::time::{Duration, Instant};

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

    /// Closed-form bytes one token costs across all layers (K and V, scales and biases).
    pub fn bytes_per_token(&self, model: &dyn LanguageModel) -> f64 {
        let n = model.n_layers();
        let float_bytes = if model.dtype() == mlx_rs::Dtype::Float32 { 4 } else { 2 };
        (0..n)
            .map(|i| {
                let (k, v) = self.layers.apply(&self.spec, i, n).bytes_per_token_per_head(model.head_dim(), float_bytes);
                (k + v) * model.n_kv_heads() as f64
            })
            .sum()
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub prefill_step: usize,
    pub sampler: SamplerSettings,
    pub cache: CacheSettings,
    pub eos: Vec<u32>,
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

fn eval_caches(caches: &[KvCache], extra: &Array) -> Result<()> {
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

/// Runs generation; `on_token` gets each token and returns false to stop.
pub fn generate(model: &dyn LanguageModel, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32) -> bool) -> Result<GenerationStats> {
    check_context(model, &opts.cache, prompt.len() + opts.max_tokens)?;
    let mut caches = opts.cache.build(model, opts.prefill_step)?;
    let mut sampler = Sampler::new(opts.sampler.clone())?;
    mlx_rs::memory::reset_peak_memory()?;
    let mut history: Vec<u32> = prompt.to_vec();
    let start = Instant::now();
    let logits = prefill(model, &mut caches, prompt, opts.prefill_step)?;
    let mut y = sampler.sample(&logits, &history)?;
    eval([&y])?;
    let prompt_time = start.elapsed();
    // The penalty needs the token just produced, so it cannot run one step ahead.
    let pipelined = opts.sampler.repetition_penalty == 1.0;
    let decode_start = Instant::now();
    let mut produced = 0usize;
    let mut last_time = decode_start;
    while produced < opts.max_tokens {
        let step = |y: &Array, caches: &mut [KvCache], sampler: &mut Sampler, history: &[u32]| -> Result<Array> {
            let logits = model.forward(&y.reshape(&[1, 1])?.as_dtype(mlx_rs::Dtype::Int32)?, caches, true)?;
            let v = logits.shape()[2];
            sampler.sample(&logits.reshape(&[1, v])?, history)
        };
        let more = produced + 1 < opts.max_tokens;
        let next = if more && pipelined {
            let n = step(&y, &mut caches, &mut sampler, &history)?;
            async_eval([&n])?;
            Some(n)
        } else {
            None
        };
        let tok: u32 = y.item_cast::<u32>();
        produced += 1;
        last_time = Instant::now();
        history.push(tok);
        if opts.eos.contains(&tok) || !on_token(tok) || !more {
            // A step already handed to `async_eval` must finish before its arrays are dropped:
            // leaving it running made the process hang at exit after an early stop (EOS).
            if let Some(n) = &next {
                eval([n])?;
            }
            break;
        }
        y = match next {
            Some(n) => n,
            None => step(&y, &mut caches, &mut sampler, &history)?,
        };
    }
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        prompt_time,
        generation_tokens: produced,
        generation_time: last_time - decode_start,
        peak_memory: mlx_rs::memory::peak_memory()?,
        kv_bytes: caches.iter().map(|c| c.bytes()).fold(CacheBytes::default(), |a, b| a + b),
    })
}
