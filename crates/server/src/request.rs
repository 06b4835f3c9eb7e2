//! A job checked and made concrete before it may run: model, `n`, fields, sampler, K/V
//! setting, the rendered and tokenized prompt, the context limit and the closed-form KV bytes
//! it can grow to. Everything that can be refused is refused here, before any MLX work.

use crate::api::{logprobs_asked, ApiError, CompletionRequest, Prompt};
use crate::job::{Event, Job};
use crate::{kv_field, ServeConfig};
use models::chat::{render, Message};
use models::engine::Engine;
use models::generate::CacheSettings;
use models::recipe::Resolved;
use models::sample::SamplerSettings;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// A request ready to be admitted.
pub struct Plan {
    pub tokens: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: SamplerSettings,
    /// The setting that runs, with the name and source answers report.
    pub kv: Resolved,
    /// The prompt cache's key for the setting.
    pub key: String,
    pub stops: Vec<String>,
    pub logprobs: Option<usize>,
    /// KV bytes this request's cache can reach (prompt plus `max_tokens`), by the closed form.
    pub predicted: u64,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(Some(param), message)
}

/// The prompt cache's key for a setting: entries only serve requests with the same one.
pub fn setting_key(s: &CacheSettings) -> String {
    format!("{:?}|{:?}|{:?}", s.spec, s.layers, s.max_kv_size)
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

/// Checks `job` and makes it concrete. On refusal the error goes back with the job's channel.
pub fn plan(engine: &Engine, config: &ServeConfig, job: Job) -> Result<Plan, (ApiError, UnboundedSender<Event>)> {
    let Job { req, chat, events } = job;
    match checked(engine, config, &req, chat) {
        Ok(p) => Ok(Plan {
            tokens: p.0,
            max_tokens: p.1,
            sampler: p.2,
            key: setting_key(&p.3.settings),
            kv: p.3,
            stops: p.4,
            logprobs: p.5,
            predicted: p.6,
            events,
            received: Instant::now(),
        }),
        Err(e) => Err((e, events)),
    }
}

type Checked = (Vec<u32>, usize, SamplerSettings, Resolved, Vec<String>, Option<usize>, u64);

fn checked(engine: &Engine, config: &ServeConfig, req: &CompletionRequest, chat: bool) -> Result<Checked, ApiError> {
    let model = engine.model();
    let tok = engine.tokenizer().map_err(|e| ApiError::internal(e.to_string()))?;
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
    let logprobs = logprobs_asked(req, chat)?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).map_or(config.max_tokens, |n| n as usize);
    if max_tokens == 0 {
        return Err(bad("max_tokens", "max_tokens must be at least 1"));
    }
    let sampler = sampler(req, &config.sampler)?;
    let kv = kv_field::settings(req.kv.as_ref(), &config.cache, config.kv_model.as_ref())?;
    let settings = &kv.settings;
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
        let msgs: Vec<Message> = messages.iter().enumerate().map(|(i, m)| Ok(Message { role: m.role.clone(), content: m.text(i)? })).collect::<Result<_, ApiError>>()?;
        let name = |id: Option<u32>| id.and_then(|i| tok.token(i)).unwrap_or("").to_string();
        let text = render(template, &msgs, &name(tok.bos_id()), &name(tok.eos_ids().first().copied()), true).map_err(|e| bad("messages", format!("chat template: {e}")))?;
        tok.encode(&text, false)
    } else {
        match req.prompt.as_ref().ok_or_else(|| bad("prompt", "prompt is required for completions"))? {
            Prompt::Text(t) => tok.encode(t, true),
            Prompt::Texts(v) if v.len() == 1 => tok.encode(&v[0], true),
            Prompt::Tokens(ids) => {
                let vocab = tok.vocab_size();
                if let Some(bad_id) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(bad("prompt", format!("token id {bad_id} is outside the vocabulary of {vocab}")));
                }
                ids.clone()
            }
            Prompt::TokenLists(v) if v.len() == 1 => return checked(engine, config, &CompletionRequest { prompt: Some(Prompt::Tokens(v[0].clone())), ..req.clone() }, chat),
            Prompt::Texts(v) => return Err(bad("prompt", format!("{} prompts in one request: send one per request (n = 1)", v.len()))),
            Prompt::TokenLists(v) => return Err(bad("prompt", format!("{} prompts in one request: send one per request (n = 1)", v.len()))),
        }
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
    // The cache this request can grow to, from the closed form; it must fit the budget alone.
    let held = settings.max_kv_size.map_or(total, |w| w.min(total));
    // Pooled sequences take whole blocks, so the pool's count is the formula they are held to.
    let predicted = match (engine.pool(), engine.pool_format(settings)) {
        (Some(pool), Some(fmt)) => (mlx_kv::KvPool::blocks_for(held) * pool.block_bytes(&fmt)) as u64,
        _ => (settings.bytes_per_token(model) * held as f64).ceil() as u64,
    };
    if predicted > config.kv_budget {
        return Err(bad(
            "max_tokens",
            format!("this request's KV cache could reach {predicted} bytes ({held} tokens of {}), more than the server's --kv-budget of {} bytes", kv.name, config.kv_budget),
        ));
    }
    Ok((tokens, max_tokens, sampler, kv, stops, logprobs, predicted))
}
