//! `kvsplit-mlx bench attention`: one layer's attention through `KvCache` on random data, no
//! model. Per K/V setting and context: one decode step (update with one token, then attend with
//! one query) and one prefill chunk (`--chunk` new tokens attending to the context and
//! themselves, causally). The context is written into the cache first, untimed; after each
//! timed call the new tokens are trimmed off again so every repeat sees the same context.

use crate::flag_values::parse_list;
use crate::kv_args::{KvSweepArgs, SweepDefault};
use crate::results::{human_bytes, markdown_table, stats, write_rows, AttentionRow, Env};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mlx_kv::{Backend, CacheOptions, KvCache, KvSpec};
use mlx_rs::transforms::eval;
use mlx_rs::Array;
use models::generate::available_memory;
use std::path::PathBuf;
use std::time::Instant;

/// The attention shapes `--preset` names.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Llama-3-8B: 32 heads, 8 KV heads, head_dim 128.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// SmolLM2: 9 heads, 3 KV heads, head_dim 64.
    Smollm2,
}

impl Preset {
    fn name(self) -> &'static str {
        match self {
            Preset::Llama3_8b => "llama3-8b",
            Preset::Smollm2 => "smollm2",
        }
    }
}

/// Every preset by default.
#[derive(Debug, Clone)]
pub struct AttentionKv;
impl SweepDefault for AttentionKv {
    const KV: &'static str = "fp16,k8v8,k8v4,k4v8,k4v4,k4v2";
}

/// Tokens written per untimed fill step (bounds the graph and the random temporaries).
const FILL_STEP: usize = 4096;

#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Architecture shape: `llama3-8b` (32 heads, 8 KV heads, head_dim 128) or `smollm2`
    /// (9/3/64). --heads/--kv-heads/--head-dim override it.
    #[arg(long, value_enum, default_value = "llama3-8b")]
    pub preset: Preset,
    /// Query heads (default: from --preset).
    #[arg(long)]
    pub heads: Option<usize>,
    /// KV heads; must divide --heads (default: from --preset).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Head dimension (default: from --preset).
    #[arg(long)]
    pub head_dim: Option<usize>,
    #[command(flatten)]
    pub kv: KvSweepArgs<AttentionKv>,
    /// Context lengths (tokens already cached), comma-separated. A context whose dense cache and
    /// prefill scores would not fit in available memory is skipped with a note.
    #[arg(long, default_value = "1024,4096,16384,65536,131072")]
    pub ctx: String,
    /// Queries in the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Timed repeats per measurement (after one warm-up); rows report median, min and max.
    #[arg(short = 'r', long, default_value_t = 3)]
    pub repeats: usize,
    /// Seed for the random queries, keys and values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory for the CSV, JSON and Markdown results.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// File stem of the results (default: bench-attention-<preset>-<UTC date and time>).
    #[arg(long)]
    pub name: Option<String>,
}

struct Shape {
    label: String,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn shape(a: &AttentionArgs) -> Result<Shape> {
    let (h, kvh, d) = match a.preset {
        Preset::Llama3_8b => (32, 8, 128),
        Preset::Smollm2 => (9, 3, 64),
    };
    let s = Shape { label: String::new(), heads: a.heads.unwrap_or(h), kv_heads: a.kv_heads.unwrap_or(kvh), head_dim: a.head_dim.unwrap_or(d) };
    if s.heads == 0 || s.kv_heads == 0 || s.head_dim == 0 {
        bail!("--heads/--kv-heads/--head-dim: must be at least 1");
    }
    if !s.heads.is_multiple_of(s.kv_heads) {
        bail!("--kv-heads: {} does not divide --heads {}", s.kv_heads, s.heads);
    }
    let custom = (s.heads, s.kv_heads, s.head_dim) != (h, kvh, d);
    let name = if custom { "custom" } else { a.preset.name() };
    Ok(Shape { label: format!("synthetic {name} h{}/kv{}/d{}", s.heads, s.kv_heads, s.head_dim), ..s })
}

fn random(shape: &[usize], seed: u64) -> Result<Array> {
    let dims: Vec<i32> = shape.iter().map(|&x| x as i32).collect();
    let key = mlx_rs::random::key(seed)?;
    let x = mlx_rs::random::normal::<f32>(&dims[..], None, None, &key)?;
    Ok(x.as_dtype(Backend::current().compute_dtype())?)
}

fn eval_with(cache: &KvCache, out: &Array) -> Result<()> {
    let mut arrays = cache.arrays();
    arrays.push(out);
    Ok(eval(arrays)?)
}

/// Times `update_and_attend` of `q`/`k`/`v` then trims the new tokens off; returns (ms, peak).
fn timed(cache: &mut KvCache, q: &Array, k: &Array, v: &Array, scale: f32) -> Result<(f64, usize)> {
    let n = k.shape()[2] as usize;
    let active = mlx_rs::memory::active_memory()?;
    mlx_rs::memory::reset_peak_memory()?;
    let t = Instant::now();
    let out = cache.update_and_attend(q, k, v, scale, None)?;
    eval_with(cache, &out)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let peak = mlx_rs::memory::peak_memory()?.max(active);
    drop(out);
    if cache.trim(n) != n {
        bail!("cache {} could not trim its {n} newest tokens", cache.spec());
    }
    Ok((ms, peak))
}

fn float_size() -> usize {
    match Backend::current().compute_dtype() {
        mlx_rs::Dtype::Float32 => 4,
        _ => 2,
    }
}

/// Measures one K/V setting at one context.
fn measure(spec: &KvSpec, s: &Shape, ctx: usize, a: &AttentionArgs) -> Result<AttentionRow> {
    let (h, kvh, d) = (s.heads, s.kv_heads, s.head_dim);
    let scale = 1.0 / (d as f32).sqrt();
    let mut cache = KvCache::new(spec.clone(), d, CacheOptions { max_size: None, max_chunk: a.chunk })?;
    // ctx-1 tokens, so that the timed decode token lands in allocated capacity (a growth copy
    // happens once per 256 tokens in real decoding, not on every step).
    let mut filled = 0;
    while filled + 1 < ctx {
        let n = FILL_STEP.min(ctx - 1 - filled);
        let seed = a.seed.wrapping_add(1000 + filled as u64);
        cache.update(&random(&[1, kvh, n, d], seed)?, &random(&[1, kvh, n, d], seed ^ 0x5555)?)?;
        cache.eval()?;
        filled += n;
    }
    let (q1, k1, v1) = (random(&[1, h, 1, d], a.seed + 1)?, random(&[1, kvh, 1, d], a.seed + 2)?, random(&[1, kvh, 1, d], a.seed + 3)?);
    timed(&mut cache, &q1, &k1, &v1, scale)?; // warm-up
    let mut decode = Vec::new();
    let mut decode_peak = 0;
    for _ in 0..a.repeats {
        let (ms, peak) = timed(&mut cache, &q1, &k1, &v1, scale)?;
        decode.push(ms);
        decode_peak = decode_peak.max(peak);
    }
    // Now ctx tokens, the context the prefill chunk sees.
    cache.update(&k1, &v1)?;
    cache.eval()?;
    let resident = cache.bytes().total();
    let l = a.chunk;
    let (qc, kc, vc) = (random(&[1, h, l, d], a.seed + 4)?, random(&[1, kvh, l, d], a.seed + 5)?, random(&[1, kvh, l, d], a.seed + 6)?);
    timed(&mut cache, &qc, &kc, &vc, scale)?; // warm-up; also grows the buffers once
    let mut prefill = Vec::new();
    let mut prefill_peak = 0;
    for _ in 0..a.repeats {
        let (ms, peak) = timed(&mut cache, &qc, &kc, &vc, scale)?;
        prefill.push(ms);
        prefill_peak = prefill_peak.max(peak);
    }
    let float_bytes = KvSpec::dense_element_bytes(Backend::current().compute_dtype());
    let (bk, bv) = spec.bytes_per_token_per_head(d, float_bytes);
    let formula = ((bk + bv) * (kvh * ctx) as f64).round() as u64;
    let (dm, dmin, dmax) = stats(&decode);
    let (pm, pmin, pmax) = stats(&prefill);
    Ok(AttentionRow {
        kind: "attention".into(),
        model: s.label.clone(),
        kv: spec.to_string(),
        depth: ctx,
        heads: h,
        kv_heads: kvh,
        head_dim: d,
        chunk: l,
        repeats: a.repeats,
        compute_dtype: format!("{:?}", Backend::current().compute_dtype()).to_lowercase(),
        decode_ms_median: dm,
        decode_ms_min: dmin,
        decode_ms_max: dmax,
        prefill_ms_median: pm,
        prefill_ms_min: pmin,
        prefill_ms_max: pmax,
        bytes_read: formula,
        kv_bytes_measured: resident as u64,
        kv_bytes_formula: formula,
        peak_memory: decode_peak as u64,
        prefill_peak_memory: prefill_peak as u64,
        ..Default::default()
    })
}

/// Fills the `*_vs_fp16` ratios from the fp16 row of the same shape and context.
pub fn add_ratios(rows: &mut [AttentionRow]) {
    let base: Vec<AttentionRow> = rows.iter().filter(|r| r.kv == "fp16").cloned().collect();
    for r in rows.iter_mut() {
        if let Some(b) = base.iter().find(|b| b.depth == r.depth && b.model == r.model && b.chunk == r.chunk) {
            r.decode_vs_fp16 = Some(r.decode_ms_median / b.decode_ms_median);
            r.prefill_vs_fp16 = Some(r.prefill_ms_median / b.prefill_ms_median);
            r.bytes_vs_fp16 = Some(r.bytes_read as f64 / b.bytes_read as f64);
            r.prefill_peak_vs_fp16 = Some(r.prefill_peak_memory as f64 / b.prefill_peak_memory as f64);
        }
    }
}

pub fn attention_table(rows: &[AttentionRow]) -> String {
    let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
    let header = ["kv", "ctx", "decode ms", "vs fp16", "prefill ms", "vs fp16", "bytes read", "vs fp16", "resident KV", "decode peak", "prefill peak", "vs fp16"];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.kv.clone(),
                r.depth.to_string(),
                format!("{:.2} [{:.2}–{:.2}]", r.decode_ms_median, r.decode_ms_min, r.decode_ms_max),
                x(r.decode_vs_fp16),
                format!("{:.1} [{:.1}–{:.1}]", r.prefill_ms_median, r.prefill_ms_min, r.prefill_ms_max),
                x(r.prefill_vs_fp16),
                human_bytes(r.bytes_read as f64),
                x(r.bytes_vs_fp16),
                human_bytes(r.kv_bytes_measured as f64),
                human_bytes(r.peak_memory as f64),
                human_bytes(r.prefill_peak_memory as f64),
                x(r.prefill_peak_vs_fp16),
            ]
        })
        .collect();
    markdown_table(&header, &body)
}

pub fn run(a: AttentionArgs) -> Result<()> {
    let s = shape(&a)?;
    let ctxs = parse_list(&a.ctx, "--ctx")?;
    if ctxs.contains(&0) {
        bail!("--ctx: contexts must be at least 1 token");
    }
    if a.chunk == 0 || a.repeats == 0 {
        bail!("--chunk and --repeats: must be at least 1");
    }
    // One layer, no model: the flags that shape a whole model's caches have nothing to act on.
    if !a.kv.rest.kv_layers.is_empty() || a.kv.rest.max_kv_size.is_some() {
        bail!("--kv-layers and --max-kv-size: bench attention times one layer of an unbounded cache; leave them out");
    }
    let specs: Vec<KvSpec> = a
        .kv
        .specs()?
        .into_iter()
        .map(|(kv, spec)| {
            spec.validate(s.head_dim).with_context(|| format!("--kv {kv} with --head-dim {}", s.head_dim))?;
            Ok(spec)
        })
        .collect::<Result<_>>()?;
    let float_bytes = float_size();
    let avail = available_memory();
    let mut plan = Vec::new();
    for &ctx in &ctxs {
        // Dense K and V for ctx+chunk tokens (with the 256-token growth slack, held twice while a
        // buffer grows) plus one chunk's full score matrix, which MLX's dense CPU path materialises.
        let kv = 2.0 * ((ctx + a.chunk + 256) * s.kv_heads * s.head_dim * float_bytes) as f64;
        let scores = (s.heads * a.chunk * (ctx + a.chunk) * float_bytes) as f64;
        let need = 2.0 * kv + 2.0 * scores;
        if avail.is_some_and(|m| need > m as f64) {
            println!("note: skipping context {ctx}: about {} needed, {} available", human_bytes(need), human_bytes(avail.unwrap_or(0) as f64));
            continue;
        }
        plan.push(ctx);
    }
    let env = Env::detect();
    let stem = a.name.clone().unwrap_or_else(|| format!("bench-attention-{}-{}", a.preset.name(), env.date.replace([':', '-'], "").trim_end_matches('Z')));
    let bar = ProgressBar::new((plan.len() * specs.len()) as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")?);
    let mut rows = Vec::new();
    for &ctx in &plan {
        for spec in &specs {
            bar.set_message(format!("{spec} ctx {ctx}"));
            let mut r = measure(spec, &s, ctx, &a)?;
            mlx_rs::memory::clear_cache()?;
            (r.machine, r.backend, r.device, r.mlx_version, r.engine, r.commit, r.date) =
                (env.machine.clone(), env.backend.clone(), env.device.clone(), env.mlx_version.clone(), env.engine.clone(), env.commit.clone(), env.date.clone());
            rows.push(r);
            bar.inc(1);
        }
        // Written after every context so a run stopped early keeps what it measured.
        add_ratios(&mut rows);
        write_rows(&a.out, &stem, &rows)?;
    }
    bar.finish_and_clear();
    let table = attention_table(&rows);
    let note = format!(
        "{}, backend {} ({}), MLX {}, machine {}, commit {}, {}; engine options: {}. Median [min–max] of {} repeats after one warm-up; \
         prefill = {} queries. On {} the `fp16` (dense) cache is stored in the compute dtype {}, not float16.",
        s.label, env.backend, env.device, env.mlx_version, env.machine, env.commit, env.date, env.engine, a.repeats, a.chunk, env.backend,
        rows.first().map_or("?", |r| r.compute_dtype.as_str())
    );
    println!("{note}\n\n{table}");
    let md = a.out.join(format!("{stem}.md"));
    std::fs::write(&md, format!("# Attention benchmark\n\n{note}\n\n{table}")).with_context(|| format!("writing {}", md.display()))?;
    eprintln!("wrote {}/{stem}.{{csv,json,md}}", a.out.display());
    Ok(())
}
