//! Kept conversations: finished sequences, their caches quantized as stored, keyed by their
//! tokens and K/V setting, under a budget of resident bytes with LRU eviction.
//!
//! A request takes the entry with the longest common token prefix under its own setting (never
//! another setting's), trims it to that prefix and prefills only the rest, so a turn whose
//! history ends inside a kept conversation (a regenerated answer) is served too. When the
//! request reuses less than half of the entry (a new conversation that shares only the system
//! prompt or a document with a long kept one), the shared prefix is copied out instead, quantized
//! as stored, and the entry stays kept whole: cutting it down would lose the longer conversation
//! for a small gain.

use models::engine::Sequence;
use models::sample::SamplerSettings;

pub struct Entry<'e> {
    /// `CacheSettings` in a canonical form: entries only serve requests with the same setting.
    pub setting: String,
    pub seq: Sequence<'e>,
    pub bytes: u64,
    last_used: u64,
}

/// What a lookup found.
pub struct Hit<'e> {
    pub seq: Sequence<'e>,
    /// Tokens of the request already in `seq`'s cache.
    pub reused: usize,
    /// Whether `seq` is a copy of a kept entry's prefix (the entry stays kept).
    pub copied: bool,
}

pub struct PromptCache<'e> {
    entries: Vec<Entry<'e>>,
    budget: u64,
    clock: u64,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<'e> PromptCache<'e> {
    pub fn new(budget: u64) -> Self {
        PromptCache { entries: Vec::new(), budget, clock: 0 }
    }

    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The best entry for `tokens` under `setting`, trimmed so that at least one token of
    /// `tokens` is left to feed (the first step needs logits): taken out when the request reuses
    /// at least half of it, else its prefix copied with `sampler`. `None` on a miss. The caller
    /// sets the sampler of a taken entry.
    pub fn take(&mut self, setting: &str, tokens: &[u32], sampler: &SamplerSettings) -> Option<Hit<'e>> {
        let (best, len, held) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.setting == setting)
            .map(|(i, e)| (i, common_prefix(e.seq.history(), tokens).min(e.seq.cached_tokens()), e.seq.cached_tokens()))
            .max_by_key(|&(_, n, _)| n)?;
        let reuse = len.min(tokens.len().saturating_sub(1));
        if reuse == 0 {
            return None;
        }
        if 2 * reuse < held {
            self.clock += 1;
            let entry = &mut self.entries[best];
            entry.last_used = self.clock;
            return match entry.seq.fork(reuse, sampler.clone()) {
                Ok(Some(seq)) => Some(Hit { seq, reused: reuse, copied: true }),
                Ok(None) => None,
                Err(e) => {
                    eprintln!("serve: copying {reuse} tokens out of a kept conversation failed: {e}");
                    None
                }
            };
        }
        let mut entry = self.entries.swap_remove(best);
        if !entry.seq.trim_to(reuse) {
            // A wrapped window or per-channel groups cannot be cut back: the entry is useless
            // for this request and stale for any other that shares less.
            return None;
        }
        Some(Hit { seq: entry.seq, reused: reuse, copied: false })
    }

    /// Keeps `seq`, then evicts least recently used entries beyond the budget. An entry larger
    /// than the whole budget is not kept.
    pub fn put(&mut self, setting: String, seq: Sequence<'e>) {
        let bytes = seq.kv_bytes().total() as u64;
        if bytes > self.budget {
            return;
        }
        self.clock += 1;
        self.entries.push(Entry { setting, seq, bytes, last_used: self.clock });
        self.evict_to(self.budget);
    }

    /// Evicts least recently used entries until at most `limit` bytes are kept; returns the
    /// bytes freed.
    pub fn evict_to(&mut self, limit: u64) -> u64 {
        let mut freed = 0;
        while self.bytes() > limit {
            let Some((i, _)) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used) else { break };
            freed += self.entries.swap_remove(i).bytes;
        }
        freed
    }
}
