//! `kvsplit-mlx serve`: an OpenAI-compatible HTTP server (axum/tokio) over one [`Engine`].
//!
//! - [`api`]: the request and response bodies (OpenAI's shapes, plus the `kv` and `kv_cache`
//!   extensions) and error objects;
//! - [`kv_field`]: a request's `kv` field, with the CLI's syntax and validation;
//! - [`worker`]: the queue to the thread that owns the engine, which runs the [`scheduler`]
//!   (continuous batching: requests join and leave the running batch between steps; prompts are
//!   read in chunks between decode steps); each request is checked and tokenized by
//!   [`request`], reuses kept conversations ([`prompt_cache`]) and streams back through
//!   [`output`];
//! - [`routes`]: the HTTP side, which never touches MLX;
//! - [`metrics`]: counters for `GET /metrics` (Prometheus text).
//!
//! MLX arrays are not shared between threads here: the engine and every cache live on the worker
//! thread, and handlers talk to it through a bounded queue.

pub mod api;
pub mod job;
pub mod kv_field;
pub mod metrics;
pub mod output;
pub mod prompt_cache;
pub mod request;
pub mod routes;
pub mod scheduler;
pub mod worker;

use models::engine::Engine;
use models::sample::SamplerSettings;
use std::net::SocketAddr;
use std::sync::Arc;

/// What `serve` was started with; requests may override the per-request parts.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// The name `/v1/models` lists and requests must use (or omit).
    pub model_name: String,
    /// K/V setting of requests without a `kv` field and its name (already resolved: a recipe
    /// or the general choice where the server was started with a preset).
    pub cache: models::recipe::Resolved,
    /// The model's identity and shape, which a request's preset resolves against as `--kv`
    /// does (`None`: presets in requests run as given).
    pub kv_model: Option<models::recipe::ModelShape>,
    /// Sampling defaults of requests that do not say.
    pub sampler: SamplerSettings,
    pub max_tokens: usize,
    pub prefill_step: usize,
    /// Largest prompt chunk between decode steps while others generate.
    pub prefill_step_decoding: usize,
    /// Resident bytes kept conversations may hold (LRU beyond).
    pub prompt_cache_bytes: u64,
    /// Bytes of KV cache the server may hold in all (kept conversations plus the running ones);
    /// a request whose predicted cache does not fit alone is refused; one that does not fit
    /// beside the running ones waits for them.
    pub kv_budget: u64,
    /// Requests waiting for the engine beyond the running ones; more get 503.
    pub queue: usize,
    /// Sequences decoded together in one step (the running batch); more wait in the queue.
    pub decode_concurrency: usize,
    /// Saved caches (`kvsplit-mlx cache-prompt`) to start the prompt cache with.
    pub prompt_cache_files: Vec<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}: cannot listen: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("loading the model: {0}")]
    Load(String),
}

/// Runs the server until SIGTERM or Ctrl-C. `load` builds the engine on the worker thread (MLX
/// state stays on the thread that made it). `ready` is called with the bound address once the
/// model is loaded and the socket listens.
pub fn run(config: ServeConfig, load: impl FnOnce() -> models::error::Result<Engine> + Send + 'static, ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let metrics = Arc::new(metrics::Metrics::default());
    let (handle, engine_thread) = worker::start(config.clone(), load, metrics.clone()).map_err(ServeError::Load)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let server_handle = handle.clone();
    let result = rt.block_on(async move {
        let handle = server_handle;
        let listener = tokio::net::TcpListener::bind(config.addr).await.map_err(|e| ServeError::Bind(config.addr, e))?;
        let addr = listener.local_addr()?;
        // Installed before `ready` says we listen: a SIGTERM right after that line must not find
        // the default action (exit without cleanup) still in place.
        #[cfg(unix)]
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        #[cfg(not(unix))]
        let term = ();
        ready(addr);
        let state = routes::State { worker: handle.clone(), metrics, config: Arc::new(config) };
        axum::serve(listener, routes::router(state)).with_graceful_shutdown(shutdown_signal(handle.clone(), term)).await?;
        Ok::<(), ServeError>(())
    });
    handle.stop();
    let _ = engine_thread.join();
    result
}

/// SIGTERM or Ctrl-C: tell the worker to cancel what runs (streams end with finish_reason
/// `cancelled`), then let axum close the connections.
#[cfg(unix)]
type Term = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Term = ();

async fn shutdown_signal(worker: worker::Handle, #[allow(unused_mut)] mut term: Term) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async move {
        term.recv().await;
    };
    #[cfg(not(unix))]
    let term = {
        let _ = term;
        std::future::pending::<()>()
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("serve: shutting down (in-flight generations are cancelled)");
    worker.stop();
}
