//! The engine's thread. Jobs arrive through a bounded queue; each is rendered, tokenized,
//! checked (model, `n`, fields, context, predicted KV bytes), matched against kept
//! conversations, generated, and answered with events: text pieces, then `Done` (or `Error`
//! before any text). A closed event channel (the client went away) or a shutdown stops the
//! generation at the next token; a panic becomes an error event and the thread goes on.

use crate::api::{logprobs_asked, Alternative, ApiError, CompletionRequest, KvCacheReport, Timings, TokenScore, Usage};
use crate::metrics::Metrics;
use crate::prompt_cache::PromptCache;
use crate::{kv_field, ServeConfig};
use models::chat::{render, Message};
use models::engine::Engine;
use models::sample::SamplerSettings;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// What a job sends back.
#[derive(Debug)]
pub enum Event {
    /// A piece of text and the scores of the tokens it completes (empty without `logprobs`).
    Text(String, Vec<TokenScore>),
    Done(Box<Finish>),
    Error(ApiError),
}

#[derive(Debug, Clone)]
pub struct Finish {
    /// `stop` (end of generation or a stop string), `length`, or `cancelled` (shutdown).
    pub finish_reason: &'static str,
    pub usage: Usage,
    pub kv_cache: KvCacheReport,
    pub timings: Timings,
}

pub struct Job {
    pub req: CompletionRequest,
    /// `/v1/chat/completions` (messages through the chat template) or `/v1/completions`.
    pub chat: bool,
    pub events: UnboundedSender<Event>,
}

/// The HTTP side's end of the queue.
#[derive(Clone)]
pub struct Handle {
    tx: SyncSender<Job>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Handle {
    /// Queues `job`; a full queue is a 503 with `Retry-After`.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        if self.stop.load(Relaxed) {
            return Err(ApiError::busy("the server is shutting down"));
        }
        self.metrics.queue_depth.fetch_add(1, Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Relaxed);
                Err(match e {
                    TrySendError::Full(_) => ApiError::busy("the request queue is full; retry shortly"),
                    TrySendError::Disconnected(_) => ApiError::internal("the engine has stopped"),
                })
            }
        }
    }

    /// Cancels the running generation and makes the thread exit once the queue is answered.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }
}

/// Starts the engine thread; returns once the model has loaded (or failed to).
pub fn start(
    config: ServeConfig,
    load: impl FnOnce() -> models::error::Result<Engine> + Send + 'static,
    metrics: Arc<Metrics>,
) -> Result<(Handle, std::thread::JoinHandle<()>), String> {
    let (tx, rx) = sync_channel::<Job>(config.queue);
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let handle = Handle { tx, stop: stop.clone(), metrics: metrics.clone() };
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let engine = match load() {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let mut cache: PromptCache<'_> = PromptCache::new(config.prompt_cache_bytes);
            for f in &config.prompt_cache_files {
                match engine.sequence_from_file(f, config.sampler.clone(), config.prefill_step) {
                    Ok(seq) => cache.put(setting_key(seq.settings()), seq),
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("--prompt-cache-file {}: {e}", f.display())));
                        return;
                    }
                }
            }
            metrics.prompt_cache_bytes.store(cache.bytes(), Relaxed);
            metrics.prompt_cache_entries.store(cache.len() as u64, Relaxed);
            let _ = ready_tx.send(Ok(()));
            run(&engine, cache, &config, &metrics, &stop, rx);
        })
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((handle, thread)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the engine thread ended while loading the model".into()),
    }
}

/// The prompt cache's key for a setting: entries only serve requests with the same one.
fn setting_key(s: &models::generate::CacheSettings) -> String {
    format!("{:?}|{:?}|{:?}", s.spec, s.layers, s.max_kv_size)
}

fn run<'e>(engine: &'e Engine, mut cache: PromptCache<'e>, config: &ServeConfig, metrics: &Metrics, stop: &AtomicBool, rx: Receiver<Job>) {
    loop {
        let job = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) if stop.load(Relaxed) => break,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        metrics.queue_depth.fetch_sub(1, Relaxed);
        let events = job.events.clone();
        if stop.load(Relaxed) {
            let _ = events.send(Event::Error(ApiError::busy("the server is shutting down")));
            continue;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| serve(engine, &mut cache, config, metrics, stop, job)));
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(panic) => {
                let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                eprintln!("serve: a request panicked: {what}");
                Some(ApiError::internal(format!("internal error while generating: {what}")))
            }
        };
        if let Some(e) = error {
            metrics.requests_failed.fetch_add(1, Relaxed);
            let _ = events.send(Event::Error(e));
        }
        metrics.active_kv_bytes.store(0, Relaxed);
        metrics.prompt_cache_bytes.store(cache.bytes(), Relaxed);
        metrics.prompt_cache_entries.store(cache.len() as u64, Relaxed);
    }
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(Some(param), message)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(e.to_string())
}

/// The sampler of a request: its fields over the server's defaults.
fn sampler(req: &CompletionRequest, defaults: &SamplerSettings) -> Result<SamplerSettings, ApiError> {
    let s = SamplerSettings {
        temp: req.temperature.unwrap_or(defaults.temp),
        top_p: req.top_p.unwrap_or(defaults.top_p),
        seed: req.seed.unwrap_or(defaults.seed),
        ..defaults.clone()
    };
    if !(s.temp >= 0.0 && s.temp.is_finite()) {
        return Err(bad("temperature", format!("temperature must be 0 or more, got {}", s.temp)));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(bad("top_p", format!("top_p must be in (0, 1], got {}", s.top_p)));
    }
    s.validate().map_err(|e| bad("temperature", e.to_string()))?;
    Ok(s)
}

/// How many bytes at the end of `text` could still grow into one of `stops`: they are held back
/// from the stream until the next token decides.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for n in (1..s.len()).rev() {
            if n <= text.len() && text.is_char_boundary(text.len() - n) && s.is_char_boundary(n) && text.ends_with(&s[..n]) {
                keep = keep.max(n);
                break;
            }
        }
    }
    keep
}

fn serve<'e>(engine: &'e Engine, cache: &mut PromptCache<'e>, config: &ServeConfig, metrics: &Metrics, stop: &AtomicBool, job: Job) -> Result<(), ApiError> {
    let Job { req, chat, events } = job;
    let model = engine.model();
    let tok = engine.tokenizer().map_err(internal)?;
    if let Some(m) = &req.model {
        if m != &config.model_name {
            return Err(ApiError::not_found(Some("model"), format!("model '{m}' does not exist; this server serves '{}'", config.model_name)));
        }
    }
    if let Some(n) = req.n {
        if n != 1 {
            return Err(bad("n", format!("n = {n}: only one choice per request (n = 1) is supported")));
        }
    }
    let logprobs = logprobs_asked(&req, chat)?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).map_or(config.max_tokens, |n| n as usize);
    if max_tokens == 0 {
        return Err(bad("max_tokens", "max_tokens must be at least 1"));
    }
    let sampler = sampler(&req, &config.sampler)?;
    let settings = kv_field::settings(req.kv.as_ref(), &config.cache)?;
    settings.check(model.n_layers(), model.head_dim()).map_err(|e| bad("kv", format!("kv: {e}")))?;
    let stops: Vec<String> = req.stop.clone().map(|s| s.list()).unwrap_or_default().into_iter().filter(|s| !s.is_empty()).collect();
    if stops.len() > 4 {
        return Err(bad("stop", format!("at most 4 stop sequences, got {}", stops.len())));
    }

    let tokens = if chat {
        let messages = req.messages.as_ref().ok_or_else(|| bad("messages", "messages is required for chat completions"))?;
        if messages.is_empty() {
            return Err(bad("messages", "messages must not be empty"));
        }
        let template = tok.chat_template().ok_or_else(|| bad("messages", format!("model '{}' has no chat template; use /v1/completions", config.model_name)))?;
        let msgs: Vec<Message> = messages.iter().map(|m| Message { role: m.role.clone(), content: m.content.clone() }).collect();
        let name = |id: Option<u32>| id.and_then(|i| tok.token(i)).unwrap_or("").to_string();
        let text = render(template, &msgs, &name(tok.bos_id()), &name(tok.eos_ids().first().copied()), true).map_err(|e| bad("messages", format!("chat template: {e}")))?;
        tok.encode(&text, false)
    } else {
        let prompt = req.prompt.as_ref().ok_or_else(|| bad("prompt", "prompt is required for completions"))?;
        tok.encode(prompt, true)
    };
    if tokens.is_empty() {
        return Err(bad(if chat { "messages" } else { "prompt" }, "the prompt encodes to no tokens"));
    }
    let total = tokens.len() + max_tokens;
    if settings.max_kv_size.is_none() && total > model.max_context() {
        return Err(bad(
            "max_tokens",
            format!("context of {total} tokens ({} prompt + {max_tokens} max_tokens) exceeds the model's maximum of {}", tokens.len(), model.max_context()),
        ));
    }
    // Admission: the cache this request can grow to, from the closed form, must fit the budget
    // beside what stays kept; kept conversations are evicted first.
    let held = settings.max_kv_size.map_or(total, |w| w.min(total));
    let predicted = (settings.bytes_per_token(model) * held as f64).ceil() as u64;
    if predicted > config.kv_budget {
        return Err(bad(
            "max_tokens",
            format!("this request's KV cache could reach {predicted} bytes ({held} tokens of {}), more than the server's --kv-budget of {} bytes", settings.spec, config.kv_budget),
        ));
    }
    cache.evict_to(config.kv_budget - predicted);

    let key = setting_key(&settings);
    let (mut seq, reused) = match cache.take(&key, &tokens, &sampler) {
        Some(hit) => {
            let mut seq = hit.seq;
            if !hit.copied {
                seq.set_sampler(sampler).map_err(internal)?;
            }
            if hit.copied {
                metrics.prompt_cache_copies.fetch_add(1, Relaxed);
            }
            metrics.prompt_cache_hits.fetch_add(1, Relaxed);
            metrics.prompt_cache_tokens.fetch_add(hit.reused as u64, Relaxed);
            (seq, hit.reused)
        }
        None => {
            metrics.prompt_cache_misses.fetch_add(1, Relaxed);
            (engine.sequence(&settings, sampler, config.prefill_step).map_err(|e| bad("kv", e.to_string()))?, 0)
        }
    };
    metrics.prompt_cache_bytes.store(cache.bytes(), Relaxed);
    metrics.prompt_cache_entries.store(cache.len() as u64, Relaxed);

    let mut decoder = tok.stream_decoder();
    let mut pending = String::new();
    let mut scored: Vec<TokenScore> = Vec::new();
    let alternative = |id: u32, logprob: f32| {
        let mut bytes = Vec::new();
        tok.token_bytes(id, &mut bytes);
        if bytes.is_empty() {
            // A control token (end of turn) decodes to nothing; name it as the vocabulary does.
            bytes = tok.token(id).unwrap_or("").as_bytes().to_vec();
        }
        Alternative { text: String::from_utf8_lossy(&bytes).into_owned(), bytes, logprob }
    };
    let mut finish: Option<&'static str> = None;
    let mut gone = false;
    let stats = seq
        .generate_scored(&tokens[reused..], max_tokens, tok.eos_ids(), logprobs, |id, scores| {
            if stop.load(Relaxed) {
                finish = Some("cancelled");
                return false;
            }
            if events.is_closed() {
                gone = true;
                return false;
            }
            pending.push_str(&decoder.push(id));
            if let Some(s) = scores {
                scored.push(TokenScore { token: alternative(id, s.logprob), top: s.top.iter().map(|&(t, lp)| alternative(t, lp)).collect() });
            }
            if let Some(pos) = stops.iter().filter_map(|s| pending.find(s.as_str())).min() {
                pending.truncate(pos);
                finish = Some("stop");
                return false;
            }
            let send = pending.len() - held_back(&pending, &stops);
            if send > 0 {
                let piece: String = pending.drain(..send).collect();
                if events.send(Event::Text(piece, std::mem::take(&mut scored))).is_err() {
                    gone = true;
                    return false;
                }
            }
            true
        })
        .map_err(|e| internal(format!("generation failed: {e}")))?;
    if finish.is_none() && !gone {
        pending.push_str(&decoder.finish());
    }
    if (!pending.is_empty() || !scored.is_empty()) && !gone {
        let _ = events.send(Event::Text(pending, scored));
    }
    let last = seq.history().last().copied();
    let finish_reason = finish.unwrap_or(if last.is_some_and(|t| tok.is_eos(t)) { "stop" } else if gone { "cancelled" } else { "length" });
    if gone || finish == Some("cancelled") {
        metrics.cancelled.fetch_add(1, Relaxed);
    }

    let resident = seq.kv_bytes().total() as u64;
    let cached = seq.cached_tokens();
    // A 16-bit cache of the same allocation (caches grow in whole steps of slots): K and V,
    // every layer and KV head, 2 bytes an element.
    let fp16_per_token = (2 * model.n_layers() * model.n_kv_heads() * model.head_dim() * 2) as u64;
    let slots = cached.div_ceil(mlx_kv::store::STEP) * mlx_kv::store::STEP;
    let report = KvCacheReport {
        setting: settings.spec.to_string(),
        resident_bytes: resident,
        fp16_bytes: fp16_per_token * slots as u64,
        prompt_cache_hit: reused > 0,
        cached_tokens: reused,
        tokens: cached,
    };
    metrics.active_kv_bytes.store(resident, Relaxed);
    metrics.prompt_tokens.fetch_add(tokens.len() as u64, Relaxed);
    metrics.completion_tokens.fetch_add(stats.generation_tokens as u64, Relaxed);
    let usage = Usage { prompt_tokens: tokens.len(), completion_tokens: stats.generation_tokens, total_tokens: tokens.len() + stats.generation_tokens };
    let timings = Timings { prompt_ms: stats.prompt_time.as_secs_f64() * 1e3, prompt_tps: stats.prompt_tps(), decode_tps: stats.generation_tps() };
    // Kept before the answer ends, so a client that reads /metrics right after sees it.
    cache.put(key, seq);
    metrics.prompt_cache_bytes.store(cache.bytes(), Relaxed);
    metrics.prompt_cache_entries.store(cache.len() as u64, Relaxed);
    let _ = events.send(Event::Done(Box::new(Finish { finish_reason, usage, kv_cache: report, timings })));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn text_that_could_begin_a_stop_sequence_is_held_back() {
        let stops = vec!["\nUser:".to_string(), "END".to_string()];
        assert_eq!(held_back("Hello", &stops), 0);
        assert_eq!(held_back("Hello\nUs", &stops), 3);
        assert_eq!(held_back("Hello E", &stops), 1);
        assert_eq!(held_back("Hello EN", &stops), 2);
        assert_eq!(held_back("é", &["éa".to_string()]), 2);
    }
}
