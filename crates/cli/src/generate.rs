//! `kvsplit-mlx generate`: stream a completion through the split-precision cache.

use crate::kv_args::KvArgs;
use crate::model_args::{load, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use models::chat::{render, Message};
use models::engine::Engine;
use models::sample::SamplerSettings;
use std::io::{Read, Write};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Prompt text; `-` reads it from stdin.
    #[arg(long, default_value = "The capital of France is")]
    pub prompt: String,
    /// Read the prompt from this file instead of --prompt.
    #[arg(long)]
    pub prompt_file: Option<std::path::PathBuf>,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 100)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens less likely than min-p times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalty for tokens among the last 20 (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Start from a KV cache saved by `cache-prompt`: its tokens come first, then the prompt
    /// given here (encoded without a BOS token). The K/V setting is the file's; K/V flags left at
    /// their defaults take it, others must match it. Not with --chat or --max-kv-size.
    #[arg(long)]
    pub prompt_cache_file: Option<std::path::PathBuf>,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    pub prefill_step: usize,
    /// Apply the model's chat template to the prompt (default: plain completion).
    #[arg(long)]
    pub chat: bool,
    /// System prompt, used with --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print the summary lines after the text (`--verbose false` prints only the text).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub verbose: bool,
}

fn read_prompt(a: &GenerateArgs) -> Result<String> {
    if let Some(f) = &a.prompt_file {
        return std::fs::read_to_string(f).with_context(|| format!("--prompt-file {}", f.display()));
    }
    if a.prompt == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("--prompt -: reading stdin")?;
        return Ok(s);
    }
    Ok(a.prompt.clone())
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if a.prefill_step == 0 {
        bail!("--prefill-step: must be at least 1");
    }
    let cache = a.kv.settings()?;
    let sampler = SamplerSettings {
        temp: a.temp,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        ..Default::default()
    };
    sampler.validate()?;
    if a.chat && a.prompt_cache_file.is_some() {
        bail!("--chat cannot be combined with --prompt-cache-file: the template would wrap the cached text too");
    }
    let (loaded, path) = load(&a.model, &[(a.kv.kv.as_str(), &cache)])?;
    let engine = Engine::from_loaded(loaded);
    // Default K/V flags with a saved cache mean "whatever the file holds"; anything else is a
    // request to check, against the setting as resolved for this model.
    let given = cache.spec.to_string() != "fp16" || !cache.layers.to_string().is_empty() || cache.max_kv_size.is_some() || !a.kv.kv_recipe.is_empty();
    let resolved = a.kv.resolve(&engine)?;
    let cache = resolved.settings.clone();
    let tok = engine.tokenizer()?;
    let mut text = read_prompt(&a)?;
    if a.chat {
        let template = tok.chat_template().with_context(|| format!("--chat: {} has no chat template", path.display()))?;
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message { role: "system".into(), content: s.clone() });
        }
        msgs.push(Message { role: "user".into(), content: text });
        let name = |id: Option<u32>| id.and_then(|i| tok.token(i)).unwrap_or("").to_string();
        text = render(template, &msgs, &name(tok.bos_id()), &name(tok.eos_ids().first().copied()), true)?;
    }
    // A rendered chat template already holds its special tokens (BOS included where wanted).
    // After a cached prompt the text continues it, so it gets no BOS of its own.
    let prompt = tok.encode(&text, !a.chat && a.prompt_cache_file.is_none());
    if prompt.is_empty() {
        bail!("--prompt: the prompt encodes to no tokens");
    }
    if mlx_kv::Backend::current() == mlx_kv::Backend::Gpu {
        // First-use kernel compiles (seconds each on CUDA) before the prompt, not in the middle
        // of the streamed text; the reported speeds then exclude them, and this line shows them.
        let t = std::time::Instant::now();
        engine.warm_up(&cache, a.prefill_step)?;
        eprintln!("warm-up: {:.1} s", t.elapsed().as_secs_f64());
    }
    let mut seq = match &a.prompt_cache_file {
        None => engine.sequence(&cache, sampler, a.prefill_step)?,
        Some(file) => {
            engine
                .sequence_from_file_as(file, given.then_some(&cache), sampler, a.prefill_step)
                .with_context(|| format!("--prompt-cache-file {}", file.display()))?
        }
    };
    let from_file = seq.cached_tokens();
    let mut out = std::io::stdout().lock();
    let mut stream = tok.stream_decoder();
    let mut produced = String::new();
    let stats = seq.generate(&prompt, a.max_tokens, tok.eos_ids(), |id| {
        let piece = stream.push(id);
        produced.push_str(&piece);
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
        !a.stop.iter().any(|s| produced.contains(s.as_str()))
    })?;
    let rest = stream.finish();
    let _ = out.write_all(rest.as_bytes());
    writeln!(out)?;
    if a.verbose {
        let gb = |b: usize| b as f64 / 1e9;
        let kv = stats.kv_bytes;
        println!("==========");
        if let Some(file) = &a.prompt_cache_file {
            println!("Prompt cache: {from_file} tokens from {}", file.display());
        }
        println!("Prompt: {} tokens, {:.3} tokens-per-sec", stats.prompt_tokens, stats.prompt_tps());
        println!("Generation: {} tokens, {:.3} tokens-per-sec", stats.generation_tokens, stats.generation_tps());
        println!("Peak memory: {:.3} GB", gb(stats.peak_memory));
        println!(
            "KV cache: {:.3} MB ({}; K {:.3} MB, V {:.3} MB) [{} backend]",
            kv.total() as f64 / 1e6,
            if from_file > 0 { seq.settings().spec.to_string() } else { format!("{}, {}", resolved.name, resolved.source) },
            kv.k() as f64 / 1e6,
            kv.v() as f64 / 1e6,
            mlx_kv::Backend::current().name()
        );
        if let Some(path) = seq.attention_path() {
            println!("Attention: {path}");
        }
        if let Some(s) = models::shard::current() {
            // Every rank: its own share of the cache (stdout is rank 0's alone).
            eprintln!("rank {} of {}: KV cache {} bytes", s.rank(), s.size(), kv.total());
        }
    }
    Ok(())
}
