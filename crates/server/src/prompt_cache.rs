//! Kept conversations: finished sequences, their caches quantized as stored, keyed by their
//! tokens and K/V setting, under a budget of resident bytes with LRU eviction.
//!
//! A request takes the entry with the longest common token prefix under its own setting (never
//! another setting's), trims it to that prefix and prefills only the rest, so a turn whose
//! history ends inside a kept conversation (a regenerated answer) is served too. An entry is
//! taken only when the request reuses at least half of it: a new conversation that merely shares
//! the system prompt would otherwise cut a long kept one down to that prompt. (Copying the shared
//! prefix into a new cache would serve both; not done yet.)

use models::engine::Sequence;

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

    /// Removes and returns the best entry for `tokens` under `setting`, trimmed so that at least
    /// one token of `tokens` is left to feed (the first step needs logits). `None` on a miss.
    pub fn take(&mut self, setting: &str, tokens: &[u32]) -> Option<Hit<'e>> {
        let (best, len, held) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.setting == setting)
            .map(|(i, e)| (i, common_prefix(e.seq.history(), tokens).min(e.seq.cached_tokens()), e.seq.cached_tokens()))
            .max_by_key(|&(_, n, _)| n)?;
        let reuse = len.min(tokens.len().saturating_sub(1));
        if reuse == 0 || 2 * reuse < held {
            return None;
        }
        let mut entry = self.entries.swap_remove(best);
        if !entry.seq.trim_to(reuse) {
            // A wrapped window or per-channel groups cannot be cut back: the entry is useless
            // for this request and stale for any other that shares less.
            return None;
        }
        Some(Hit { seq: entry.seq, reused: reuse })
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
