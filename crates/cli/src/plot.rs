//! `kvsplit-mlx plot`: PNG and SVG figures from `bench`, `bench attention` and `ppl` results.
//!
//! Rows are told apart by their columns (a `ppl` column, or `kind`). Comparisons only pair rows
//! measured the same way: throughput series share model, prompt and decode lengths; perplexity
//! deltas compare against the fp16 row of the same model, context, chunk and scoring.

use crate::results::{columns, num_label, read_rows, si_bytes, AttentionRow, ModelRow, PplRow};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Result files (.csv or .json) from `bench`, `bench attention` or `ppl`.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Directory for the figures (one .png and one .svg each).
    #[arg(long, default_value = "docs/figures")]
    pub out: PathBuf,
    /// TrueType font for labels (default: DejaVu Sans or Liberation Sans from the system).
    #[arg(long)]
    pub font: Option<PathBuf>,
}

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];
const FONT: &str = "sans-serif";
/// Width and height of every figure, in pixels.
const SIZE: (u32, u32) = (1200, 560);

/// Registers the label font once per process (plotters keeps fonts in a global table).
fn register_font(path: Option<&Path>) -> Result<()> {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    let candidates: Vec<PathBuf> = match path {
        Some(p) => vec![p.to_path_buf()],
        None => FONT_PATHS.iter().map(PathBuf::from).collect(),
    };
    let found = candidates.iter().find(|p| p.is_file()).ok_or_else(|| anyhow!("--font: none of {candidates:?} exists; pass a .ttf file (Debian: fonts-dejavu-core)"))?;
    let bytes = std::fs::read(found).with_context(|| format!("--font {}", found.display()))?;
    // plotters wants 'static font data; one font per process, so leaking it is bounded.
    plotters::style::register_font(FONT, FontStyle::Normal, Box::leak(bytes.into_boxed_slice())).map_err(|_| anyhow!("--font {}: not a usable TrueType font", found.display()))?;
    let _ = DONE.set(());
    Ok(())
}

/// Bytes per token and the measured (tokens, bytes) points of one setting.
type PerToken = (f64, Vec<(f64, f64)>);
/// (min, median, max) of one metric of a row.
type Band<R> = fn(&R) -> (f64, f64, f64);

#[derive(Default)]
pub struct Data {
    pub model: Vec<ModelRow>,
    pub attention: Vec<AttentionRow>,
    pub ppl: Vec<PplRow>,
}

/// The same rows given twice (a stem's .csv and .json) are kept once.
fn push_unique<T: PartialEq>(v: &mut Vec<T>, rows: Vec<T>) {
    rows.into_iter().for_each(|r| if !v.contains(&r) { v.push(r) });
}

pub fn load(inputs: &[PathBuf]) -> Result<Data> {
    let mut d = Data::default();
    for p in inputs {
        let cols = columns(p)?;
        let has = |c: &str| cols.iter().any(|x| x == c);
        if has("ppl") {
            push_unique(&mut d.ppl, read_rows(p)?);
        } else if has("decode_tps_median") {
            push_unique(&mut d.model, read_rows(p)?);
        } else if has("decode_ms_median") {
            push_unique(&mut d.attention, read_rows(p)?);
        } else if cols.is_empty() {
            eprintln!("note: {} has no rows", p.display());
        } else {
            bail!("{}: neither bench rows (kind model/attention) nor ppl rows (no 'ppl' column)", p.display());
        }
    }
    Ok(d)
}

/// (K bits, V bits) of a kv label like `k8v4` or `k4v2-g32,32`; fp16 is (16, 16).
pub fn kv_bits(kv: &str) -> Option<(u8, u8)> {
    let base = kv.split('-').next()?;
    if !(base == "fp16" || base.starts_with('k')) {
        return None;
    }
    mlx_kv::spec::parse_bits_pair(base, "--kv").ok()
}

/// Larger (less compressed) settings first.
fn kv_order(kv: &str) -> (i32, i32, String) {
    let (k, v) = kv_bits(kv).unwrap_or((0, 0));
    (-(k as i32 + v as i32), -(k as i32), kv.to_string())
}

fn sorted_kvs<'a>(kvs: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut v: Vec<String> = kvs.map(String::from).collect();
    v.sort_by_key(|k| kv_order(k));
    v.dedup();
    v
}

fn color(kv: &str) -> RGBColor {
    const KNOWN: [&str; 6] = ["fp16", "k8v8", "k8v4", "k4v8", "k4v4", "k4v2"];
    const PALETTE: [RGBColor; 10] = [
        RGBColor(0, 0, 0),
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
        RGBColor(188, 189, 34),
    ];
    let i = KNOWN.iter().position(|k| *k == kv).unwrap_or_else(|| 6 + kv.bytes().map(usize::from).sum::<usize>() % 4);
    PALETTE[i]
}

fn legend(c: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
}

/// Axis ticks fall on round decimal numbers, so labels use powers of 1000.
fn tokens_label(x: f64) -> String {
    if x.abs() >= 1000.0 { format!("{}k", num_label(x / 1000.0)) } else { num_label(x) }
}

/// Earlier (less compressed) series are drawn wider, so a later series on the same line
/// (k8v4 and k4v8 cost the same bytes) leaves the earlier colour visible at its edges.
fn width(i: usize) -> u32 {
    (6 - i.min(4)) as u32
}

/// A padded range around the values for a log axis.
fn log_range(vals: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = vals.filter(|v| *v > 0.0 && v.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return 1.0..10.0;
    }
    lo / 1.5..hi * 1.5
}

fn lin_range(vals: impl Iterator<Item = f64>, from_zero: bool) -> std::ops::Range<f64> {
    let (lo, hi) = vals.filter(|v| v.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return 0.0..1.0;
    }
    let lo = if from_zero { lo.min(0.0) } else { lo };
    let pad = ((hi - lo) * 0.1).max(1e-6);
    (if from_zero && lo >= 0.0 { 0.0 } else { lo - pad })..hi + pad
}

/// KV bytes vs context: the closed-form line per setting (from each source's bytes/token),
/// with measured resident bytes as dots. One panel per model or attention shape.
fn kv_memory<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, d: &Data) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let root = root.titled("KV cache vs context: closed form (lines), measured resident bytes (dots)", (FONT, 18))?;
    // group -> kv -> (bytes/token, measured points)
    let mut groups: BTreeMap<String, BTreeMap<String, PerToken>> = BTreeMap::new();
    for r in &d.model {
        let t = (r.depth + r.n_prompt + r.n_gen) as f64;
        let e = groups.entry(r.model.clone()).or_default().entry(r.kv.clone()).or_insert((r.kv_bytes_formula as f64 / t, vec![]));
        e.1.push((t, r.kv_bytes_measured as f64));
    }
    for r in &d.attention {
        let e = groups.entry(format!("{} (1 layer)", r.model)).or_default().entry(r.kv.clone()).or_insert((r.kv_bytes_formula as f64 / r.depth as f64, vec![]));
        e.1.push((r.depth as f64, r.kv_bytes_measured as f64));
    }
    for r in &d.ppl {
        groups.entry(r.model.clone()).or_default().entry(r.kv.clone()).or_insert((r.kv_bytes_per_token, vec![]));
    }
    let panels = root.split_evenly((1, groups.len().clamp(1, 3)));
    for ((name, kvs), area) in groups.iter().take(3).zip(panels) {
        let xs = [1024.0, 131072.0];
        let y = log_range(kvs.values().flat_map(|(per, pts)| xs.iter().map(move |x| x * per).chain(pts.iter().map(|p| p.1))));
        let mut chart = ChartBuilder::on(&area)
            .caption(name, (FONT, 14))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(log_range(xs.into_iter().chain(kvs.values().flat_map(|v| v.1.iter().map(|p| p.0)))).log_scale(), y.log_scale())?;
        chart
            .configure_mesh()
            .x_desc("context tokens")
            .y_desc("KV bytes")
            .x_label_formatter(&|x| tokens_label(*x))
            .y_label_formatter(&|y| si_bytes(*y))
            .label_style((FONT, 13))
            .draw()?;
        for (i, kv) in sorted_kvs(kvs.keys().map(String::as_str)).into_iter().enumerate() {
            let (per, pts) = &kvs[&kv];
            let c = color(&kv);
            let line: Vec<(f64, f64)> = (10..=17).map(|p| ((1u64 << p) as f64, (1u64 << p) as f64 * per)).collect();
            chart.draw_series(LineSeries::new(line, c.stroke_width(width(i))))?.label(format!("{kv} ({per:.0} B/token)")).legend(legend(c));
            chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 4, c.filled())))?;
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE.mix(0.85)).border_style(BLACK).label_font((FONT, 13)).draw()?;
    }
    root.present()?;
    Ok(())
}

/// Prefill and decode tok/s vs depth, median with min–max bars.
fn throughput<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, d: &Data) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let key = |r: &ModelRow| format!("{} p{} n{} {}", r.model, r.n_prompt, r.n_gen, r.backend);
    let setups: Vec<String> = d.model.iter().map(key).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let panels = root.split_evenly((1, 2));
    let metrics: [(&str, Band<ModelRow>); 2] = [
        ("prefill tok/s", |r| (r.prefill_tps_min, r.prefill_tps_median, r.prefill_tps_max)),
        ("decode tok/s", |r| (r.decode_tps_min, r.decode_tps_median, r.decode_tps_max)),
    ];
    for ((title, m), area) in metrics.iter().zip(panels) {
        let x = lin_range(d.model.iter().map(|r| r.depth as f64), true);
        let y = lin_range(d.model.iter().flat_map(|r| [m(r).0, m(r).2]), true);
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("{title} vs depth"), (FONT, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x, y)?;
        chart.configure_mesh().x_desc("depth (tokens already cached)").y_desc(*title).x_label_formatter(&|x| tokens_label(*x)).label_style((FONT, 13)).draw()?;
        for setup in &setups {
            let rows: Vec<&ModelRow> = d.model.iter().filter(|r| &key(r) == setup).collect();
            for kv in sorted_kvs(rows.iter().map(|r| r.kv.as_str())) {
                let mut pts: Vec<&&ModelRow> = rows.iter().filter(|r| r.kv == kv).collect();
                pts.sort_by_key(|r| r.depth);
                let c = color(&kv);
                let label = if setups.len() > 1 { format!("{kv} ({setup})") } else { format!("{kv} ({setup})").replace(&format!(" {}", rows[0].backend), "") };
                chart.draw_series(LineSeries::new(pts.iter().map(|r| (r.depth as f64, m(r).1)), c.stroke_width(2)))?.label(label).legend(legend(c));
                chart.draw_series(pts.iter().map(|r| {
                    let (lo, mid, hi) = m(r);
                    ErrorBar::new_vertical(r.depth as f64, lo, mid, hi, c.stroke_width(2), 10)
                }))?;
            }
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).background_style(WHITE.mix(0.85)).border_style(BLACK).label_font((FONT, 13)).draw()?;
    }
    root.present()?;
    Ok(())
}

/// Attention decode-step and prefill-chunk time vs context, per setting.
fn attention_time<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, d: &Data) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let shapes: Vec<String> = d.attention.iter().map(|r| r.model.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let rows = root.split_evenly((shapes.len().clamp(1, 2), 2));
    let metrics: [(&str, Band<AttentionRow>); 2] = [
        ("decode step ms", |r| (r.decode_ms_min, r.decode_ms_median, r.decode_ms_max)),
        ("prefill chunk ms", |r| (r.prefill_ms_min, r.prefill_ms_median, r.prefill_ms_max)),
    ];
    for (i, shape) in shapes.iter().take(2).enumerate() {
        let sel: Vec<&AttentionRow> = d.attention.iter().filter(|r| &r.model == shape).collect();
        for (j, (title, m)) in metrics.iter().enumerate() {
            let x = log_range(sel.iter().map(|r| r.depth as f64));
            let y = log_range(sel.iter().flat_map(|r| [m(r).0, m(r).2]));
            let mut chart = ChartBuilder::on(&rows[i * 2 + j])
                .caption(format!("{title}: {shape}"), (FONT, 15))
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(x.log_scale(), y.log_scale())?;
            chart.configure_mesh().x_desc("context tokens").y_desc(*title).x_labels(5).x_label_formatter(&|x| tokens_label(*x)).y_label_formatter(&|y| num_label(*y)).label_style((FONT, 12)).draw()?;
            for (i, kv) in sorted_kvs(sel.iter().map(|r| r.kv.as_str())).into_iter().enumerate() {
                let mut pts: Vec<&&AttentionRow> = sel.iter().filter(|r| r.kv == kv).collect();
                pts.sort_by_key(|r| r.depth);
                let c = color(&kv);
                chart.draw_series(LineSeries::new(pts.iter().map(|r| (r.depth as f64, m(r).1)), c.stroke_width(width(i))))?.label(kv.clone()).legend(legend(c));
                chart.draw_series(pts.iter().map(|r| Circle::new((r.depth as f64, m(r).1), 3, c.filled())))?;
            }
            chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE.mix(0.85)).border_style(BLACK).label_font((FONT, 12)).draw()?;
        }
    }
    root.present()?;
    Ok(())
}

/// The ppl rows that can be compared with each other and have an fp16 baseline: the largest
/// group sharing model, ctx, chunk, scoring and backend.
pub fn comparable_ppl(rows: &[PplRow]) -> Option<(PplRow, Vec<PplRow>)> {
    let key = |r: &PplRow| (r.model.clone(), r.ctx, r.chunk, r.score_all.clone(), r.backend.clone());
    let mut groups: BTreeMap<_, Vec<PplRow>> = BTreeMap::new();
    for r in rows {
        groups.entry(key(r)).or_default().push(r.clone());
    }
    let n_groups = groups.len();
    let (_, mut best) = groups.into_iter().filter(|(_, g)| g.iter().any(|r| r.kv == "fp16")).max_by_key(|(_, g)| g.len())?;
    if n_groups > 1 {
        eprintln!("note: ppl rows come from {n_groups} different setups; plotting the largest with an fp16 baseline ({} ctx {})", best[0].model, best[0].ctx);
    }
    best.sort_by_key(|r| kv_order(&r.kv));
    let base = best.iter().find(|r| r.kv == "fp16")?.clone();
    Some((base, best))
}

/// Perplexity delta (±1 stderr of the setting's perplexity) and KLD (mean dot, p99 whisker).
fn ppl_kld<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, base: &PplRow, rows: &[PplRow]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let n = rows.len();
    let names: Vec<String> = rows.iter().map(|r| r.kv.clone()).collect();
    let panels = root.split_evenly((1, 2));
    let fmt_cat = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < n { names[i as usize].clone() } else { String::new() }
    };
    let xr = -0.5..n as f64 - 0.5;
    let deltas: Vec<(f64, f64)> = rows.iter().map(|r| (r.ppl - base.ppl, r.ppl_stderr)).collect();
    let y = lin_range(deltas.iter().flat_map(|(d, e)| [d - e, d + e]), true);
    let mut chart = ChartBuilder::on(&panels[0])
        .caption(format!("perplexity - fp16 ({:.3}), ctx {}", base.ppl, base.ctx), (FONT, 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(xr.clone(), y)?;
    chart.configure_mesh().x_labels(n).x_label_formatter(&fmt_cat).disable_x_mesh().y_desc("Δ perplexity (±1 stderr)").label_style((FONT, 13)).draw()?;
    chart.draw_series(LineSeries::new([(-0.5, 0.0), (n as f64 - 0.5, 0.0)], BLACK.mix(0.4)))?;
    chart.draw_series(rows.iter().zip(&deltas).enumerate().map(|(i, (r, (d, e)))| ErrorBar::new_vertical(i as f64, d - e, *d, d + e, color(&r.kv).stroke_width(2), 14)))?;
    chart.draw_series(rows.iter().zip(&deltas).enumerate().map(|(i, (r, (d, _)))| Circle::new((i as f64, *d), 5, color(&r.kv).filled())))?;

    let kld: Vec<(usize, &PplRow, f64, f64)> = rows.iter().enumerate().filter_map(|(i, r)| Some((i, r, r.kld_mean?, r.kld_p99.unwrap_or(r.kld_mean?)))).collect();
    let y = log_range(kld.iter().flat_map(|k| [k.2, k.3]));
    let mut chart = ChartBuilder::on(&panels[1])
        .caption("KL divergence vs fp16 logits", (FONT, 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(xr, y.log_scale())?;
    chart.configure_mesh().x_labels(n).x_label_formatter(&fmt_cat).disable_x_mesh().y_desc("KLD: mean (dot), p99 (bar top)").y_label_formatter(&|v| format!("{v:.0e}")).label_style((FONT, 13)).draw()?;
    chart.draw_series(kld.iter().filter(|k| k.2 > 0.0).map(|&(i, r, m, p)| ErrorBar::new_vertical(i as f64, m, m, p.max(m), color(&r.kv).stroke_width(2), 14)))?;
    chart.draw_series(kld.iter().filter(|k| k.2 > 0.0).map(|&(i, r, m, _)| Circle::new((i as f64, m), 5, color(&r.kv).filled())))?;
    root.present()?;
    Ok(())
}

/// K bits (rows) × V bits (columns), coloured by perplexity delta against fp16.
fn heatmap<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, base: &PplRow, rows: &[PplRow]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let cells: Vec<(u8, u8, f64)> = rows.iter().filter_map(|r| kv_bits(&r.kv).filter(|_| !r.kv.contains('-')).map(|(k, v)| (k, v, r.ppl - base.ppl))).collect();
    let mut kb: Vec<u8> = cells.iter().map(|c| c.0).collect();
    let mut vb: Vec<u8> = cells.iter().map(|c| c.1).collect();
    for b in [&mut kb, &mut vb] {
        b.sort_unstable();
        b.dedup();
    }
    let max = cells.iter().map(|c| c.2.abs()).fold(1e-9, f64::max);
    let (kb2, vb2) = (kb.clone(), vb.clone());
    let root = root.titled(&format!("Δ perplexity vs fp16 by K and V bits ({}, ctx {})", base.model, base.ctx), (FONT, 18))?;
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..vb.len() as f64 - 0.5, -0.5..kb.len() as f64 - 0.5)?;
    let lab = |b: &[u8], x: f64| {
        let i = x.round();
        if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < b.len() { format!("{}", b[i as usize]) } else { String::new() }
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(vb.len())
        .y_labels(kb.len())
        .x_label_formatter(&|x| lab(&vb2, *x))
        .y_label_formatter(&|y| lab(&kb2, *y))
        .x_desc("V bits")
        .y_desc("K bits")
        .label_style((FONT, 15))
        .draw()?;
    for &(k, v, dv) in &cells {
        let (x, y) = (vb.iter().position(|b| *b == v).unwrap_or(0) as f64, kb.iter().position(|b| *b == k).unwrap_or(0) as f64);
        // White at no change, deepening red with |Δ| (blue if quantization helped).
        let t = (dv.abs() / max).clamp(0.0, 1.0);
        let fade = (255.0 * (1.0 - 0.85 * t)) as u8;
        let fill = if dv >= 0.0 { RGBColor(255, fade, fade) } else { RGBColor(fade, fade, 255) };
        chart.draw_series([Rectangle::new([(x - 0.48, y - 0.48), (x + 0.48, y + 0.48)], fill.filled())])?;
        let style = TextStyle::from((FONT, 18).into_font()).pos(plotters::style::text_anchor::Pos::new(plotters::style::text_anchor::HPos::Center, plotters::style::text_anchor::VPos::Center));
        chart.draw_series([Text::new(format!("{dv:+.3}"), (x, y), style)])?;
    }
    root.present()?;
    Ok(())
}

/// The points (bytes, loss) that no point with as few or fewer bytes beats, by bytes.
fn pareto_front(pts: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    let mut sorted: Vec<(f64, f64)> = pts.collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut best = f64::INFINITY;
    sorted.into_iter().filter(|p| p.1 < best && { best = p.1; true }).collect()
}

/// Memory per token vs quality; the Pareto-optimal settings are joined by a line.
fn frontier<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, base: &PplRow, rows: &[PplRow]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let pts: Vec<(f64, f64, &str)> = rows.iter().map(|r| (r.kv_bytes_per_token, r.ppl - base.ppl, r.kv.as_str())).collect();
    let x = lin_range(pts.iter().map(|p| p.0), true);
    let y = lin_range(pts.iter().map(|p| p.1), true);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("memory vs quality ({}, ctx {})", base.model, base.ctx), (FONT, 18))
        .margin(16)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)?;
    chart.configure_mesh().x_desc("KV bytes per token (all layers)").y_desc("Δ perplexity vs fp16").x_label_formatter(&|v| si_bytes(*v)).label_style((FONT, 13)).draw()?;
    let front = pareto_front(pts.iter().map(|p| (p.0, p.1)));
    chart.draw_series(LineSeries::new(front, BLACK.mix(0.5).stroke_width(2)))?.label("Pareto frontier").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5).stroke_width(2)));
    for &(bx, dy, kv) in &pts {
        let c = color(kv);
        // Label offset from the dot so neither hides the other or the frontier line.
        let marker = EmptyElement::at((bx, dy)) + Circle::new((0, 0), 6, c.filled()) + Text::new(kv.to_string(), (8, -20), (FONT, 15).into_font().color(&c));
        chart.draw_series([marker])?;
    }
    chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).background_style(WHITE.mix(0.85)).border_style(BLACK).label_font((FONT, 13)).draw()?;
    root.present()?;
    Ok(())
}

/// Whether a row was measured by a peer engine (`scripts/llamacpp-kld.py` writes
/// `kv_source = "llama.cpp ..."`), not by us.
fn is_peer(r: &PplRow) -> bool {
    r.kv_source.starts_with("llama.cpp")
}

/// KLD against bytes per token, ours and the peer's, with our Pareto frontier (least KLD at
/// no more bytes): what quality per byte each engine gives.
fn kld_per_byte<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, base: &PplRow, ours: &[PplRow], peers: &[PplRow]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let pts = |rows: &[PplRow]| -> Vec<(f64, f64, String)> {
        rows.iter().filter_map(|r| Some((r.kv_bytes_per_token, r.kld_mean.filter(|k| *k > 0.0)?, r.kv.clone()))).collect()
    };
    let (mine, theirs) = (pts(ours), pts(peers));
    let x = lin_range(mine.iter().chain(&theirs).map(|p| p.0), true);
    let y = log_range(mine.iter().chain(&theirs).map(|p| p.1));
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("KLD vs KV bytes ({}, ctx {}, {} windows)", base.model, base.ctx, base.windows), (FONT, 18))
        .margin(16)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y.log_scale())?;
    chart.configure_mesh().x_desc("KV bytes per token (all layers)").y_desc("KLD vs the unquantized cache (nats)").x_label_formatter(&|v| si_bytes(*v)).label_style((FONT, 13)).draw()?;
    let front = pareto_front(mine.iter().map(|p| (p.0, p.1)));
    let blue = RGBColor(31, 119, 180);
    let red = RGBColor(214, 39, 40);
    chart.draw_series(LineSeries::new(front, blue.mix(0.6).stroke_width(2)))?.label("kvsplit-mlx frontier").legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    chart
        .draw_series(mine.iter().map(|(bx, k, kv)| EmptyElement::at((*bx, *k)) + Circle::new((0, 0), 5, blue.filled()) + Text::new(kv.clone(), (7, -16), (FONT, 12).into_font().color(&blue))))?
        .label("kvsplit-mlx")
        .legend(move |(x, y)| Circle::new((x + 10, y), 5, blue.filled()));
    let peer_name = peers.first().map_or_else(|| "peer".to_string(), |r| r.kv_source.clone());
    chart
        .draw_series(theirs.iter().map(|(bx, k, kv)| EmptyElement::at((*bx, *k)) + TriangleMarker::new((0, 0), 7, red.filled()) + Text::new(kv.clone(), (7, 4), (FONT, 12).into_font().color(&red))))?
        .label(peer_name)
        .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 7, red.filled()));
    chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).background_style(WHITE.mix(0.85)).border_style(BLACK).label_font((FONT, 13)).draw()?;
    root.present()?;
    Ok(())
}

/// "measured at commit C on D" for the rows a figure draws (every commit and the date range,
/// when rows come from several runs), so a reader can tell which engine a figure shows.
pub fn provenance<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut commits = std::collections::BTreeSet::new();
    let mut days = std::collections::BTreeSet::new();
    for (commit, date) in rows {
        commits.insert(if commit.is_empty() { "unknown" } else { commit });
        if !date.is_empty() {
            days.insert(date.get(..10).unwrap_or(date));
        }
    }
    let commits = commits.into_iter().collect::<Vec<_>>().join(", ");
    let days = match (days.first(), days.last()) {
        (Some(a), Some(b)) if a != b => format!("{a} to {b}"),
        (Some(a), _) => a.to_string(),
        _ => "an unknown date".into(),
    };
    let s = if commits.contains(',') { "s" } else { "" };
    format!("measured at commit{s} {commits} on {days}")
}

/// Height of the provenance line under every figure, in pixels.
const FOOTER: u32 = 22;

/// Writes the provenance line at the bottom of `root`; returns the area above it.
fn with_footer<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, text: &str) -> Result<DrawingArea<DB, Shift>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(SIZE.1 - FOOTER);
    bottom.draw_text(text, &(FONT, 13).into_font().color(&BLACK.mix(0.65)), (10, 3))?;
    Ok(top)
}

/// Draws one figure into `<dir>/<name>.png` and `.svg`, with `$stamp` (see [`provenance`])
/// under it.
macro_rules! render {
    ($dir:expr, $name:expr, $written:expr, $stamp:expr, $fig:ident $(, $arg:expr)*) => {{
        let stamp: String = $stamp;
        let png = $dir.join(format!("{}.png", $name));
        let area = with_footer(BitMapBackend::new(&png, SIZE).into_drawing_area(), &stamp)?;
        $fig(area $(, $arg)*).with_context(|| format!("drawing {}", png.display()))?;
        let svg = $dir.join(format!("{}.svg", $name));
        let area = with_footer(SVGBackend::new(&svg, SIZE).into_drawing_area(), &stamp)?;
        $fig(area $(, $arg)*).with_context(|| format!("drawing {}", svg.display()))?;
        $written.extend([png, svg]);
    }};
}

/// Refuses rows of one figure that ran with different engine options: their numbers are not
/// comparable. The message names each option that differs.
/// The engine options of a row that can change what its backend computes: on the CPU backend
/// the `gpu-*` options choose between CUDA kernels that never run, so rows measured there
/// before and after a GPU default changed still describe one setup.
fn options_in_effect(engine: &str, backend: &str) -> String {
    if backend != "cpu" {
        return engine.to_string();
    }
    engine.split_whitespace().filter(|kv| !kv.starts_with("gpu-")).collect::<Vec<_>>().join(" ")
}

fn same_engine<'a>(figure: &str, rows: impl Iterator<Item = (&'a str, &'a str)>) -> Result<()> {
    // Strings that differ only by a key one of them lacks, at the value it had before the
    // option existed (`EngineOptions::differences`), describe one setup.
    let engines: Vec<String> = rows.map(|(engine, backend)| options_in_effect(engine, backend)).collect();
    let mut seen: Vec<&str> = Vec::new();
    for e in engines.iter().map(String::as_str) {
        let same = |s: &&str| *s == e || (!s.is_empty() && !e.is_empty() && mlx_ext::EngineOptions::differences(s, e).is_empty());
        if !seen.iter().any(same) {
            seen.push(e);
        }
    }
    if let [first, rest @ ..] = seen.as_slice() {
        if let Some(other) = rest.first() {
            let diff = if first.is_empty() || other.is_empty() {
                vec!["engine options recorded in some rows only".to_string()]
            } else {
                mlx_ext::EngineOptions::differences(first, other)
            };
            bail!("{figure}: the rows were measured with different engine options ({}); plot them separately", diff.join(", "));
        }
    }
    Ok(())
}

/// Draws every figure the data allows; returns the files written.
pub fn draw_all(d: &Data, out: &Path, font: Option<&Path>) -> Result<Vec<PathBuf>> {
    register_font(font)?;
    std::fs::create_dir_all(out).with_context(|| format!("--out {}: cannot create the directory", out.display()))?;
    let mut written = Vec::new();
    let model = d.model.iter().map(|r| (r.commit.as_str(), r.date.as_str()));
    let attention = d.attention.iter().map(|r| (r.commit.as_str(), r.date.as_str()));
    let ppl = d.ppl.iter().map(|r| (r.commit.as_str(), r.date.as_str()));
    if !d.model.is_empty() || !d.attention.is_empty() || !d.ppl.is_empty() {
        render!(out, "kv-memory-vs-context", written, provenance(model.clone().chain(attention.clone()).chain(ppl)), kv_memory, d);
    }
    if !d.model.is_empty() {
        same_engine("throughput-vs-depth", d.model.iter().map(|r| (r.engine.as_str(), r.backend.as_str())))?;
        render!(out, "throughput-vs-depth", written, provenance(model), throughput, d);
    }
    if !d.attention.is_empty() {
        same_engine("attention-time-vs-context", d.attention.iter().map(|r| (r.engine.as_str(), r.backend.as_str())))?;
        render!(out, "attention-time-vs-context", written, provenance(attention), attention_time, d);
    }
    let (peers, own): (Vec<PplRow>, Vec<PplRow>) = d.ppl.iter().cloned().partition(is_peer);
    match comparable_ppl(&own) {
        Some((base, rows)) => {
            let same = |r: &PplRow| r.model == base.model && r.ctx == base.ctx && r.chunk == base.chunk && r.score_all == base.score_all && r.windows == base.windows;
            let peers: Vec<PplRow> = peers.into_iter().filter(same).collect();
            if !peers.is_empty() {
                let stamp = provenance(std::iter::once(&base).chain(&rows).chain(&peers).map(|r| (r.commit.as_str(), r.date.as_str())));
                render!(out, "kld-per-byte", written, stamp, kld_per_byte, &base, &rows, &peers);
            }
            same_engine("ppl-kld", rows.iter().map(|r| (r.engine.as_str(), r.backend.as_str())))?;
            let stamp = provenance(std::iter::once(&base).chain(&rows).map(|r| (r.commit.as_str(), r.date.as_str())));
            render!(out, "ppl-kld", written, stamp.clone(), ppl_kld, &base, &rows);
            render!(out, "kv-bits-heatmap", written, stamp.clone(), heatmap, &base, &rows);
            render!(out, "memory-quality-frontier", written, stamp, frontier, &base, &rows);
        }
        None if !d.ppl.is_empty() => eprintln!("note: no ppl setup has an fp16 row to compare against; quality figures skipped"),
        None => {}
    }
    Ok(written)
}

pub fn run(a: PlotArgs) -> Result<()> {
    let d = load(&a.inputs)?;
    let written = draw_all(&d, &a.out, a.font.as_deref())?;
    if written.is_empty() {
        bail!("no rows to plot in {:?}", a.inputs);
    }
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
