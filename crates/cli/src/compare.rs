//! `kvsplit-mlx compare`: the quick side-by-side of a few K/V settings on one model: cache bytes
//! at a fixed depth (measured with `KvCache::bytes` after the timed run, beside the formula),
//! decode speed at that depth, and quality from the `ppl` machinery.

use crate::model_args::{load, ModelArgs};
use crate::kv_args::{KvSweepArgs, SweepDefault};
use crate::ppl::{baseline_settings, entries, given, named, options, read_text, store_for, sweep, WindowArgs};
use crate::results::markdown_table;
use anyhow::{bail, Context, Result};
use clap::Args;
use mlx_kv::CacheBytes;
use models::engine::Engine;
use models::generate::CacheSettings;
use models::sample::SamplerSettings;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Settings to compare (ratios are to the fp16 entry, which must be in the list), with the
    /// other K/V flags applied to each.
    #[command(flatten)]
    pub kv: KvSweepArgs<CompareKv>,
    /// Context depth: WikiText tokens prefilled before decode is timed; KV bytes are read
    /// after the timed run (depth plus the decoded tokens).
    #[arg(long, default_value_t = 1024)]
    pub depth: usize,
    /// Greedy decode steps timed after the prefill (a short warm-up run is excluded).
    #[arg(long, default_value_t = 32)]
    pub n: usize,
    /// Perplexity windows of --ctx tokens for ppl, KLD and top-1.
    #[arg(long, default_value_t = 2)]
    pub windows: usize,
    #[command(flatten)]
    pub window: WindowArgs,
    /// Prompt tokens per prefill chunk for the depth prompt.
    #[arg(long, default_value_t = 512)]
    pub prefill_step: usize,
    /// Directory holding wiki.test.raw (same default as `ppl`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Largest total size of the on-disk baseline store in MiB, as in `ppl` (0 disables it).
    #[arg(long, default_value_t = 1024)]
    pub baseline_cache_mb: u64,
}

/// The five settings of the quick side-by-side.
#[derive(Debug, Clone)]
pub struct CompareKv;
impl SweepDefault for CompareKv {
    const KV: &'static str = "fp16,k8v8,k8v4,k4v8,k4v4";
}

/// Speed and memory of one setting at the depth.
struct Speed {
    /// Tokens in the cache when `measured` was read: the depth plus the decoded tokens.
    cached: usize,
    formula_bytes: f64,
    measured: CacheBytes,
    prefill_tps: f64,
    decode_tps: f64,
}

fn measure(engine: &Engine, prompt: &[u32], settings: &CacheSettings, a: &CompareArgs) -> Result<Speed> {
    let model = engine.model();
    let greedy = || SamplerSettings { temp: 0.0, ..Default::default() };
    // Warm-up (allocator, first-use paths), not measured. No stop token: every setting decodes
    // the same number of steps.
    engine.sequence(settings, greedy(), a.prefill_step)?.generate(&prompt[..prompt.len().min(16)], 4, &[], |_| true)?;
    // generation_tps counts the steps after the first token (which the prefill yields).
    let stats = engine.sequence(settings, greedy(), a.prefill_step)?.generate(prompt, a.n + 1, &[], |_| true)?;
    // The last sampled token is never fed back, so the cache holds one token fewer.
    let cached = stats.prompt_tokens + stats.generation_tokens.saturating_sub(1);
    Ok(Speed {
        cached,
        formula_bytes: settings.bytes_per_token(model) * cached as f64,
        measured: stats.kv_bytes,
        prefill_tps: stats.prompt_tps(),
        decode_tps: stats.generation_tps(),
    })
}

pub fn run(a: CompareArgs) -> Result<()> {
    if a.depth == 0 || a.n == 0 || a.windows == 0 || a.prefill_step == 0 {
        bail!("--depth, --n, --windows and --prefill-step must each be at least 1");
    }
    let opts = options(&a.window, Some(a.windows))?;
    let given = given(&a.kv)?;
    let (loaded, path) = load(&a.model, &named(&given))?;
    let engine = Engine::from_loaded(loaded);
    let entries = entries(&a.kv, &engine)?;
    let Some(fp16) = entries.iter().position(|e| e.settings.spec.is_dense()) else {
        bail!("--kv: the list needs fp16, the reference of every ratio");
    };
    let model = engine.model();
    let (text, label, _) = read_text(Some("wikitext"), None, a.data_dir.as_deref())?;
    let need = a.depth.max(opts.ctx * a.windows);
    // The start of the text is enough: about 4 bytes a token, with a wide margin.
    let head: String = text.chars().take(need * 16).collect();
    let tokens = engine.tokenizer()?.encode_with(&head, true, false);
    if tokens.len() < need {
        bail!("--depth/--windows: {need} tokens needed, the text start gives {}", tokens.len());
    }
    println!("model: {} [{} backend, {:?}]", path.display(), mlx_kv::Backend::current().name(), model.dtype());
    println!("text:  {label}, first {need} tokens (CRLF -> LF)");
    println!(
        "speed: prefill {} tokens (chunks of {}), then {} greedy decode steps timed; a 16-token warm-up run first",
        a.depth, a.prefill_step, a.n
    );
    println!("quality: {}", crate::ppl::protocol(&opts, opts.n_windows(tokens.len()), tokens.len() / opts.ctx));
    let mut speeds = Vec::new();
    for e in &entries {
        eprintln!("speed: {} ...", e.name);
        speeds.push(measure(&engine, &tokens[..a.depth], &e.settings, &a).with_context(|| format!("--kv {}", e.name))?);
    }
    let base = baseline_settings(a.kv.rest.max_kv_size);
    let store = store_for(&path, &opts, &base, a.baseline_cache_mb);
    let (base_r, quality) = sweep(&engine, &tokens, &entries, &base, &opts, store.as_ref())?;
    let (f, mb) = (&speeds[fp16], |b: f64| b / 1e6);
    let rows: Vec<Vec<String>> = entries
        .iter()
        .zip(&speeds)
        .zip(&quality)
        .map(|((e, s), q)| {
            vec![
                e.name.clone(),
                format!("{:.2}", mb(s.formula_bytes)),
                format!("{:.2}", mb(s.measured.total() as f64)),
                format!("{:.3}", s.measured.total() as f64 / f.measured.total() as f64),
                format!("{:.2}", s.decode_tps),
                format!("{:.2}", s.decode_tps / f.decode_tps),
                format!("{:.1}", s.prefill_tps),
                format!("{:.3} ± {:.3}", q.ppl(), q.ppl_stderr()),
                format!("{:+.2}", 100.0 * (q.ppl() / base_r.ppl() - 1.0)),
                format!("{:.5}", q.kld_mean()),
                format!("{:.2}", q.top1_agree()),
            ]
        })
        .collect();
    let header = [
        "kv",
        &format!("KV MB @{} (formula)", speeds[fp16].cached),
        "KV MB measured",
        "× fp16",
        "decode tok/s",
        "× fp16",
        "prefill tok/s",
        "ppl ± se",
        "Δppl %",
        "KLD mean",
        "top-1 %",
    ];
    print!("{}", markdown_table(&header.iter().map(|s| s.as_ref()).collect::<Vec<&str>>(), &rows));
    println!("quality over {} tokens in {} windows of {}; ratios are to fp16 (unquantized, {:?} here)", base_r.tokens(), base_r.windows, opts.ctx, model.dtype());
    Ok(())
}
