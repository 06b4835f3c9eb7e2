//! `kvsplit-mlx cache-prompt`: prefill a long prompt once and save its KV cache, quantized as
//! stored, for `generate --prompt-cache-file` to continue from (mlx-lm's `cache_prompt`).

use crate::kv_args::KvArgs;
use crate::model_args::{load, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use models::engine::Engine;
use models::sample::SamplerSettings;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct CachePromptArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// The prompt to cache, read from this file (encoded with the model's BOS token); `-` reads stdin.
    #[arg(long)]
    pub prompt_file: PathBuf,
    /// Where to write the cache (a safetensors file; replaced if it exists).
    #[arg(long)]
    pub out: PathBuf,
    /// Prompt tokens per prefill chunk. A later `generate --prompt-cache-file` gives the same
    /// tokens as a one-shot `generate` when both use this step and the cached prompt's length is a
    /// multiple of it (or shorter than it, and the one-shot run uses that length as its step).
    #[arg(long, default_value_t = 512)]
    pub prefill_step: usize,
}

pub fn run(a: CachePromptArgs) -> Result<()> {
    if a.prefill_step == 0 {
        bail!("--prefill-step: must be at least 1");
    }
    let cache = a.kv.settings()?;
    if cache.max_kv_size.is_some() {
        bail!("--max-kv-size: a rotating cache cannot be saved; leave the flag out for cache-prompt");
    }
    let text = if a.prompt_file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("--prompt-file -: reading stdin")?
    } else {
        std::fs::read_to_string(&a.prompt_file).with_context(|| format!("--prompt-file {}", a.prompt_file.display()))?
    };
    let (loaded, _) = load(&a.model, &[(a.kv.kv.as_str(), &cache)])?;
    let engine = Engine::from_loaded(loaded);
    let resolved = a.kv.resolve(&engine)?;
    let cache = resolved.settings.clone();
    let tok = engine.tokenizer()?;
    let prompt = tok.encode(&text, true);
    if prompt.is_empty() {
        bail!("--prompt-file {}: the prompt encodes to no tokens", a.prompt_file.display());
    }
    models::generate::check_context(engine.model(), &cache, prompt.len())?;
    let mut seq = engine.sequence(&cache, SamplerSettings::default(), a.prefill_step)?;
    let chunks = prompt.chunks(a.prefill_step);
    let bar = ProgressBar::new(chunks.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} chunks of {msg} tokens [{elapsed_precise}<{eta_precise}]")?);
    bar.set_message(a.prefill_step.to_string());
    let start = Instant::now();
    // One chunk per call is the chunking `Sequence::prefill` uses for the whole prompt.
    for chunk in chunks {
        seq.prefill(chunk)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    seq.save(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    let size = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!("Prompt: {} tokens, {:.3} tokens-per-sec", prompt.len(), prompt.len() as f64 / secs.max(1e-9));
    println!("Saved: {} ({:.3} MB, {} [{}]; model id {})", a.out.display(), size as f64 / 1e6, resolved.name, resolved.source, engine.model_id());
    Ok(())
}
