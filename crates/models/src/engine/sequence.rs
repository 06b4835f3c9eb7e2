//! One conversation: its caches (one per layer, each with the sequence's own `KvSpec`), its
//! sampler and its token history, kept between calls; cutting back, copying a prefix, saving.

use crate::error::{ModelError, Result};
use crate::generate::CacheSettings;
use crate::load::ModelId;
use crate::model::LanguageModel;
use crate::sample::{Sampler, SamplerSettings};
use mlx_kv::attention::Choice;
use mlx_kv::cache_file::{self, CacheMeta};
use mlx_kv::{CacheBytes, KvCache};
use std::path::Path;

/// One sequence: its caches (one per layer), sampler and token history.
pub struct Sequence<'e> {
    pub(super) model: &'e dyn LanguageModel,
    pub(super) identity: Option<&'e ModelId>,
    pub(super) caches: Vec<KvCache>,
    pub(super) settings: CacheSettings,
    pub(super) sampler: Sampler,
    /// The repetition penalty needs the token just produced, so it cannot run one step ahead.
    pub(super) pipelined: bool,
    pub(super) prefill_step: usize,
    /// The conversation's tokens: those in the cache, then any produced but not yet fed.
    pub(super) history: Vec<u32>,
}

impl<'e> Sequence<'e> {
    /// Tokens the cache has seen (its RoPE position).
    pub fn cached_tokens(&self) -> usize {
        self.caches.first().map_or(0, |c| c.offset())
    }

    pub fn model(&self) -> &'e dyn LanguageModel {
        self.model
    }

    pub fn caches(&self) -> &[KvCache] {
        &self.caches
    }

    pub fn caches_mut(&mut self) -> &mut [KvCache] {
        &mut self.caches
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// The conversation's tokens: those in the cache, then any produced but not yet fed.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Replaces the sampler (a kept conversation's next request brings its own settings).
    pub fn set_sampler(&mut self, sampler: SamplerSettings) -> Result<()> {
        self.pipelined = sampler.repetition_penalty == 1.0;
        self.sampler = Sampler::new(sampler)?;
        Ok(())
    }

    /// Cuts the cache and history back to their first `n` tokens, for reusing a kept
    /// conversation from a common prefix. False (and nothing changed) where a cache cannot drop
    /// tokens: a rotating window that has wrapped, or per-channel key groups.
    /// The most of the first `n` cached tokens every cache can be cut back to ([`Self::trim_to`],
    /// [`Self::fork`]): `n`, or less where per-channel key groups (or a wrapped window) allow
    /// only coarser cuts.
    pub fn reusable(&self, n: usize) -> usize {
        let mut m = n.min(self.cached_tokens()).min(self.history.len());
        // Each cache may cut coarser than the last; repeat until every one can cut there.
        loop {
            let next = self.caches.iter().map(|c| c.reusable(m)).min().unwrap_or(m);
            if next == m {
                return m;
            }
            m = next;
        }
    }

    pub fn trim_to(&mut self, n: usize) -> bool {
        let fed = self.cached_tokens();
        if n > fed {
            return false;
        }
        let drop = fed - n;
        if drop > 0 {
            let trimmable = self.caches.iter().all(|c| c.can_trim(drop));
            if !trimmable {
                return false;
            }
            for c in &mut self.caches {
                let done = c.trim(drop);
                debug_assert_eq!(done, drop, "can_trim promised {drop} tokens");
            }
        }
        self.history.truncate(n);
        true
    }

    /// A new sequence holding a copy of this one's first `n` cached tokens, quantized as stored,
    /// with its own sampler; this one is unchanged. For a conversation that shares only a prefix
    /// (a system prompt, a document) with a kept one. `None` where a cache cannot be cut there
    /// (a rotating window, per-channel key groups inside a block).
    pub fn fork(&self, n: usize, sampler: SamplerSettings) -> Result<Option<Sequence<'e>>> {
        if n > self.cached_tokens() || n > self.history.len() {
            return Ok(None);
        }
        let mut caches = Vec::with_capacity(self.caches.len());
        for c in &self.caches {
            match c.fork(n)? {
                Some(c) => caches.push(c),
                None => return Ok(None),
            }
        }
        Ok(Some(Sequence {
            model: self.model,
            identity: self.identity,
            caches,
            settings: self.settings.clone(),
            pipelined: sampler.repetition_penalty == 1.0,
            sampler: Sampler::new(sampler)?,
            prefill_step: self.prefill_step,
            history: self.history[..n].to_vec(),
        }))
    }

    /// For a sequence in the engine's pool: gives back the room promised and not used (a
    /// finished request kept for its next turn), or promises room for `tokens` tokens in all
    /// (`Some`; false when the pool cannot). Sequences of their own buffers: always true.
    pub fn pool_room(&mut self, tokens: Option<usize>) -> bool {
        let Some(table) = self.caches.first().and_then(|c| c.paged_table()) else { return true };
        let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
        match tokens {
            None => {
                t.release_promise();
                true
            }
            Some(n) => t.promise(n),
        }
    }

    /// Resident bytes of every layer's cache.
    pub fn kv_bytes(&self) -> CacheBytes {
        self.caches.iter().map(|c| c.bytes()).fold(CacheBytes::default(), |a, b| a + b)
    }

    /// The attention path of the first layer's last step, and why.
    pub fn attention_path(&self) -> Option<Choice> {
        self.caches.first().and_then(|c| c.last_path())
    }

    /// The tokens the cache holds, in order.
    pub fn cached_history(&self) -> &[u32] {
        &self.history[..self.cached_tokens().min(self.history.len())]
    }

    /// Saves the cache, quantized as stored, with the tokens it holds, to a safetensors file
    /// that [`Engine::sequence_from_file`] continues from. A token produced but not yet fed is
    /// not part of the cache and is not saved.
    pub fn save(&self, path: &Path) -> Result<()> {
        let id = self.identity.ok_or_else(|| ModelError::Invalid { flag: "--model", message: "random weights have no identity, so their caches cannot be saved".into() })?;
        let cached = self.cached_tokens();
        if cached > self.history.len() {
            // `step` feeds tokens without recording them; the file must name every token.
            return Err(ModelError::Invalid { flag: "--prompt-cache-file", message: format!("the cache holds {cached} tokens but only {} are known", self.history.len()) });
        }
        let meta = CacheMeta {
            model_id: id.hash.clone(),
            model_name: id.name.clone(),
            spec: self.settings.spec.clone(),
            layers: self.settings.layers.clone(),
            head_dim: self.model.head_dim(),
            n_layers: self.model.n_layers(),
            float_dtype: self.model.dtype(),
            tokens: self.history[..cached].to_vec(),
        };
        Ok(cache_file::save(path, &self.caches, &meta)?)
    }
}
