//! `kvsplit-mlx ppl`: perplexity, KL divergence and top-1 agreement of K/V settings against
//! the unquantized cache, over WikiText-2 or any text file.
//!
//! KLD design (exact, bounded disk): the baseline's full distributions are needed at every
//! scored token. A sweep runs window by window: the baseline window first (read from the
//! bounded on-disk store when a previous run left it, else computed and offered to the store),
//! then every setting on the same window, compared at once and dropped. So the baseline is
//! computed at most once per sweep, and memory holds one window of rows per setting.

use crate::kv_args::{KvSweepArgs, SweepDefault};
use crate::model_args::{cache_dir, load, ModelArgs};
use crate::results::{markdown_table, read_rows, write_rows, Env, PplRow};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mlx_kv::KvSpec;
use models::generate::{check_context, CacheSettings};
use models::model::LanguageModel;
use models::engine::Engine;
use models::perplexity::{fnv1a, score_window, BaselineStore, PplOptions, PplResult, FNV_OFFSET};
use std::path::{Path, PathBuf};

/// Which text a command reads (`ppl` scores it, `calibrate` measures on it).
#[derive(Args, Debug)]
pub struct TextArgs {
    /// Dataset: `wikitext` is the WikiText-2 raw test split: wiki.test.raw from --data-dir, else
    /// the cached copy, which is fetched once from the hub (Salesforce/wikitext) when missing.
    /// Omit it to use --file.
    #[arg(value_parser = ["wikitext"], required_unless_present = "file")]
    pub dataset: Option<String>,
    /// A UTF-8 text file instead of a dataset.
    #[arg(long, conflicts_with = "dataset")]
    pub file: Option<PathBuf>,
    /// Directory holding wiki.test.raw (default: $KVSPLIT_CACHE/data/wikitext-2-raw, filled by
    /// setup or from the hub).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl TextArgs {
    /// The text, its label for output lines and a file stem for result names ([`read_text`]).
    pub fn read(&self) -> Result<(String, String, String)> {
        read_text(self.dataset.as_deref(), self.file.as_deref(), self.data_dir.as_deref())
    }
}

#[derive(Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub text: TextArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: KvSweepArgs<PplKv>,
    #[command(flatten)]
    pub window: WindowArgs,
    /// Score at most this many windows, from the start of the text (default: all).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Largest total size of the on-disk baseline store ($KVSPLIT_CACHE/ppl-baseline), in MiB;
    /// 0 disables it. Windows that do not fit are recomputed, never approximated.
    #[arg(long, default_value_t = 1024)]
    pub baseline_cache_mb: u64,
    /// Directory for ppl-<model>-<ctx>.csv/.json (rows of the same setting are replaced).
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
}

/// The windowing flags, shared with `compare`.
#[derive(Args, Debug, Clone)]
pub struct WindowArgs {
    /// Tokens per window; windows do not overlap and each starts from an empty cache.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Tokens per forward call: each chunk after the first attends to the quantized cache.
    #[arg(long, default_value_t = 128)]
    pub chunk: usize,
    /// Score every token after the first of a window, not only the second half (the half
    /// llama-perplexity scores).
    #[arg(long)]
    pub score_all: bool,
}

/// `ppl` scores the unquantized cache alone unless told otherwise (KLD needs no second row).
#[derive(Debug, Clone)]
pub struct PplKv;
impl SweepDefault for PplKv {
    const KV: &'static str = "fp16";
}

/// One setting of a sweep, the name its row gets and which choice it is
/// ([`models::recipe::Resolved`]).
pub struct Entry {
    pub name: String,
    pub source: String,
    pub settings: CacheSettings,
}

/// The sweep's settings as given, under their values, for checking them against the model's
/// config before it loads.
pub fn given<D>(sweep: &KvSweepArgs<D>) -> Result<Vec<(String, CacheSettings)>> {
    sweep.given()
}

/// Borrows [`given`]'s pairs the way [`crate::model_args::load`] takes them.
pub fn named(given: &[(String, CacheSettings)]) -> Vec<(&str, &CacheSettings)> {
    given.iter().map(|(n, s)| (n.as_str(), s)).collect()
}

/// The settings the sweep runs on the loaded model.
pub fn entries<D>(sweep: &KvSweepArgs<D>, engine: &Engine) -> Result<Vec<Entry>> {
    Ok(sweep.resolve(engine)?.into_iter().map(|r| Entry { name: r.name, source: r.source, settings: r.settings }).collect())
}

/// WikiText-2's test split: `wiki.test.raw` in `--data-dir` when given, else the cached copy
/// (fetched from the hub on first use).
pub fn wikitext_path(data_dir: Option<&Path>) -> Result<PathBuf> {
    match data_dir {
        Some(d) => {
            let f = d.join("wiki.test.raw");
            if !f.is_file() {
                bail!("--data-dir {}: no wiki.test.raw there", d.display());
            }
            Ok(f)
        }
        None => Ok(models::datasets::wikitext_test(true)?),
    }
}

/// Reads the text; returns it with a description for the header. CRLF becomes LF (the file
/// shipped beside the repository has CRLF endings; the hub's text has LF), nothing else changes.
pub fn read_text(dataset: Option<&str>, file: Option<&Path>, data_dir: Option<&Path>) -> Result<(String, String, String)> {
    let (path, label, stem) = match (dataset, file) {
        (_, Some(f)) => {
            let stem = f.file_stem().map_or("text".into(), |s| s.to_string_lossy().into_owned());
            (f.to_path_buf(), format!("file {}", f.display()), stem)
        }
        _ => {
            let path = wikitext_path(data_dir)?;
            let label = format!("WikiText-2 raw test split ({}, CRLF read as LF)", path.display());
            (path, label, String::new())
        }
    };
    let flag = if file.is_some() { "--file" } else { "--data-dir" };
    let raw = std::fs::read_to_string(&path).with_context(|| format!("{flag} {}", path.display()))?;
    Ok((raw.replace("\r\n", "\n"), label, stem))
}

/// The store key: everything but the window's tokens that the baseline rows depend on.
fn baseline_key(model_path: &Path, opts: &PplOptions, base: &CacheSettings) -> String {
    let meta = std::fs::metadata(model_path).ok();
    let mtime = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let canon = model_path.canonicalize().unwrap_or_else(|_| model_path.to_path_buf());
    // The build matters too: a change in the engine (weight handling, attention) changes the
    // baseline's logits, and a stale baseline would skew every KLD.
    let exe = std::env::current_exe().ok().and_then(|p| std::fs::metadata(p).ok());
    let build = exe.map_or(String::new(), |m| format!("{}:{:?}", m.len(), m.modified().ok()));
    let desc = format!(
        "{build}|{}|{}|{}|{mtime}|{}|{:?}|{}|{}|{}|{:?}",
        mlx_ext::options::current().describe(),
        canon.display(),
        meta.map_or(0, |m| m.len()),
        mlx_kv::Backend::current().name(),
        crate::model_args::compute_dtype(),
        opts.ctx,
        opts.chunk,
        opts.score_all,
        base.max_kv_size
    );
    format!("{:016x}", fnv1a(desc.as_bytes(), FNV_OFFSET))
}

/// The reference every setting is compared to: the unquantized cache with the same window.
pub fn baseline_settings(max_kv_size: Option<usize>) -> CacheSettings {
    CacheSettings { spec: KvSpec::dense(), layers: Default::default(), max_kv_size }
}

fn is_baseline(s: &CacheSettings, base: &CacheSettings) -> bool {
    s.spec == base.spec && s.layers == base.layers && s.max_kv_size == base.max_kv_size
}

/// Scores every entry window by window against the baseline; returns the baseline's result
/// and one result per entry.
pub fn sweep(engine: &Engine, tokens: &[u32], entries: &[Entry], base: &CacheSettings, opts: &PplOptions, store: Option<&BaselineStore>) -> Result<(PplResult, Vec<PplResult>)> {
    let n = opts.n_windows(tokens.len());
    if n == 0 {
        bail!("--ctx: the text has {} tokens, fewer than one window of {}", tokens.len(), opts.ctx);
    }
    for e in entries {
        check_context(engine.model(), &e.settings, opts.ctx).with_context(|| format!("--kv {}", e.name))?;
    }
    let runs = entries.iter().filter(|e| !is_baseline(&e.settings, base)).count() + 1;
    let bar = ProgressBar::new((n * runs) as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} window runs [{elapsed_precise}<{eta_precise}] {msg}")?);
    let mut base_result = PplResult::default();
    let mut results = vec![PplResult::default(); entries.len()];
    let (mut hits, mut stored) = (0, 0);
    for w in 0..n {
        let window = opts.window(tokens, w);
        bar.set_message(format!("window {}/{n}: baseline", w + 1));
        let cached = store.and_then(|s| s.load(window, &window[opts.scored_targets()]));
        hits += usize::from(cached.is_some());
        let baseline = match cached {
            Some(b) => b,
            None => {
                let b = score_window(engine, window, base, opts)?;
                if let Some(s) = store {
                    // A full disk only costs a recomputation next time.
                    stored += usize::from(s.save(window, &b).unwrap_or(false));
                }
                b
            }
        };
        bar.inc(1);
        base_result.add(&baseline, Some(&baseline))?;
        for (e, r) in entries.iter().zip(results.iter_mut()) {
            if is_baseline(&e.settings, base) {
                r.add(&baseline, Some(&baseline))?;
                continue;
            }
            bar.set_message(format!("window {}/{n}: {}", w + 1, e.name));
            let s = score_window(engine, window, &e.settings, opts).with_context(|| format!("--kv {}", e.name))?;
            r.add(&s, Some(&baseline))?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if let Some(s) = store {
        println!("baseline store {}: {hits} of {n} windows read, {stored} written", s.dir().display());
    }
    Ok((base_result, results))
}

pub fn options(w: &WindowArgs, max_windows: Option<usize>) -> Result<PplOptions> {
    let o = PplOptions { ctx: w.ctx, chunk: w.chunk, score_all: w.score_all, max_windows };
    o.validate()?;
    Ok(o)
}

pub fn store_for(model_path: &Path, opts: &PplOptions, base: &CacheSettings, cap_mb: u64) -> Option<BaselineStore> {
    (cap_mb > 0).then(|| BaselineStore::new(&cache_dir().join("ppl-baseline"), &baseline_key(model_path, opts, base), cap_mb << 20))
}

pub fn protocol(opts: &PplOptions, n: usize, total: usize) -> String {
    let scored = opts.scored_targets();
    let which = if opts.score_all { "every token after the first" } else { "the second half (llama-perplexity)" };
    format!(
        "{n} of {total} non-overlapping windows of {} tokens, fresh cache per window, fed in chunks of {} \
         (each chunk after the first attends to the quantized cache of the earlier ones); scored: {which}, \
         {} tokens/window; log-softmax in f32; KLD = KL(baseline || setting) in nats",
        opts.ctx,
        opts.chunk,
        scored.len()
    )
}

pub fn run(a: PplArgs) -> Result<()> {
    let f = &a;
    let opts = options(&f.window, f.max_windows)?;
    let given = given(&f.kv)?;
    let base = baseline_settings(f.kv.rest.max_kv_size);
    let (text, label, file_stem) = f.text.read()?;
    let (loaded, path) = load(&f.model, &named(&given))?;
    let engine = Engine::from_loaded(loaded);
    let entries = entries(&f.kv, &engine)?;
    let model = engine.model();
    let tokenizer = engine.tokenizer()?;
    // No BOS unless the tokenizer's metadata asks for one (add_special follows it).
    let t = std::time::Instant::now();
    let tokens = tokenizer.encode_with(&text, true, false);
    let tokenize_s = t.elapsed().as_secs_f64();
    let total = tokens.len() / opts.ctx;
    let n = opts.n_windows(tokens.len());
    let bos = if tokenizer.add_bos() { "BOS prepended (tokenizer asks for it)" } else { "no BOS" };
    println!("text:     {label}: {} bytes, CRLF -> LF, no other normalization", text.len());
    println!("tokens:   {} ({bos}; special-token text not parsed; tokenized in {tokenize_s:.1} s)", tokens.len());
    println!("model:    {} [{} backend, {:?}]", path.display(), mlx_kv::Backend::current().name(), model.dtype());
    println!("protocol: {}", protocol(&opts, n, total));
    println!("baseline: unquantized cache (the fp16 row; {:?} on this backend), full distributions, exact", model.dtype());
    let store = store_for(&path, &opts, &base, f.baseline_cache_mb);
    let (base_r, results) = sweep(&engine, &tokens, &entries, &base, &opts, store.as_ref())?;
    let model_name = path.file_name().map_or(String::new(), |s| s.to_string_lossy().into_owned());
    let rows = to_rows(model, &model_name, &entries, &results, &base_r, &opts, &Env::detect());
    print_table(&rows, &base_r);
    let model_stem = path.file_stem().map_or(String::new(), |s| s.to_string_lossy().into_owned());
    let stem = if file_stem.is_empty() { format!("ppl-{model_stem}-{}", opts.ctx) } else { format!("ppl-{model_stem}-{file_stem}-{}", opts.ctx) };
    let (csv, json) = save_rows(&f.out, &stem, rows)?;
    println!("wrote {} and {}", csv.display(), json.display());
    Ok(())
}

fn to_rows(model: &dyn LanguageModel, model_name: &str, entries: &[Entry], results: &[PplResult], base: &PplResult, opts: &PplOptions, env: &Env) -> Vec<PplRow> {
    entries
        .iter()
        .zip(results)
        .map(|(e, r)| (e, r, r.paired(base)))
        .map(|(e, r, paired)| PplRow {
            model: model_name.to_string(),
            kv: e.name.clone(),
            kv_source: e.source.clone(),
            ctx: opts.ctx,
            chunk: opts.chunk,
            score_all: opts.score_all.to_string(),
            windows: r.windows,
            tokens_scored: r.tokens(),
            ppl: r.ppl(),
            ppl_stderr: r.ppl_stderr(),
            kld_mean: r.has_baseline().then(|| r.kld_mean()),
            kld_p99: r.has_baseline().then(|| r.kld_p99()),
            top1_agree: r.has_baseline().then(|| r.top1_agree()),
            delta_ppl_pct: paired.map(|p| p.delta_ppl_pct),
            delta_ppl_se_pct: paired.map(|p| p.delta_ppl_se_pct),
            kld_se: paired.map(|p| p.kld_se),
            kv_bytes_per_token: e.settings.bytes_per_token(model),
            backend: env.backend.clone(),
            mlx_version: env.mlx_version.clone(),
            engine: env.engine.clone(),
            commit: env.commit.clone(),
            date: env.date.clone(),
        })
        .collect()
}

fn print_table(rows: &[PplRow], base: &PplResult) {
    let opt = |x: Option<f64>, p: usize| x.map_or("-".into(), |v| format!("{v:.p$}"));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.kv.clone(),
                format!("{:.4} ± {:.4}", r.ppl, r.ppl_stderr),
                match (r.delta_ppl_pct, r.delta_ppl_se_pct) {
                    (Some(d), Some(se)) => format!("{d:+.3} ± {se:.3}"),
                    _ => format!("{:+.3}", 100.0 * (r.ppl / base.ppl() - 1.0)),
                },
                match (r.kld_mean, r.kld_se) {
                    (Some(k), Some(se)) => format!("{k:.6} ± {se:.6}"),
                    (k, _) => opt(k, 6),
                },
                opt(r.kld_p99, 5),
                opt(r.top1_agree, 2),
                format!("{:.0}", r.kv_bytes_per_token),
            ]
        })
        .collect();
    println!("baseline ppl {:.4} ± {:.4} over {} tokens in {} windows", base.ppl(), base.ppl_stderr(), base.tokens(), base.windows);
    print!("{}", markdown_table(&["kv", "ppl ± se", "Δppl % ± se (paired)", "KLD mean ± se", "KLD p99", "top-1 %", "KV B/token"], &table));
    println!("paired errors: the same tokens under both settings, clustered by window (a window's tokens are not independent)");
}

/// Merges into an existing file pair: a row measured the same way (model, kv, ctx, chunk,
/// scoring, windows) is replaced, others are kept.
fn save_rows(dir: &Path, stem: &str, rows: Vec<PplRow>) -> Result<(PathBuf, PathBuf)> {
    let json = dir.join(format!("{stem}.json"));
    let same = |a: &PplRow, b: &PplRow| (&a.model, &a.kv, a.ctx, a.chunk, &a.score_all, a.windows) == (&b.model, &b.kv, b.ctx, b.chunk, &b.score_all, b.windows);
    let mut all: Vec<PplRow> = if json.is_file() { read_rows(&json).with_context(|| format!("--out {}", dir.display()))? } else { Vec::new() };
    all.retain(|old| !rows.iter().any(|r| same(old, r)));
    all.extend(rows);
    write_rows(dir, stem, &all)
}
