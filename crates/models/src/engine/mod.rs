//! The engine as a library: a model loaded once, and any number of independent sequences over
//! it, each with its own KV cache settings ([`CacheSettings`], so its own `KvSpec`) and sampler.
//! A sequence keeps its cache between calls, so a conversation's next turn feeds only the new
//! tokens. `generate`, `ppl`, `bench`, `compare` and the server all run through it.
//!
//! ```no_run
//! use models::engine::Engine;
//! use models::generate::CacheSettings;
//! use models::sample::SamplerSettings;
//! use mlx_kv::KvSpec;
//!
//! # fn main() -> models::error::Result<()> {
//! let engine = Engine::load(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"), mlx_ext::EngineOptions::default())?;
//! let tok = engine.tokenizer()?;
//! // Two conversations at once, at different precisions.
//! let k8v4 = CacheSettings { spec: KvSpec::bits(8, 4), ..Default::default() };
//! let mut a = engine.sequence(&k8v4, SamplerSettings::default(), 512)?;
//! let mut b = engine.sequence(&CacheSettings::default(), SamplerSettings { temp: 0.7, seed: 1, ..Default::default() }, 512)?;
//! let mut text = String::new();
//! let mut stream = tok.stream_decoder();
//! a.generate(&tok.encode("The capital of France is", true), 20, tok.eos_ids(), |id| {
//!     text.push_str(&stream.push(id));
//!     true // false stops
//! })?;
//! b.generate(&tok.encode("Once upon a time", true), 20, tok.eos_ids(), |_| true)?;
//! // The next turn of `a` feeds only its new tokens; the cache holds the rest.
//! a.generate(&tok.encode(" Its river is", false), 10, tok.eos_ids(), |_| true)?;
//! println!("{text} / {} tokens cached, {} bytes", a.cached_tokens(), a.kv_bytes().total());
//! # Ok(())
//! # }
//! ```

use crate::error::{ModelError, Result};
use crate::generate::CacheSettings;
use crate::load::{Loaded, ModelId};
use crate::model::LanguageModel;
use crate::sample::{Sampler, SamplerSettings};
use crate::tokenizer::Tokenizer;
use mlx_ext::EngineOptions;
use mlx_kv::cache_file::{self, Expected};
use mlx_kv::{BlockFormat, Geometry, KvCache, KvPool};
use std::path::Path;

mod batch;
mod decode;
mod scores;
mod sequence;

pub use batch::{decode_batch, decode_steps, queue_step, read_step, QueuedStep};
pub use scores::TokenLogprobs;
pub use sequence::Sequence;

/// A loaded model, its tokenizer, and the engine options it runs with.
pub struct Engine {
    model: Box<dyn LanguageModel>,
    tokenizer: Option<Tokenizer>,
    options: EngineOptions,
    /// `None` for random weights, whose caches cannot be saved.
    identity: Option<ModelId>,
    /// The block pool sequences made by [`Self::pooled_sequence`] share ([`Self::use_pool`]).
    pool: Option<KvPool>,
}

impl Engine {
    /// Installs `options` (they are per process: see [`mlx_ext::options`]) and loads the model at
    /// `path` (a `.gguf` file or an MLX/HF directory) in the backend's compute dtype.
    pub fn load(path: &Path, options: EngineOptions) -> Result<Engine> {
        mlx_ext::options::install(options)?;
        let loaded = crate::load::load(path, mlx_kv::Backend::current().compute_dtype())?;
        Ok(Engine::from_loaded(loaded))
    }

    /// An engine over an already loaded model, with the options in force.
    pub fn from_loaded(loaded: Loaded) -> Engine {
        Engine { model: loaded.model, tokenizer: Some(loaded.tokenizer), options: mlx_ext::options::current(), identity: Some(loaded.id), pool: None }
    }

    /// An engine over a model without a tokenizer (random weights, for speed measurements).
    pub fn from_model(model: Box<dyn LanguageModel>) -> Engine {
        Engine { model, tokenizer: None, options: mlx_ext::options::current(), identity: None, pool: None }
    }

    pub fn model(&self) -> &dyn LanguageModel {
        self.model.as_ref()
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| ModelError::Invalid { flag: "--model", message: "this model has no tokenizer (random weights)".into() })
    }

    pub fn options(&self) -> EngineOptions {
        self.options
    }

    /// Gives this engine one KV block pool of at most `budget` bytes (`None`: no limit but
    /// memory), which [`Self::pooled_sequence`] draws on ([`mlx_kv::pool`]).
    pub fn use_pool(&mut self, budget: Option<usize>) {
        let m = self.model.as_ref();
        self.pool = Some(KvPool::new(Geometry { layers: m.n_layers(), kv_heads: m.n_kv_heads(), head_dim: m.head_dim() }, budget));
    }

    pub fn pool(&self) -> Option<&KvPool> {
        self.pool.as_ref()
    }

    /// The block format sequences of `cache` take in the pool, or `None` when they keep their
    /// own buffers (no pool, a dense or otherwise unpooled spec on any layer, or a window on any
    /// layer). Per-layer settings (a recipe) pool with one format per layer.
    pub fn pool_format(&self, cache: &CacheSettings) -> Option<BlockFormat> {
        self.pool.as_ref()?;
        let m = self.model.as_ref();
        let n = m.n_layers();
        let windowed = cache.max_kv_size.is_some() || (0..n).any(|i| m.layer_window(i).is_some());
        if windowed {
            return None;
        }
        BlockFormat::of_layers(&(0..n).map(|i| cache.layers.apply(&cache.spec, i, n)).collect::<Vec<_>>())
    }

    /// A new sequence whose caches live in the pool when [`Self::pool_format`] says so, with
    /// room for `tokens` tokens promised up front; `Ok(None)` when the pool cannot promise
    /// them now. Otherwise a sequence of its own buffers, as [`Self::sequence`].
    pub fn pooled_sequence(&self, cache: &CacheSettings, sampler: SamplerSettings, prefill_step: usize, tokens: usize) -> Result<Option<Sequence<'_>>> {
        let mut seq = self.sequence(cache, sampler, prefill_step)?;
        let (Some(pool), Some(fmt)) = (self.pool.as_ref(), self.pool_format(cache)) else { return Ok(Some(seq)) };
        let Some(table) = pool.reserve(&fmt, tokens) else { return Ok(None) };
        let table = std::sync::Arc::new(std::sync::Mutex::new(table));
        let m = self.model.as_ref();
        let n = m.n_layers();
        seq.caches = (0..n).map(|i| KvCache::new_paged(cache.layers.apply(&cache.spec, i, n), m.head_dim(), table.clone(), i)).collect::<std::result::Result<_, _>>()?;
        Ok(Some(seq))
    }

    /// Runs a throwaway sequence of `cache` through every code path it will take: a prompt of
    /// one full `prefill_step` chunk and a short one (MLX picks its quantized-matmul kernels
    /// by row count, and a cold server's first 4K-token request once spent 78 s compiling
    /// them), then decode steps past [`CacheSettings::first_use_tokens`] (so a per-channel
    /// key group completes). On CUDA, MLX compiles each custom-kernel variant with NVRTC the
    /// first time it runs, about 2 s each, and keeps none of ours on disk; a per-channel recipe
    /// uses about ten, so without this the first request (or a timed repeat) stalls for tens
    /// of seconds at its first group boundary. Then one batched decode step of two sequences,
    /// as a server runs concurrent requests (the head and the layers of a batch take their
    /// own variants; our 2-8 row matvec among them). Pooled when the engine has a pool, as
    /// requests are. Returns the steps decoded by the first sequence.
    pub fn warm_up(&self, cache: &CacheSettings, prefill_step: usize) -> Result<usize> {
        let m = self.model.as_ref();
        // Within the model's context (a small checkpoint's 512 tokens were an error here): the
        // decode steps first, then as much of the prompt as fits beside them.
        let room = m.max_context().saturating_sub(2);
        let steps = cache.first_use_tokens(m.n_layers()).min(room.saturating_sub(1));
        let len = (prefill_step.min(2048) + 8).min(room - steps).max(1);
        // Ids every vocabulary has; what they say does not matter, only the shapes they take.
        let prompt: Vec<u32> = (0..len).map(|i| 1 + (i % 64) as u32).collect();
        let throwaway = |tokens: usize| -> Result<Sequence<'_>> {
            match self.pooled_sequence(cache, SamplerSettings::default(), prefill_step, tokens)? {
                Some(seq) => Ok(seq),
                None => self.sequence(cache, SamplerSettings::default(), prefill_step),
            }
        };
        let mut seq = throwaway(prompt.len() + steps + 2)?;
        // The loop requests run: the first token comes from the prefill, then `steps` decode
        // steps, with no stop token.
        seq.generate(&prompt, steps + 1, &[], |_| true)?;
        let mut other = throwaway(prompt.len() + 2)?;
        other.generate(&prompt[..len.min(8)], 1, &[], |_| true)?;
        batch::decode_batch(&mut [&mut seq, &mut other], &[None, None])?;
        Ok(steps)
    }

    /// The hash that saved caches record and check ([`crate::load::model_id`]); `none` for
    /// random weights.
    pub fn model_id(&self) -> String {
        self.identity.as_ref().map_or_else(|| "none".into(), |i| i.hash.clone())
    }

    fn identity(&self) -> Result<&ModelId> {
        self.identity.as_ref().ok_or_else(|| ModelError::Invalid { flag: "--model", message: "random weights have no identity, so their caches cannot be saved or loaded".into() })
    }

    /// A sequence that continues from a cache saved by [`Sequence::save`]: its K/V settings and
    /// history come from the file, which must have been made with this model (same
    /// [`Self::model_id`], layer count and head_dim).
    pub fn sequence_from_file(&self, path: &Path, sampler: SamplerSettings, prefill_step: usize) -> Result<Sequence<'_>> {
        self.sequence_from_file_as(path, None, sampler, prefill_step)
    }

    /// As [`Self::sequence_from_file`], also requiring the file's K/V setting to be `cache`
    /// (for a caller whose user gave K/V flags).
    pub fn sequence_from_file_as(&self, path: &Path, cache: Option<&CacheSettings>, sampler: SamplerSettings, prefill_step: usize) -> Result<Sequence<'_>> {
        if let Some(w) = cache.and_then(|c| c.max_kv_size) {
            return Err(ModelError::Invalid { flag: "--max-kv-size", message: format!("a window ({w}) cannot be combined with a saved cache ({})", path.display()) });
        }
        let id = self.identity()?;
        let model = self.model.as_ref();
        let want = Expected {
            model_id: &id.hash,
            model_name: &id.name,
            setting: cache.map(|c| (&c.spec, &c.layers)),
            head_dim: model.head_dim(),
            n_layers: model.n_layers(),
            float_dtype: model.dtype(),
        };
        let (meta, caches) = cache_file::load(path, &want)?;
        let settings = CacheSettings { spec: meta.spec, layers: meta.layers, max_kv_size: None };
        let mut seq = self.sequence(&settings, sampler, prefill_step)?;
        seq.caches = caches;
        seq.history = meta.tokens;
        Ok(seq)
    }

    /// A new, empty sequence. `prefill_step` is the largest chunk a prompt is fed in (and the
    /// slack a rotating cache keeps). The settings are checked against the model here.
    pub fn sequence(&self, cache: &CacheSettings, sampler: SamplerSettings, prefill_step: usize) -> Result<Sequence<'_>> {
        if prefill_step == 0 {
            return Err(ModelError::Invalid { flag: "--prefill-step", message: "must be at least 1".into() });
        }
        sampler.validate()?;
        Ok(Sequence {
            model: self.model.as_ref(),
            identity: self.identity.as_ref(),
            caches: cache.build(self.model.as_ref(), prefill_step)?,
            settings: cache.clone(),
            pipelined: sampler.repetition_penalty == 1.0,
            sampler: Sampler::new(sampler)?,
            prefill_step,
            history: Vec::new(),
        })
    }
}
