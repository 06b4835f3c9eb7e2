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

/// A copy adds a second resident copy of the shared prefix; an entry that can be taken whole
/// instead is worth prefilling this many more tokens (a few milliseconds on the CPU).
pub const COPY_SLACK: usize = 32;

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
    /// at least half of it, else its prefix copied with `sampler`. An entry that can be taken is
    /// preferred over a copy that reuses at most [`COPY_SLACK`] tokens more. `None` on a miss.
    /// The caller sets the sampler of a taken entry.
    pub fn take(&mut self, setting: &str, tokens: &[u32], sampler: &SamplerSettings) -> Option<Hit<'e>> {
        let usable = tokens.len().saturating_sub(1);
        let candidates: Vec<(usize, usize, bool)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.setting == setting)
            .map(|(i, e)| {
                let held = e.seq.cached_tokens();
                // Per-channel key groups are cut whole: the rest is read again.
                let reuse = e.seq.reusable(common_prefix(e.seq.history(), tokens).min(held).min(usable));
                (i, reuse, 2 * reuse >= held)
            })
            .filter(|&(_, reuse, _)| reuse > 0)
            .collect();
        let best = candidates.iter().max_by_key(|c| c.1)?;
        let best_taken = candidates.iter().filter(|c| c.2).max_by_key(|c| c.1);
        let (i, reuse, whole) = match best_taken {
            Some(t) if t.1 + COPY_SLACK >= best.1 => *t,
            _ => *best,
        };
        self.clock += 1;
        if !whole {
            let entry = &mut self.entries[i];
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
        let mut entry = self.entries.swap_remove(i);
        if !entry.seq.trim_to(reuse) {
            // `reusable` said it can be cut there; keep it whole if not.
            entry.last_used = self.clock;
            self.entries.push(entry);
            return None;
        }
        Some(Hit { seq: entry.seq, reused: reuse, copied: false })
    }

    /// Keeps `seq`, then evicts least recently used entries beyond the budget. An entry larger
    /// than the whole budget is not kept.
    pub fn put(&mut self, setting: String, mut seq: Sequence<'e>) {
        // A kept conversation holds the blocks it wrote, not the room its request was promised.
        seq.pool_room(None);
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
