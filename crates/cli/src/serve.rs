//! `kvsplit-mlx serve`: the OpenAI-compatible server (`crates/server`) over the model and K/V
//! flags of `generate`, which become the server's defaults.

use crate::flag_values::parse_size;
use crate::kv_args::KvArgs;
use crate::model_args::{compute_dtype, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use models::engine::Engine;
use models::sample::SamplerSettings;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// K/V setting of requests that do not send a `kv` field (every KV flag of `generate`).
    #[command(flatten)]
    pub kv: KvArgs,
    /// Address to listen on (loopback by default: the server has no authentication).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Tokens to generate when a request sets neither `max_tokens` nor `max_completion_tokens`.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Largest chunk a prompt is prefilled in.
    #[arg(long, default_value_t = 512)]
    pub prefill_step: usize,
    /// Largest prompt chunk read between two decode steps while other requests are generating
    /// (chunked prefill: a smaller chunk stalls running streams for less time, at some cost
    /// in prompt speed). `--prefill-step` applies when nothing is generating.
    #[arg(long, default_value_t = 64)]
    pub prefill_step_decoding: usize,
    /// Resident bytes that kept conversations (the prompt cache) may hold, e.g. `256M`; least
    /// recently used beyond. `0` keeps none.
    #[arg(long, default_value = "256M")]
    pub prompt_cache_bytes: String,
    /// KV bytes the server may hold in all (kept conversations plus the running requests): the
    /// budget of the KV block pool that quantized per-token settings (k8v4, k4v4, ...) live in,
    /// and of the closed-form bytes per token other settings (fp16) are counted by. A request
    /// whose cache could grow past it alone (pooled: whole 256-token blocks) is refused with a
    /// 400; one that fits alone but not beside the running ones waits; default: half the memory
    /// available at start.
    #[arg(long)]
    pub kv_budget: Option<String>,
    /// Requests that may wait for the engine; more get a 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Requests decoded together (continuous batching: one step runs the newest token of each
    /// through the model at once); more wait in the queue. 1 serves one at a time.
    #[arg(long, default_value_t = 8)]
    pub decode_concurrency: usize,
    /// Default sampling temperature (requests' `temperature` overrides; 0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Default nucleus sampling mass (requests' `top_p` overrides).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Default sampling seed (requests' `seed` overrides).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A saved cache (`kvsplit-mlx cache-prompt`) the prompt cache starts with: requests whose
    /// tokens begin with its tokens, at its K/V setting, prefill only the rest. Repeatable.
    #[arg(long)]
    pub prompt_cache_file: Vec<std::path::PathBuf>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.prefill_step == 0 || a.prefill_step_decoding == 0 || a.max_tokens == 0 || a.queue == 0 || a.decode_concurrency == 0 {
        bail!("--prefill-step, --max-tokens, --queue and --decode-concurrency must each be at least 1");
    }
    let cache = a.kv.settings()?;
    let sampler = SamplerSettings { temp: a.temp, top_p: a.top_p, seed: a.seed, ..Default::default() };
    sampler.validate()?;
    let prompt_cache_bytes = match a.prompt_cache_bytes.trim() {
        "0" => 0,
        s => parse_size(s, "--prompt-cache-bytes")?,
    };
    let kv_budget = match &a.kv_budget {
        Some(b) => parse_size(b, "--kv-budget")?,
        None => models::generate::available_memory().map_or(8 << 30, |m| m / 2),
    };
    let path = a.model.path()?;
    // Settings are checked against the config before any weight loads.
    let cfg = models::load::read_config(&path).with_context(|| format!("--model {}", path.display()))?;
    cache.check(cfg.num_hidden_layers(), cfg.head_dim()).with_context(|| format!("--kv {} on {}", a.kv.kv, path.display()))?;
    // Presets resolve against the model's identity and shape now, before the weights load.
    let id = models::load::model_id(&path).with_context(|| format!("--model {}", path.display()))?;
    let shape = models::recipe::ModelShape { id: id.hash, n_layers: cfg.num_hidden_layers(), head_dim: cfg.head_dim() };
    let resolved = a.kv.resolve_for(&a.kv.single_pick()?, &shape).with_context(|| format!("on {}", path.display()))?;
    let name = match a.model.model.as_str() {
        "default" => "default".to_string(),
        m if models::hub::looks_like_repo_id(m) && !path.exists() => m.to_string(),
        _ => path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned()),
    };
    let addr: std::net::SocketAddr = format!("{}:{}", a.host, a.port).parse().with_context(|| format!("--host {} --port {}: not an address", a.host, a.port))?;
    let config = server::ServeConfig { addr, model_name: name.clone(), cache: resolved.clone(), kv_model: Some(shape), sampler, max_tokens: a.max_tokens, prefill_step: a.prefill_step, prefill_step_decoding: a.prefill_step_decoding, prompt_cache_bytes, kv_budget, queue: a.queue, decode_concurrency: a.decode_concurrency, prompt_cache_files: a.prompt_cache_file.clone() };
    eprintln!("loading {} ...", path.display());
    let load_path = path.clone();
    let load = move || -> models::error::Result<Engine> { Ok(Engine::from_loaded(models::load::load(&load_path, compute_dtype())?)) };
    server::run(config, load, |addr| {
        // One line a script can wait for.
        println!("serving {name} on http://{addr} (kv {} [{}], prompt cache {prompt_cache_bytes} bytes, KV budget {kv_budget} bytes)", resolved.name, resolved.source);
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    eprintln!("serve: stopped");
    Ok(())
}
