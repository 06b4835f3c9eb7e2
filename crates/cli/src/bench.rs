//! `kvsplit-mlx bench`: llama-bench-style whole-model throughput over K/V settings × context
//! depth, plus `bench attention` (one attention call, no model; see bench_attention.rs).
//!
//! Each row: fresh caches, `depth` tokens prefilled untimed, then a timed prefill of `n_prompt`
//! tokens (TTFT = that prefill plus the argmax of its last logits), then `n_gen` greedy decode
//! steps, each synchronised by evaluating the token it produced; decode tok/s is steps over the
//! whole loop's time. The model is loaded once and every K/V setting is warmed up first;
//! repeats run as rounds over all rows (fp16 and K8V4 samples alternate).

use crate::flag_values::{parse_list, parse_size};
use crate::kv_args::{KvSweepArgs, SweepDefault};
use crate::model_args::{load, ModelArgs};
use crate::results::{human_bytes, markdown_table, stats, write_rows, Env, ModelRow};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mlx_kv::KvCache;
use mlx_rs::ops::indexing::argmax_axis;
use mlx_rs::transforms::{async_eval, eval};
use mlx_rs::Array;
use models::engine::Engine;
use models::generate::{available_memory, CacheSettings};
use models::sample::SamplerSettings;
use models::model::LanguageModel;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCmd {
    #[command(subcommand)]
    pub sub: Option<BenchSub>,
    #[command(flatten)]
    pub args: Box<BenchArgs>,
}

#[derive(Subcommand, Debug)]
pub enum BenchSub {
    /// Time one attention call (decode step and prefill chunk) on random data, no model.
    Attention(Box<crate::bench_attention::AttentionArgs>),
}

/// How the `depth` tokens enter the cache (`--fill`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Run the model over the text.
    Prefill,
    /// Write random keys and values into every layer (speed only).
    Random,
}

/// `bench` sweeps fp16 against K8V4 unless told otherwise.
#[derive(Debug, Clone)]
pub struct BenchKv;
impl SweepDefault for BenchKv {
    const KV: &'static str = "fp16,k8v4";
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: KvSweepArgs<BenchKv>,
    /// Context depths, comma-separated: tokens already in the cache before measuring (llama-bench -d).
    #[arg(short = 'd', long, default_value = "0,1024,4096,16384")]
    pub depth: String,
    /// Prompt tokens whose prefill is timed.
    #[arg(short = 'p', long, default_value_t = 512)]
    pub n_prompt: usize,
    /// Greedy decode steps timed after the prompt.
    #[arg(short = 'n', long, default_value_t = 64)]
    pub n_gen: usize,
    /// Repeats per row; rows report median, min and max.
    #[arg(short = 'r', long, default_value_t = 3)]
    pub repeats: usize,
    /// Tokens per prefill chunk (depth and prompt alike).
    #[arg(long, default_value_t = 512)]
    pub prefill_step: usize,
    /// Text whose tokens feed the model (repeated when too short). Default: the WikiText-2 test
    /// split in the cache, as `ppl wikitext` finds it (fetched from the hub when missing).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Directory for the CSV, JSON and Markdown results.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// File stem of the results (default: bench-model-<UTC date and time>).
    #[arg(long)]
    pub name: Option<String>,
    /// Speed runs only: instead of `--model`, a model of this architecture's shapes with random
    /// weights drawn on the device (llama3.1-8b, qwen2.5-7b, tiny, and the mixtures of experts
    /// qwen3-30b-a3b and tiny-moe); token ids are synthetic.
    #[arg(long, conflicts_with = "model")]
    pub random_model: Option<String>,
    /// Storage of `--random-model` weights: f16 (the compute dtype), q4 or q8 (group 64).
    #[arg(long, default_value = "q4", requires = "random_model")]
    pub random_weights: String,
    /// How the `depth` tokens enter the cache: `prefill` runs the model over text (default);
    /// `random` writes random keys and values of the cache's shape into every layer without a
    /// forward pass (speed only: decode time does not depend on cache values, and a 32K
    /// prefill per row costs far more than the decode it precedes).
    #[arg(long, value_enum, default_value = "prefill")]
    pub fill: Fill,
    /// Memory budget (e.g. `8G`, `512M`, `16GB`): print, per K/V setting, the longest context
    /// whose KV cache plus model weights fit it (closed-form estimate, activations excluded).
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Time decode steps one at a time (build a step's graph, then evaluate it) instead of
    /// pipelined as `generate` runs them (the next step's graph is built while the device runs
    /// the current one); the build/eval split printed per row is then additive.
    #[arg(long)]
    pub sync_decode: bool,
    /// Mark the last repeat's decode steps of each row with the CUDA driver's profiler range
    /// (cuProfilerStart/Stop), for `ncu --profile-from-start off` or `nsys
    /// --capture-range=cudaProfilerApi`: the profile then holds decode steps only. GPU only.
    #[arg(long)]
    pub cuda_profile_range: bool,
    /// Sequences decoded together, comma-separated (e.g. `1,4,16`): each of B sequences holds
    /// `depth` tokens and reads its own `-p` prompt (chunks interleaved, as `serve` runs them),
    /// then `-n` decode steps run all B at once (the engine's batched decode, as `serve`'s
    /// continuous batching does). Rows report aggregate tok/s over the B sequences. B = 1
    /// measures the single-stream pipelined decode of `generate`.
    #[arg(long, default_value = "1")]
    pub batch: String,
    /// KV pool budget (e.g. `16G`): instead of the depth/batch sweep, admit sequences of
    /// `depth + n_prompt + n_gen` tokens per K/V setting (first depth only) until the budget
    /// refuses one (the block pool for quantized settings, the closed-form bytes per token for
    /// dense ones), write every admitted cache, decode `-n` steps over all of them at once, and
    /// report admitted against predicted (`bench-pool-*.json`). Fails if fewer are admitted
    /// than the formula says fit.
    #[arg(long)]
    pub pool_budget: Option<String>,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd.sub {
        Some(BenchSub::Attention(a)) => crate::bench_attention::run(*a),
        None => run_model(*cmd.args),
    }
}

/// Longest context whose KV cache fits `budget` beside `weights`; None when the weights alone
/// do not fit.
pub fn max_context_for_budget(budget: u64, weights: u64, bytes_per_token: f64) -> Option<u64> {
    if weights > budget || bytes_per_token <= 0.0 {
        return None;
    }
    Some(((budget - weights) as f64 / bytes_per_token).floor() as u64)
}

/// About `n` tokens of the text, from its start, repeated when the text is shorter.
fn text_tokens(path: &Path, tok: &models::tokenizer::Tokenizer, n: usize) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--text {}", path.display()))?;
    // ~4 bytes per token for English BPE; take 8 per token so one pass usually suffices.
    let mut end = (n * 8).min(text.len());
    while !text.is_char_boundary(end) {
        end += 1;
    }
    let ids = tok.encode(&text[..end], false);
    if ids.is_empty() {
        bail!("--text {}: encodes to no tokens", path.display());
    }
    Ok(ids.iter().copied().cycle().take(n).collect())
}

struct Sample {
    /// The first layer's attention path in the last decode step.
    decode_path: String,
    prefill_tps: f64,
    decode_tps: f64,
    ttft_ms: f64,
    kv_bytes: usize,
    peak: usize,
    /// Seconds of the decode loop spent building the step's graph (forward and argmax, before
    /// `eval`): host-side work, for telling it apart from what `eval` waits for.
    decode_build_s: f64,
    decode_s: f64,
    /// With `--host-profile`: seconds of the decode loop in the caches'
    /// `update_and_attend`, and in MLX's custom-kernel apply within it.
    layer_host_s: f64,
    apply_host_s: f64,
}

fn greedy(logits: &Array) -> Result<Array> {
    let v = *logits.shape().last().unwrap_or(&1);
    Ok(argmax_axis(logits.reshape(&[1, v])?, -1, None)?)
}


/// One measurement: depth untimed, then prompt prefill and `n_gen` decode steps timed.
#[allow(clippy::too_many_arguments)]
fn measure(engine: &Engine, settings: &CacheSettings, ids: &[u32], depth: usize, n_prompt: usize, n_gen: usize, step: usize, random_fill: bool, sync: bool, profile: bool) -> Result<Sample> {
    let model = engine.model();
    let mut seq = engine.sequence(settings, SamplerSettings::default(), step)?;
    if depth > 0 && random_fill {
        fill_random(model, seq.caches_mut(), depth)?;
    } else if depth > 0 {
        seq.prefill(&ids[..depth])?;
    }
    mlx_rs::memory::reset_peak_memory()?;
    let t0 = Instant::now();
    let logits = seq.prefill(&ids[depth..depth + n_prompt])?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut y = greedy(&logits)?;
    eval([&y])?;
    let ttft_s = t0.elapsed().as_secs_f64();
    mlx_ext::host_profile::take();
    let range = if profile { Some(crate::cuda_profile::Range::start()?) } else { None };
    let t1 = Instant::now();
    let mut decode_build_s = 0.0;
    for _ in 0..n_gen {
        let tb = Instant::now();
        let next = greedy(&seq.step(&y)?)?;
        decode_build_s += tb.elapsed().as_secs_f64();
        if sync {
            seq.eval_with(&next)?;
        } else {
            // As `generate` runs decode: queue this step, then wait for the previous one, so
            // building a step's graph overlaps the device running the step before it.
            async_eval([&next])?;
            y.eval()?;
        }
        y = next;
    }
    seq.eval_with(&y)?;
    let decode_s = t1.elapsed().as_secs_f64();
    drop(range);
    let (layer_host_s, apply_host_s) = mlx_ext::host_profile::take();
    let decode_path = match seq.attention_path() {
        Some(c) if n_gen > 0 => c.to_string(),
        _ => String::new(),
    };
    Ok(Sample {
        decode_path,
        prefill_tps: n_prompt as f64 / prefill_s.max(1e-9),
        decode_tps: if n_gen == 0 { f64::NAN } else { n_gen as f64 / decode_s.max(1e-9) },
        ttft_ms: ttft_s * 1e3,
        kv_bytes: seq.kv_bytes().total(),
        peak: mlx_rs::memory::peak_memory()?,
        decode_build_s,
        decode_s,
        layer_host_s,
        apply_host_s,
    })
}

/// B sequences at once (`--batch`): depth untimed, then every prompt read in interleaved
/// chunks and `n_gen` batched decode steps timed; tok/s are aggregates over the B sequences.
#[allow(clippy::too_many_arguments)]
fn measure_batch(engine: &Engine, settings: &CacheSettings, ids: &[u32], depth: usize, n_prompt: usize, n_gen: usize, step: usize, random_fill: bool, batch: usize) -> Result<Sample> {
    let model = engine.model();
    let mut seqs = Vec::with_capacity(batch);
    for _ in 0..batch {
        // In the engine's block pool where the spec allows, as `serve` runs them.
        let tokens = depth + n_prompt + n_gen + 1;
        let mut seq = engine.pooled_sequence(settings, SamplerSettings::default(), step, tokens)?.context("the KV pool has no room")?;
        if depth > 0 && random_fill {
            fill_random(model, seq.caches_mut(), depth)?;
            seq.assume_cached(&ids[..depth])?;
        } else if depth > 0 {
            seq.prefill(&ids[..depth])?;
        }
        seq.queue_prompt(&ids[depth..depth + n_prompt], n_gen + 1)?;
        seqs.push(seq);
    }
    mlx_rs::memory::reset_peak_memory()?;
    let t0 = Instant::now();
    // Chunks of each prompt in turn, as the server's scheduler feeds them.
    let mut reading: Vec<bool> = vec![true; batch];
    while reading.iter().any(|&r| r) {
        for (seq, r) in seqs.iter_mut().zip(reading.iter_mut()) {
            if *r && seq.prefill_some(step, None)?.is_some() {
                *r = false;
            }
        }
    }
    let prefill_s = t0.elapsed().as_secs_f64();
    mlx_ext::host_profile::take();
    let t1 = Instant::now();
    let none = vec![None; batch];
    // Pipelined as `generate` runs one sequence: step n + 1 is queued before step n is read.
    let mut refs: Vec<&mut models::engine::Sequence<'_>> = seqs.iter_mut().collect();
    models::engine::decode_steps(&mut refs, &none, n_gen, |_| {})?;
    drop(refs);
    let decode_s = t1.elapsed().as_secs_f64();
    let (layer_host_s, apply_host_s) = mlx_ext::host_profile::take();
    let decode_path = match seqs[0].attention_path() {
        Some(c) if n_gen > 0 => c.to_string(),
        _ => String::new(),
    };
    Ok(Sample {
        decode_path,
        prefill_tps: (batch * n_prompt) as f64 / prefill_s.max(1e-9),
        decode_tps: if n_gen == 0 { f64::NAN } else { (batch * n_gen) as f64 / decode_s.max(1e-9) },
        ttft_ms: prefill_s * 1e3,
        kv_bytes: seqs.iter().map(|s| s.kv_bytes().total()).sum(),
        peak: mlx_rs::memory::peak_memory()?,
        // The batched step evaluates as it goes: no separate graph-build figure.
        decode_build_s: 0.0,
        decode_s,
        layer_host_s,
        apply_host_s,
    })
}

/// Writes `depth` tokens of random keys and values into every layer's cache (`--fill random`).
/// One random chunk is reused for every write: only the cache's shape matters for speed.
fn fill_random(model: &dyn LanguageModel, caches: &mut [KvCache], depth: usize) -> Result<()> {
    // Large writes keep this fast; a rotating cache (`--max-kv-size`, or a model's sliding-window
    // layers) accepts a bounded number of tokens at once.
    let most = caches.iter().filter_map(|c| c.max_update()).min().unwrap_or(4096);
    let chunk = 4096.min(most).min(depth) as i32;
    let shape = [1, model.n_kv_heads() as i32, chunk, model.head_dim() as i32];
    let k = mlx_rs::random::normal::<f32>(&shape, None, None, None)?.as_dtype(model.dtype())?;
    let v = mlx_rs::random::normal::<f32>(&shape, None, None, None)?.as_dtype(model.dtype())?;
    eval([&k, &v])?;
    let mut done = 0;
    while done < depth {
        let n = (depth - done).min(chunk as usize) as i32;
        let (kc, vc) = if n == chunk {
            (k.clone(), v.clone())
        } else {
            use mlx_rs::ops::indexing::IndexOp;
            (k.index((.., .., 0..n, ..)), v.index((.., .., 0..n, ..)))
        };
        for c in caches.iter_mut() {
            c.update(&kc, &vc)?;
        }
        let arrays: Vec<&Array> = caches.iter().flat_map(|c| c.arrays()).collect();
        eval(arrays)?;
        done += n as usize;
    }
    Ok(())
}

/// Synthetic token ids for a model without a tokenizer (`--random-model`).
fn synthetic_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

pub fn weights_bytes(model: &dyn LanguageModel) -> u64 {
    model.arrays().iter().map(|a| a.nbytes() as u64).sum()
}

fn run_model(a: BenchArgs) -> Result<()> {
    let depths = parse_list(&a.depth, "--depth")?;
    let batches = parse_list(&a.batch, "--batch")?;
    if batches.contains(&0) {
        bail!("--batch: every batch size must be at least 1");
    }
    if a.n_prompt == 0 {
        bail!("--n-prompt: must be at least 1 (TTFT needs a prompt)");
    }
    if a.repeats == 0 {
        bail!("--repeats: must be at least 1");
    }
    if a.prefill_step == 0 {
        bail!("--prefill-step: must be at least 1");
    }
    let given: Vec<(String, CacheSettings)> = a.kv.given()?;
    let budget = a.memory_budget.as_deref().map(|b| parse_size(b, "--memory-budget")).transpose()?;
    let (engine, model_name, vocab): (Engine, String, usize) = match &a.random_model {
        Some(preset) => {
            let kind: models::random::RandomWeights = a.random_weights.parse()?;
            let vocab = models::random::vocab_size(preset)?;
            let t = Instant::now();
            let m = models::random::model(preset, kind, crate::model_args::compute_dtype(), 0)?;
            eprintln!("built random {preset} ({} weights) in {:.1} s", a.random_weights, t.elapsed().as_secs_f64());
            (Engine::from_model(m), format!("random-{preset}-{}", a.random_weights), vocab)
        }
        None => {
            let named: Vec<(&str, &CacheSettings)> = given.iter().map(|(kv, s)| (kv.as_str(), s)).collect();
            let (loaded, path) = load(&a.model, &named)?;
            let name = path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned());
            (Engine::from_loaded(loaded), name, 0)
        }
    };
    let mut engine = engine;
    let resolved = a.kv.resolve(&engine)?;
    let settings: Vec<(String, CacheSettings)> = resolved.iter().map(|r| (r.name.clone(), r.settings.clone())).collect();
    let source_of = |kv: &str| resolved.iter().find(|r| r.name == kv).map_or(String::new(), |r| r.source.clone());
    if batches.iter().any(|&b| b > 1) {
        engine.use_pool(None);
    }
    if let Some(b) = &a.pool_budget {
        let budget = parse_size(b, "--pool-budget")? as usize;
        let depth = depths[0];
        let ids = synthetic_ids(depth + a.n_prompt, vocab.max(2));
        let step = a.prefill_step;
        let fill = |seq: &mut models::engine::Sequence<'_>, depth: usize| -> Result<()> {
            if depth > 0 {
                fill_random(seq.model(), seq.caches_mut(), depth)?;
                seq.assume_cached(&ids[..depth])?;
            }
            Ok(())
        };
        return crate::bench_pool::run(&mut engine, &settings, &ids, budget, depth, a.n_prompt, a.n_gen, step, &a.out, &fill);
    }
    let model = engine.model();
    let random_fill = a.fill == Fill::Random;
    let weights = weights_bytes(model);

    if let Some(b) = budget {
        println!("Memory budget {} ({b} bytes), model weights {}: longest context whose KV cache fits (closed-form bytes/token, activations not counted):", human_bytes(b as f64), human_bytes(weights as f64));
        for (kv, s) in &settings {
            let per = s.bytes_per_token(model);
            match max_context_for_budget(b, weights, per) {
                Some(n) => {
                    let note = if n as usize > model.max_context() { format!(" (beyond the model's trained {} tokens)", model.max_context()) } else { String::new() };
                    println!("  {kv:>8}: {n} tokens at {per:.0} bytes/token{note}");
                }
                None => println!("  {kv:>8}: the weights alone exceed the budget"),
            }
        }
    }

    let max_depth = *depths.iter().max().unwrap_or(&0);
    let ids = match engine.tokenizer().ok() {
        Some(tok) => {
            let text = match &a.text {
                Some(t) => t.clone(),
                None => crate::ppl::wikitext_path(None).context("--text default (WikiText-2)")?,
            };
            text_tokens(&text, tok, max_depth + a.n_prompt)?
        }
        None => synthetic_ids(max_depth + a.n_prompt, vocab),
    };
    let avail = available_memory();
    let mut plan = Vec::new();
    for (kv, s) in &settings {
        for &d in &depths {
            for &b in &batches {
                let tokens = d + a.n_prompt + a.n_gen;
                let need = s.bytes_per_token(model) * (tokens * b) as f64;
                if avail.is_some_and(|m| need > m as f64) {
                    eprintln!("skip: {kv} at depth {d}, batch {b}: its KV caches ({}) exceed available memory", human_bytes(need));
                    continue;
                }
                if tokens > model.max_context() {
                    if b > 1 {
                        eprintln!("skip: {kv} at depth {d}, batch {b}: {tokens} tokens exceed the model's trained {}", model.max_context());
                        continue;
                    }
                    eprintln!("note: {kv} at depth {d}: {tokens} tokens exceed the model's trained {} (speed only)", model.max_context());
                }
                plan.push((kv.clone(), s.clone(), d, b));
            }
        }
    }

    // Warm-up (excluded): every K/V setting's code path once, so first-use costs stay out. On
    // a GPU that includes decoding past a key group boundary (`Engine::warm_up`): CUDA compiles
    // each custom-kernel variant at its first use, seconds each, which would otherwise land in
    // the first timed repeat.
    if a.cuda_profile_range && mlx_kv::Backend::current() != mlx_kv::Backend::Gpu {
        bail!("--cuda-profile-range marks CUDA decode steps: this run is on the CPU backend");
    }
    for (kv, s) in &settings {
        if mlx_kv::Backend::current() == mlx_kv::Backend::Gpu {
            let t = Instant::now();
            let steps = engine.warm_up(s, a.prefill_step)?;
            eprintln!("warm-up {kv}: {steps} decode steps in {:.1} s (first use of each kernel variant)", t.elapsed().as_secs_f64());
        }
        measure(&engine, s, &ids, 0, a.n_prompt.min(32), a.n_gen.min(4), a.prefill_step, false, a.sync_decode, false)?;
        for &b in batches.iter().filter(|&&b| b > 1) {
            measure_batch(&engine, s, &ids, 0, a.n_prompt.min(32), a.n_gen.min(4), a.prefill_step, false, b)?;
        }
    }
    if mlx_ext::host_profile::enabled() {
        eprintln!("host-profile: {:.3} warm-up done", mlx_ext::host_profile::unix_now());
    }
    let env = Env::detect();
    let bar = ProgressBar::new((plan.len() * a.repeats) as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} runs [{elapsed_precise}<{eta_precise}] {msg}")?);
    let mut rows = Vec::new();
    // Repeats are the outer loop, so every row's samples are spread over the whole run and a
    // drift of the machine (clocks, other load) does not fall on one K/V setting only.
    let mut all_samples: Vec<Vec<Sample>> = plan.iter().map(|_| Vec::new()).collect();
    for r in 0..a.repeats {
        for ((kv, s, depth, b), samples) in plan.iter().zip(all_samples.iter_mut()) {
            bar.set_message(format!("{kv} depth {depth} batch {b} repeat {}", r + 1));
            let t_start = mlx_ext::host_profile::unix_now();
            let sample = if *b == 1 {
                measure(&engine, s, &ids, *depth, a.n_prompt, a.n_gen, a.prefill_step, random_fill, a.sync_decode, a.cuda_profile_range && r + 1 == a.repeats)?
            } else {
                measure_batch(&engine, s, &ids, *depth, a.n_prompt, a.n_gen, a.prefill_step, random_fill, *b)?
            };
            if mlx_ext::host_profile::enabled() {
                // Each repeat on its own line, stamped like the new-launch lines, so that a slow
                // repeat can be matched with what was first built or compiled during it.
                bar.suspend(|| {
                    eprintln!(
                        "host-profile: {t_start:.3}-{:.3} repeat {} {kv} depth {depth} batch {b}: prefill {:.2} tok/s, decode {:.2} tok/s",
                        mlx_ext::host_profile::unix_now(),
                        r + 1,
                        sample.prefill_tps,
                        sample.decode_tps
                    )
                });
            }
            samples.push(sample);
            mlx_rs::memory::clear_cache()?;
            bar.inc(1);
        }
    }
    for ((kv, s, depth, b), samples) in plan.iter().zip(all_samples) {
        let (pm, pmin, pmax) = stats(&samples.iter().map(|x| x.prefill_tps).collect::<Vec<_>>());
        let (dm, dmin, dmax) = stats(&samples.iter().map(|x| x.decode_tps).collect::<Vec<_>>());
        let (ttft, _, _) = stats(&samples.iter().map(|x| x.ttft_ms).collect::<Vec<_>>());
        if a.n_gen > 0 && *b == 1 {
            // Where a decode step's time goes: graph building on the host vs waiting in `eval`
            // (pipelined, the build overlaps the device's work on the step before).
            let per = |f: fn(&Sample) -> f64| samples.iter().map(f).sum::<f64>() / (samples.len() * a.n_gen) as f64 * 1e3;
            bar.suspend(|| {
                eprintln!(
                    "decode split {kv} depth {depth} ({}): {:.3} ms/token, of which graph build {:.3} ms, waiting for the device {:.3} ms",
                    if a.sync_decode { "one step at a time" } else { "pipelined" },
                    per(|x| x.decode_s),
                    per(|x| x.decode_build_s),
                    per(|x| x.decode_s - x.decode_build_s)
                );
                if mlx_ext::host_profile::enabled() {
                    eprintln!(
                        "  host profile: update_and_attend {:.3} ms/token (custom-kernel apply {:.3} ms)",
                        per(|x| x.layer_host_s),
                        per(|x| x.apply_host_s)
                    );
                }
            });
        }
        let tokens = (depth + a.n_prompt + a.n_gen) * b;
        rows.push(ModelRow {
            kind: "model".into(),
            machine: env.machine.clone(),
            backend: env.backend.clone(),
            device: env.device.clone(),
            mlx_version: env.mlx_version.clone(),
            model: model_name.clone(),
            kv: kv.clone(),
            kv_source: source_of(kv),
            depth: *depth,
            n_prompt: a.n_prompt,
            n_gen: a.n_gen,
            repeats: a.repeats,
            prefill_tps_median: pm,
            prefill_tps_min: pmin,
            prefill_tps_max: pmax,
            decode_tps_median: dm,
            decode_tps_min: dmin,
            decode_tps_max: dmax,
            ttft_ms: ttft,
            kv_bytes_measured: samples.iter().map(|x| x.kv_bytes as u64).max().unwrap_or(0),
            kv_bytes_formula: (s.bytes_per_token(model) * tokens as f64).round() as u64,
            peak_memory: samples.iter().map(|x| x.peak as u64).max().unwrap_or(0),
            decode_path: samples.first().map_or(String::new(), |x| x.decode_path.clone()),
            engine: env.engine.clone(),
            commit: env.commit.clone(),
            date: env.date.clone(),
            batch: *b,
        });
    }
    bar.finish_and_clear();

    let table = model_table(&rows);
    print!("{table}");
    if !crate::results::writes_results() {
        return Ok(());
    }
    let stem = a.name.clone().unwrap_or_else(|| format!("bench-model-{}", env.date.replace([':', '-'], "").trim_end_matches('Z')));
    let (c, j) = write_rows(&a.out, &stem, &rows)?;
    let md = a.out.join(format!("{stem}.md"));
    let header = format!(
        "# Whole-model benchmark\n\nmodel `{model_name}`, backend {} ({}), MLX {}, machine {}, commit {}, {}; engine options: {}.\n\
         Depth tokens entered the cache by {}. Prefill tok/s: `-p` tokens after `depth` cached tokens; decode tok/s: `-n` greedy steps, each evaluated; \
         median [min–max] over {} repeats after a warm-up. KV measured = resident bytes of all layers' caches after the run \
         (allocation grows in 256-token steps); formula = closed-form bytes/token × tokens. The fp16 setting stores 16-bit floats \
         (compute dtype {:?}; the CPU narrows f32 to f16 and widens it inside its decode primitive).\n\n",
        env.backend, env.device, env.mlx_version, env.machine, env.commit, env.date, env.engine,
        if random_fill { "random keys and values written into every layer (`--fill random`, speed only)" } else { "prefill over the text" },
        a.repeats, model.dtype()
    );
    std::fs::write(&md, header + &table).with_context(|| format!("writing {}", md.display()))?;
    eprintln!("wrote {}, {}, {}", c.display(), j.display(), md.display());
    Ok(())
}

pub fn model_table(rows: &[ModelRow]) -> String {
    let header = ["kv", "batch", "depth", "n_prompt", "n_gen", "prefill tok/s", "decode tok/s", "ttft ms", "KV measured", "KV formula", "peak mem"];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.kv.clone(),
                r.batch.to_string(),
                r.depth.to_string(),
                r.n_prompt.to_string(),
                r.n_gen.to_string(),
                format!("{:.1} [{:.1}–{:.1}]", r.prefill_tps_median, r.prefill_tps_min, r.prefill_tps_max),
                format!("{:.2} [{:.2}–{:.2}]", r.decode_tps_median, r.decode_tps_min, r.decode_tps_max),
                format!("{:.0}", r.ttft_ms),
                human_bytes(r.kv_bytes_measured as f64),
                human_bytes(r.kv_bytes_formula as f64),
                human_bytes(r.peak_memory as f64),
            ]
        })
        .collect();
    markdown_table(&header, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        b: BenchArgs,
    }

    #[test]
    fn budget_is_weights_plus_whole_tokens() {
        // 1 GiB budget, 100 MiB weights, 1 KiB per token: (1024-100) MiB / 1 KiB tokens.
        let per = 1024.0;
        assert_eq!(max_context_for_budget(1 << 30, 100 << 20, per), Some((924u64 << 20) / 1024));
        // A budget one byte short of a token rounds down.
        assert_eq!(max_context_for_budget(100 + 2047, 100, per), Some(1));
        assert_eq!(max_context_for_budget(99, 100, per), None);
        assert_eq!(max_context_for_budget(100, 100, per), Some(0));
    }

    #[test]
    fn kv_lists_and_repeated_flags() {
        let t = T::try_parse_from(["x", "--kv", "fp16,k8v4", "--kv", "8,4", "-d", "0,16", "-p", "8"]).unwrap();
        assert_eq!(t.b.kv.list, vec!["fp16", "k8v4", "8,4"]);
        assert_eq!(t.b.n_prompt, 8);
        assert_eq!(parse_list(&t.b.depth, "--depth").unwrap(), vec![0, 16]);
        let d = T::try_parse_from(["x"]).unwrap();
        assert_eq!(d.b.kv.list, vec!["fp16", "k8v4"]);
        assert_eq!(d.b.kv.rest.kv_group_size, "64");
        assert!(parse_list("1,x", "--depth").unwrap_err().to_string().contains("--depth"));
    }
}
