//! Counters for `GET /metrics`, in Prometheus' text format.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub requests_failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub prompt_cache_hits: AtomicU64,
    pub prompt_cache_misses: AtomicU64,
    /// Prompt tokens served from kept conversations instead of prefilled.
    pub prompt_cache_tokens: AtomicU64,
    /// Hits served by copying a shared prefix out of a kept conversation that stays kept.
    pub prompt_cache_copies: AtomicU64,
    /// Resident bytes of kept conversations.
    pub prompt_cache_bytes: AtomicU64,
    pub prompt_cache_entries: AtomicU64,
    /// Resident bytes of the conversation being generated.
    pub active_kv_bytes: AtomicU64,
    pub queue_depth: AtomicU64,
    /// Sequences in the running batch.
    pub running: AtomicU64,
    pub cancelled: AtomicU64,
    /// The KV block pool (`mlx_kv::pool`): blocks held by sequences, free, and promised to
    /// admitted requests; bytes its arrays take.
    pub pool_used_blocks: AtomicU64,
    pub pool_free_blocks: AtomicU64,
    pub pool_promised_blocks: AtomicU64,
    pub pool_allocated_bytes: AtomicU64,
}

impl Metrics {
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 18] = [
            ("kvsplit_requests_total", "counter", "Completion requests received", &self.requests),
            ("kvsplit_requests_failed_total", "counter", "Completion requests answered with an error", &self.requests_failed),
            ("kvsplit_prompt_tokens_total", "counter", "Prompt tokens of finished requests", &self.prompt_tokens),
            ("kvsplit_completion_tokens_total", "counter", "Tokens generated", &self.completion_tokens),
            ("kvsplit_prompt_cache_hits_total", "counter", "Requests that reused a kept conversation", &self.prompt_cache_hits),
            ("kvsplit_prompt_cache_misses_total", "counter", "Requests that started from an empty cache", &self.prompt_cache_misses),
            ("kvsplit_prompt_cache_tokens_total", "counter", "Prompt tokens reused instead of prefilled", &self.prompt_cache_tokens),
            ("kvsplit_prompt_cache_copies_total", "counter", "Hits that copied a shared prefix out of a kept conversation", &self.prompt_cache_copies),
            ("kvsplit_prompt_cache_resident_bytes", "gauge", "Resident KV bytes of kept conversations", &self.prompt_cache_bytes),
            ("kvsplit_prompt_cache_entries", "gauge", "Kept conversations", &self.prompt_cache_entries),
            ("kvsplit_active_kv_bytes", "gauge", "Resident KV bytes of the running generation", &self.active_kv_bytes),
            ("kvsplit_queue_depth", "gauge", "Requests waiting for the engine", &self.queue_depth),
            ("kvsplit_running_sequences", "gauge", "Sequences in the running batch", &self.running),
            ("kvsplit_cancelled_total", "counter", "Generations stopped by a client disconnect or shutdown", &self.cancelled),
            ("kvsplit_kv_pool_used_blocks", "gauge", "KV pool blocks (256 tokens) held by sequences, kept ones included", &self.pool_used_blocks),
            ("kvsplit_kv_pool_free_blocks", "gauge", "KV pool blocks allocated and free", &self.pool_free_blocks),
            ("kvsplit_kv_pool_promised_blocks", "gauge", "KV pool blocks promised to admitted requests and not yet taken", &self.pool_promised_blocks),
            ("kvsplit_kv_pool_allocated_bytes", "gauge", "Bytes the KV pool's arrays take", &self.pool_allocated_bytes),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n", v.load(Relaxed)));
        }
        let resident = self.prompt_cache_bytes.load(Relaxed) + self.active_kv_bytes.load(Relaxed);
        out.push_str(&format!("# HELP kvsplit_kv_resident_bytes Resident KV bytes in all\n# TYPE kvsplit_kv_resident_bytes gauge\nkvsplit_kv_resident_bytes {resident}\n"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_type_and_a_value() {
        let m = Metrics::default();
        m.prompt_cache_bytes.store(100, Relaxed);
        m.active_kv_bytes.store(20, Relaxed);
        m.requests.fetch_add(3, Relaxed);
        let text = m.render();
        assert!(text.contains("kvsplit_requests_total 3\n"));
        assert!(text.contains("kvsplit_kv_resident_bytes 120\n"));
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, text.lines().filter(|l| l.starts_with("# TYPE")).count());
        assert_eq!(samples, 19);
    }
}
