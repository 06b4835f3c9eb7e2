//! The engine thread's loop: continuous batching. Requests join the running batch between
//! steps while `--decode-concurrency` and the KV budget allow; each turn of the loop feeds one
//! prompt chunk (`--prefill-step` tokens of the oldest sequence still reading its prompt) and
//! then one decode step over every sequence that is generating, so running streams keep
//! flowing while a long prompt is read. Finished and cancelled sequences leave at once; their
//! caches are kept in the prompt cache.

use crate::api::{ApiError, KvCacheReport, Timings, Usage};
use crate::metrics::Metrics;
use crate::output::Output;
use crate::prompt_cache::PromptCache;
use crate::request::{plan, Plan};
use crate::job::{Event, Finish, Job};
use crate::ServeConfig;
use models::engine::{decode_batch, Engine, Sequence, TokenLogprobs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// A request in the running batch.
struct Active<'e> {
    seq: Sequence<'e>,
    out: Output<'e>,
    key: String,
    /// The setting's name and source (`k8v4+recipe`, `recipe:...`), as the answer reports.
    kv_name: String,
    kv_source: String,
    max_tokens: usize,
    logprobs: Option<usize>,
    predicted: u64,
    prompt_tokens: usize,
    /// Prompt tokens served by a kept conversation.
    reused: usize,
    received: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    produced: usize,
    finish: Option<&'static str>,
}

/// What one engine call failed with: a Rust error or a panic, as the client's 500.
fn guarded<T>(what: &str, f: impl FnOnce() -> models::error::Result<T>) -> Result<T, ApiError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError::internal(format!("{what} failed: {e}"))),
        Err(panic) => {
            let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            eprintln!("serve: {what} panicked: {msg}");
            Err(ApiError::internal(format!("internal error while generating: {msg}")))
        }
    }
}

pub struct Scheduler<'e, 'c> {
    engine: &'e Engine,
    cache: PromptCache<'e>,
    config: &'c ServeConfig,
    metrics: &'c Metrics,
    running: Vec<Active<'e>>,
    /// A checked request that waits for KV budget held by running ones (first in line).
    blocked: Option<Plan>,
    /// Whether the allocator was trimmed since the last request ran.
    trimmed: bool,
}

impl<'e, 'c> Scheduler<'e, 'c> {
    pub fn new(engine: &'e Engine, cache: PromptCache<'e>, config: &'c ServeConfig, metrics: &'c Metrics) -> Self {
        Scheduler { engine, cache, config, metrics, running: Vec::new(), blocked: None, trimmed: true }
    }

    /// Runs until `stop`: then cancels what runs and answers what waits.
    pub fn run(mut self, stop: &AtomicBool, rx: Receiver<Job>) {
        loop {
            if stop.load(Relaxed) {
                self.shut_down(&rx);
                return;
            }
            if !self.intake(&rx) {
                self.shut_down(&rx);
                return;
            }
            self.drop_gone();
            self.prefill_one();
            self.decode_step();
            self.retire();
            self.publish();
        }
    }

    /// Once per idle spell: the C allocator keeps freed pages of finished requests (tens of
    /// MB after a burst); hand them back so the process's resident memory returns to what is
    /// actually held.
    fn idle(&mut self) {
        if !self.trimmed {
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only walks glibc's own heap; no pointer of ours is involved.
            unsafe {
                libc::malloc_trim(0);
            }
            self.trimmed = true;
        }
    }

    fn running_predicted(&self) -> u64 {
        self.running.iter().map(|a| a.predicted).sum()
    }

    /// Admits queued requests while there is room; false when the queue's senders are gone.
    fn intake(&mut self, rx: &Receiver<Job>) -> bool {
        while self.running.len() < self.config.decode_concurrency {
            let plan = match self.blocked.take() {
                Some(p) if p.events.is_closed() => {
                    self.metrics.cancelled.fetch_add(1, Relaxed);
                    continue;
                }
                Some(p) => p,
                None => {
                    let job = if self.running.is_empty() {
                        match rx.recv_timeout(Duration::from_millis(100)) {
                            Ok(j) => j,
                            Err(RecvTimeoutError::Timeout) => {
                                self.idle();
                                return true;
                            }
                            Err(RecvTimeoutError::Disconnected) => return false,
                        }
                    } else {
                        match rx.try_recv() {
                            Ok(j) => j,
                            Err(TryRecvError::Empty) => return true,
                            Err(TryRecvError::Disconnected) => return false,
                        }
                    };
                    self.metrics.queue_depth.fetch_sub(1, Relaxed);
                    if job.events.is_closed() {
                        // The client left while the request waited: nothing to read or keep.
                        self.metrics.cancelled.fetch_add(1, Relaxed);
                        continue;
                    }
                    // A panic while checking loses the job's channel; the handler then answers 500.
                    match guarded("checking the request", || Ok(plan(self.engine, self.config, job))) {
                        Ok(Ok(p)) => p,
                        Ok(Err((e, events))) => {
                            self.metrics.requests_failed.fetch_add(1, Relaxed);
                            let _ = events.send(Event::Error(e));
                            continue;
                        }
                        Err(_) => {
                            self.metrics.requests_failed.fetch_add(1, Relaxed);
                            continue;
                        }
                    }
                }
            };
            let used = self.running_predicted();
            if used + plan.predicted > self.config.kv_budget {
                // Fits alone (checked by `plan`), not beside the running ones: wait for them.
                self.blocked = Some(plan);
                return true;
            }
            self.cache.evict_to(self.config.kv_budget - used - plan.predicted);
            self.admit(plan);
        }
        true
    }

    fn admit(&mut self, p: Plan) {
        let m = self.metrics;
        let tok = match self.engine.tokenizer() {
            Ok(t) => t,
            Err(e) => {
                m.requests_failed.fetch_add(1, Relaxed);
                let _ = p.events.send(Event::Error(ApiError::internal(e.to_string())));
                return;
            }
        };
        let (seq, reused) = match self.cache.take(&p.key, &p.tokens, &p.sampler) {
            Some(hit) => {
                let mut seq = hit.seq;
                if !hit.copied {
                    if let Err(e) = seq.set_sampler(p.sampler.clone()) {
                        m.requests_failed.fetch_add(1, Relaxed);
                        let _ = p.events.send(Event::Error(ApiError::internal(e.to_string())));
                        return;
                    }
                } else {
                    m.prompt_cache_copies.fetch_add(1, Relaxed);
                }
                m.prompt_cache_hits.fetch_add(1, Relaxed);
                m.prompt_cache_tokens.fetch_add(hit.reused as u64, Relaxed);
                (seq, hit.reused)
            }
            None => {
                m.prompt_cache_misses.fetch_add(1, Relaxed);
                let room = p.tokens.len() + p.max_tokens;
                let mut made = self.engine.pooled_sequence(&p.kv.settings, p.sampler.clone(), self.config.prefill_step, room);
                if matches!(made, Ok(None)) {
                    // Blocks of kept conversations, or arrays of another format, hold the pool:
                    // free what the prompt cache keeps and try once more.
                    self.cache.evict_to(0);
                    made = self.engine.pooled_sequence(&p.kv.settings, p.sampler.clone(), self.config.prefill_step, room);
                }
                match made {
                    Ok(Some(s)) => (s, 0),
                    Ok(None) => {
                        m.requests_failed.fetch_add(1, Relaxed);
                        let _ = p.events.send(Event::Error(ApiError::busy(format!("the KV pool has no room for {room} tokens now (--kv-budget): blocks of another precision hold it"))));
                        return;
                    }
                    Err(e) => {
                        m.requests_failed.fetch_add(1, Relaxed);
                        let _ = p.events.send(Event::Error(ApiError::bad_request(Some("kv"), e.to_string())));
                        return;
                    }
                }
            }
        };
        let mut seq = seq;
        // A kept conversation's next turn: room for the whole of it, as a new one is promised
        // (the budget check above counted it; a pool holding other formats may still refuse,
        // and then blocks are taken from what is free as tokens arrive).
        seq.pool_room(Some(p.tokens.len() + p.max_tokens));
        if let Err(e) = seq.queue_prompt(&p.tokens[reused..], p.max_tokens) {
            m.requests_failed.fetch_add(1, Relaxed);
            let _ = p.events.send(Event::Error(ApiError::bad_request(Some("max_tokens"), e.to_string())));
            return;
        }
        self.trimmed = false;
        self.running.push(Active {
            seq,
            out: Output::new(tok, p.events, p.stops),
            key: p.key,
            kv_name: p.kv.name,
            kv_source: p.kv.source,
            max_tokens: p.max_tokens,
            logprobs: p.logprobs,
            predicted: p.predicted,
            prompt_tokens: p.tokens.len(),
            reused,
            received: p.received,
            first_token: None,
            last_token: None,
            produced: 0,
            finish: None,
        });
    }

    /// Clients that went away stop before the next step; their caches are kept.
    fn drop_gone(&mut self) {
        for a in &mut self.running {
            if a.finish.is_none() && !a.out.connected() {
                a.finish = Some("cancelled");
            }
        }
    }

    /// One chunk of the oldest prompt still being read.
    fn prefill_one(&mut self) {
        let generating = self.running.iter().any(|a| a.finish.is_none() && a.produced > 0);
        let step = if generating { self.config.prefill_step_decoding.min(self.config.prefill_step) } else { self.config.prefill_step };
        let Some(a) = self.running.iter_mut().find(|a| a.finish.is_none() && a.produced == 0) else { return };
        let logprobs = a.logprobs;
        match guarded("prefill", || a.seq.prefill_some(step, logprobs)) {
            Ok(Some((id, scores))) => take_token(a, id, scores),
            Ok(None) => {}
            Err(e) => fail(a, e),
        }
    }

    /// One decode step over every generating sequence.
    fn decode_step(&mut self) {
        let mut batch: Vec<&mut Active<'e>> = self.running.iter_mut().filter(|a| a.finish.is_none() && a.produced > 0).collect();
        if batch.is_empty() {
            return;
        }
        let logprobs: Vec<Option<usize>> = batch.iter().map(|a| a.logprobs).collect();
        let result = {
            let mut seqs: Vec<&mut Sequence<'e>> = batch.iter_mut().map(|a| &mut a.seq).collect();
            guarded("decode", || decode_batch(&mut seqs, &logprobs))
        };
        match result {
            Ok(tokens) => {
                for (a, (id, scores)) in batch.into_iter().zip(tokens) {
                    take_token(a, id, scores);
                }
            }
            Err(e) => {
                for a in batch {
                    fail(a, e.clone());
                }
            }
        }
    }

    /// Answers and removes finished sequences, keeping their caches.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finish.is_none() {
                i += 1;
                continue;
            }
            let a = self.running.swap_remove(i);
            self.finish(a);
        }
    }

    fn finish(&mut self, mut a: Active<'e>) {
        let m = self.metrics;
        let reason = a.finish.unwrap_or("stop");
        if reason == "error" {
            // The failure was answered; a sequence left mid-step is not kept.
            m.requests_failed.fetch_add(1, Relaxed);
            return;
        }
        if reason == "cancelled" {
            m.cancelled.fetch_add(1, Relaxed);
        }
        a.out.flush();
        let model = self.engine.model();
        let resident = a.seq.kv_bytes().total() as u64;
        let cached = a.seq.cached_tokens();
        // A 16-bit cache of the same allocation (caches grow in whole steps of slots): K and V,
        // every layer and KV head, 2 bytes an element.
        let fp16_per_token = (2 * model.n_layers() * model.n_kv_heads() * model.head_dim() * 2) as u64;
        let slots = cached.div_ceil(mlx_kv::store::STEP) * mlx_kv::store::STEP;
        let kv_cache = KvCacheReport {
            setting: a.kv_name.clone(),
            source: a.kv_source.clone(),
            resident_bytes: resident,
            fp16_bytes: fp16_per_token * slots as u64,
            prompt_cache_hit: a.reused > 0,
            cached_tokens: a.reused,
            tokens: cached,
        };
        m.prompt_tokens.fetch_add(a.prompt_tokens as u64, Relaxed);
        m.completion_tokens.fetch_add(a.produced as u64, Relaxed);
        let usage = Usage { prompt_tokens: a.prompt_tokens, completion_tokens: a.produced, total_tokens: a.prompt_tokens + a.produced };
        let prompt_s = a.first_token.map_or(0.0, |t| (t - a.received).as_secs_f64());
        let decode_s = match (a.first_token, a.last_token) {
            (Some(f), Some(l)) => (l - f).as_secs_f64(),
            _ => 0.0,
        };
        let fed = a.prompt_tokens - a.reused;
        let timings = Timings {
            prompt_ms: prompt_s * 1e3,
            prompt_tps: if prompt_s > 0.0 { fed as f64 / prompt_s } else { 0.0 },
            decode_tps: if decode_s > 0.0 { a.produced.saturating_sub(1) as f64 / decode_s } else { 0.0 },
        };
        // Kept before the answer ends, so a client that reads /metrics right after sees it.
        let Active { seq, out, key, .. } = a;
        self.cache.put(key, seq);
        self.publish();
        out.send(Event::Done(Box::new(Finish { finish_reason: reason, usage, kv_cache, timings })));
    }

    fn publish(&self) {
        let m = self.metrics;
        m.active_kv_bytes.store(self.running.iter().map(|a| a.seq.kv_bytes().total() as u64).sum(), Relaxed);
        if let Some(pool) = self.engine.pool() {
            let u = pool.usage();
            m.pool_used_blocks.store(u.used_blocks as u64, Relaxed);
            m.pool_free_blocks.store(u.free_blocks as u64, Relaxed);
            m.pool_promised_blocks.store(u.promised_blocks as u64, Relaxed);
            m.pool_allocated_bytes.store(u.allocated_bytes as u64, Relaxed);
        }
        m.prompt_cache_bytes.store(self.cache.bytes(), Relaxed);
        m.prompt_cache_entries.store(self.cache.len() as u64, Relaxed);
        m.running.store(self.running.len() as u64, Relaxed);
    }

    fn shut_down(&mut self, rx: &Receiver<Job>) {
        for a in &mut self.running {
            if a.finish.is_none() {
                a.finish = Some("cancelled");
            }
        }
        self.retire();
        let busy = || Event::Error(ApiError::busy("the server is shutting down"));
        if let Some(p) = self.blocked.take() {
            let _ = p.events.send(busy());
        }
        while let Ok(job) = rx.try_recv() {
            self.metrics.queue_depth.fetch_sub(1, Relaxed);
            let _ = job.events.send(busy());
        }
        self.publish();
    }
}

/// A produced token: counted, checked against the end of generation, `max_tokens` and stop
/// strings, and streamed.
fn take_token(a: &mut Active<'_>, id: u32, scores: Option<TokenLogprobs>) {
    let now = Instant::now();
    a.first_token.get_or_insert(now);
    a.last_token = Some(now);
    a.produced += 1;
    let tok = a.out.tokenizer();
    if tok.is_eos(id) {
        a.finish = Some("stop");
    } else if !a.out.push(id, scores) {
        a.finish = Some(if a.out.stopped { "stop" } else { "cancelled" });
    } else if a.produced >= a.max_tokens {
        a.finish = Some("length");
    }
}

fn fail(a: &mut Active<'_>, e: ApiError) {
    a.out.send(Event::Error(e));
    a.finish = Some("error");
}
