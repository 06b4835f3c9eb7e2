//! The engine's thread and the queue to it. Jobs arrive through a bounded queue (a full one is
//! a 503); the thread owns the engine, the kept conversations and every MLX array, and runs the
//! [`Scheduler`]. Each job is answered with events: text pieces, then `Done` (or `Error` before
//! any text).

use crate::api::ApiError;
use crate::job::Job;
use crate::metrics::Metrics;
use crate::prompt_cache::PromptCache;
use crate::scheduler::Scheduler;
use crate::ServeConfig;
use models::engine::Engine;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

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
            let mut engine = match load() {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            // Every pooled sequence, kept ones included, lives in blocks of one pool under the
            // same budget the scheduler admits by.
            engine.use_pool(Some(config.kv_budget as usize));
            let engine = engine;
            // On a GPU the default setting's kernels compile at their first use (seconds each on
            // CUDA); pay that before the first request, not inside it.
            if mlx_kv::Backend::current() == mlx_kv::Backend::Gpu {
                let t = std::time::Instant::now();
                if let Err(e) = engine.warm_up(&config.cache.settings, config.prefill_step) {
                    let _ = ready_tx.send(Err(format!("warm-up of --kv {}: {e}", config.cache.name)));
                    return;
                }
                eprintln!("serve: warmed up --kv {} in {:.1} s", config.cache.name, t.elapsed().as_secs_f64());
            }
            let mut cache: PromptCache<'_> = PromptCache::new(config.prompt_cache_bytes);
            for f in &config.prompt_cache_files {
                match engine.sequence_from_file(f, config.sampler.clone(), config.prefill_step) {
                    Ok(seq) => cache.put(crate::request::setting_key(seq.settings()), seq),
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("--prompt-cache-file {}: {e}", f.display())));
                        return;
                    }
                }
            }
            metrics.prompt_cache_bytes.store(cache.bytes(), Relaxed);
            metrics.prompt_cache_entries.store(cache.len() as u64, Relaxed);
            let _ = ready_tx.send(Ok(()));
            Scheduler::new(&engine, cache, &config, &metrics).run(&stop, rx);
        })
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((handle, thread)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the engine thread ended while loading the model".into()),
    }
}

