//! `kvsplit-mlx calibrate`: a per-layer K/V recipe for one model at one byte budget.
//!
//! 1. Score calibration windows with the unquantized cache (the reference).
//! 2. For every layer and each of K and V separately, score the windows with only that tensor
//!    quantized, at each candidate setting ([`candidates`]): its KLD is the tensor's damage.
//! 3. Choose one candidate per tensor with the least summed damage within the budget
//!    ([`models::allocate`], exact multiple-choice knapsack).
//! 4. Score the chosen recipe and the plain preset on the same windows and write the recipe
//!    (JSON) with both, plus every measured damage as CSV beside it.
//!
//! Candidates are only settings our fast decode paths run (2, 3, 4, 6 and 8 bits, per-token groups,
//! with or without the Hadamard rotation), so that a recipe never costs speed for quality.
//! The calibration windows come from the end of the text unless `--start-token` says otherwise,
//! and `ppl` scores windows from its start, so the two never share a token.

use crate::model_args::{load, ModelArgs};
use crate::ppl::{TextArgs, WindowArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mlx_kv::{KeyLayout, KvSpec, LayerOverrides, QuantSpec, Rotation};
use mlx_rs::Array;
use models::allocate::{allocate, quarter_bits, Choice};
use models::engine::Engine;
use models::generate::CacheSettings;
use models::perplexity::{score_window, PplOptions, PplResult, WindowScore};
use models::recipe::{bits_per_element, Calibration, Measured, Recipe, FORMAT, FORMAT_VERSION};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The byte budget: a preset (`k8v4`, `k4v4`, `k4v2`, `8,4`) whose uniform setting's bytes
    /// the recipe may spend, or stored bits per element, K and V averaged (`6.5`), or bytes
    /// per token over all layers (`9360B`). Repeat it for one recipe per budget from the same
    /// measurements.
    #[arg(long, required_unless_present = "recipe")]
    pub budget: Vec<String>,
    /// Calibration text (by default its last windows, which `ppl` does not reach: see
    /// --start-token).
    #[command(flatten)]
    pub text: TextArgs,
    #[command(flatten)]
    pub window: WindowArgs,
    /// Calibration windows.
    #[arg(long, default_value_t = 2)]
    pub windows: usize,
    /// First token of the first calibration window (default: the last windows of the text).
    #[arg(long)]
    pub start_token: Option<usize>,
    /// Directory for the recipes (<model>-<preset or bits>.json) and the measured damages
    /// (<model>.sensitivity.csv).
    #[arg(long, default_value = "recipes")]
    pub out_dir: PathBuf,
    /// How each candidate's damage is found: `all` scores every candidate of every tensor
    /// (exact, 16-24 model runs per layer); `reference` scores three reference settings per
    /// tensor and scales their KLD by each candidate's measured reconstruction error of that
    /// tensor's real keys or values (KLD is second order in small errors), 6 runs per layer.
    #[arg(long, value_enum, default_value = "reference")]
    pub probes: Probes,
    /// First tokens each layer with per-channel keys keeps in float (`--kv-sinks` of those
    /// layers): the first token's outlier channels would otherwise set the range of its whole
    /// key group. Probes and recipes use it.
    #[arg(long, default_value_t = 0)]
    pub kv_sinks: usize,
    /// Re-measure this recipe instead of calibrating: its own calibration windows (the text must
    /// be the one it records), its layers with --kv-sinks set on those with per-channel keys;
    /// writes it to --out-dir under its own name with the new measurement and this command.
    #[arg(long, conflicts_with_all = ["budget", "start_token"])]
    pub recipe: Option<PathBuf>,
}

/// See [`CalibrateArgs::probes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Probes {
    All,
    Reference,
}

/// Which tensor of a layer a candidate quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    K,
    V,
}

/// One setting of one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cand {
    q: QuantSpec,
    rotate: bool,
    /// Keys stored less their per-channel mean ([`KeyLayout::Centered`]); keys only.
    center: bool,
    /// Key groups along tokens ([`KeyLayout::PerChannel`], KIVI); `q.group` counts tokens.
    channel: bool,
}

/// The candidates per tensor that `head_dim` allows (groups dividing it; rotation needs a power
/// of two), all widths the fast decode paths read: 8 bits (little to gain from groups or
/// rotation, so groups 64 and 128 only), 6, 4 and 3 bits at several groups with and without
/// rotation, and 2 bits (values at every group and frame; keys only rotated at small groups,
/// the only 2-bit keys that are usable at all).
fn candidates(part: Part, head_dim: usize) -> Vec<Cand> {
    let ok = |c: &Cand| (c.channel || head_dim.is_multiple_of(c.q.group)) && (!c.rotate || head_dim.is_power_of_two());
    all_candidates(part).into_iter().filter(ok).collect()
}

fn all_candidates(part: Part) -> Vec<Cand> {
    let c = |bits, group, rotate| Cand { q: QuantSpec { bits, group }, rotate, center: false, channel: false };
    let mut v = vec![c(8, 64, false), c(8, 128, false)];
    for (bits, groups) in [(6u8, &[64usize, 128][..]), (4, &[32, 64, 128]), (3, &[64, 128])] {
        for &g in groups {
            v.push(c(bits, g, false));
            v.push(c(bits, g, true));
        }
    }
    match part {
        Part::K => {
            v.extend([c(2, 32, true), c(2, 64, true)]);
            // Below 8 bits every key candidate also comes centered (8-bit steps are too fine
            // for a channel offset to matter).
            let centered: Vec<Cand> = v.iter().filter(|x| x.q.bits < 8).map(|x| Cand { center: true, ..*x }).collect();
            v.extend(centered);
            // Per-channel keys: groups of 64 or 128 tokens, either frame.
            for bits in [6u8, 4, 3, 2] {
                for g in [64, 128] {
                    for rotate in [false, true] {
                        v.push(Cand { q: QuantSpec { bits, group: g }, rotate, center: false, channel: true });
                    }
                }
            }
        }
        Part::V => {
            for g in [32, 64, 128] {
                v.push(c(2, g, false));
                v.push(c(2, g, true));
            }
        }
    }
    v
}

/// The settings `--probes reference` scores for a tensor: 4 bits at group 64 in either frame,
/// and 2 bits rotated (2-bit errors are large enough that a 4-bit reference would extrapolate
/// far outside the second-order regime); for keys also 4-bit per-channel groups of 128 tokens in
/// either frame, since a per-channel error acts on the scores unlike a per-token one of the
/// same size (Gemma's per-channel keys lose to rotation, though rotation lowers their
/// reconstruction error).
fn references(part: Part, head_dim: usize, ctx: usize) -> Vec<Cand> {
    let c = |bits, rotate| Cand { q: QuantSpec { bits, group: 64.min(head_dim) }, rotate, center: false, channel: false };
    let pc = |rotate| Cand { q: QuantSpec { bits: 4, group: 128 }, rotate, center: false, channel: true };
    let mut v = vec![c(4, false)];
    if head_dim.is_power_of_two() {
        v.extend([c(4, true), c(2, true)]);
    }
    // A group longer than a window would never leave the float tail.
    if part == Part::K && ctx >= 128 {
        v.push(pc(false));
        if head_dim.is_power_of_two() {
            v.push(pc(true));
        }
    }
    v
}

/// The reference whose KLD scales to `cand`: same layout (per-token or per-channel) and frame,
/// and the 2-bit one for rotated 2-bit per-token codes (3 bits and up scale from 4 bits: within
/// a factor of five in squared error). Centered keys scale from the uncentered reference:
/// centering changes which errors, not how they act.
fn reference_for(cand: Cand, refs: &[Cand]) -> Cand {
    let want_bits = if cand.rotate && cand.q.bits == 2 && !cand.channel { 2 } else { 4 };
    let same = |r: &&Cand| r.rotate == cand.rotate && r.channel == cand.channel;
    *refs
        .iter()
        .filter(same)
        .find(|r| r.q.bits == want_bits)
        .or_else(|| refs.iter().find(|r| r.rotate == cand.rotate && !r.channel && r.q.bits == want_bits))
        .unwrap_or(&refs[0])
}

/// Mean squared reconstruction error of `x` (`[1, H, T, D]` float) stored at `cand`, measured in
/// the frame it is stored in (the rotation is orthonormal, so the error is the same in the
/// model's). A centered candidate subtracts the mean of the first `chunk` tokens, as the cache
/// takes its center from the first chunk it is given.
fn reconstruction_mse(x: &Array, cand: Cand, h: Option<&Array>, chunk: usize) -> Result<f64> {
    use mlx_rs::ops::indexing::IndexOp;
    let x = x.as_dtype(mlx_rs::Dtype::Float32)?;
    let x = match (cand.rotate, h) {
        (true, Some(h)) => mlx_rs::ops::matmul(&x, h)?,
        _ => x,
    };
    let x = if cand.center { x.subtract(x.index((.., .., ..chunk as i32, ..)).mean_axis(2, true)?)? } else { x };
    // Per-channel groups run along tokens: quantize the transpose (whole groups only).
    let x = if cand.channel {
        let t = x.shape()[2] / cand.q.group as i32 * cand.q.group as i32;
        x.index((.., .., ..t, ..)).swap_axes(2, 3)?
    } else {
        x
    };
    let p = mlx_kv::store::Packed::quantize(&x, cand.q.group, cand.q.bits)?;
    let back = p.dequantize(cand.q.group, cand.q.bits, mlx_rs::Dtype::Float32)?;
    let e = back.subtract(&x)?.square()?.mean(None)?;
    Ok(e.item_cast::<f32>() as f64)
}

/// Every layer's keys and values (`[1, Hkv, T, D]`, float) over the windows, from runs with the
/// unquantized cache.
fn capture(engine: &Engine, windows: &[&[u32]], chunk: usize) -> Result<Vec<(Vec<Array>, Vec<Array>)>> {
    let n = engine.model().n_layers();
    let mut out: Vec<(Vec<Array>, Vec<Array>)> = vec![(Vec::new(), Vec::new()); n];
    for w in windows {
        let mut seq = engine.sequence(&CacheSettings::default(), Default::default(), chunk)?;
        for part in w.chunks(chunk) {
            let logits = seq.forward(part, true)?;
            mlx_rs::transforms::eval([&logits])?;
        }
        for (l, c) in seq.caches().iter().enumerate() {
            out[l].0.push(c.dequantized_keys()?.context("a filled cache has keys")?);
            out[l].1.push(c.dequantized_values()?.context("a filled cache has values")?);
        }
    }
    Ok(out)
}

/// A layer's setting from its key and value candidates.
fn layer_spec(k: Cand, v: Cand) -> KvSpec {
    let mut s = KvSpec::bits(k.q.bits, v.q.bits);
    s.k = k.q;
    s.v = v.q;
    s.rotation = Rotation::of(k.rotate, v.rotate);
    if k.center {
        s.key_layout = KeyLayout::Centered;
    }
    if k.channel {
        s.key_layout = KeyLayout::PerChannel;
    }
    s
}

/// The setting of a layer with one tensor at `cand` and the other unquantized.
fn probe_spec(part: Part, cand: Cand) -> KvSpec {
    let dense = Cand { q: QuantSpec { bits: 16, group: 64 }, rotate: false, center: false, channel: false };
    match part {
        Part::K => layer_spec(cand, dense),
        Part::V => layer_spec(dense, cand),
    }
}

/// Settings with layer `layer` at `spec` and every other layer unquantized.
fn probe(n_layers: usize, layer: usize, spec: KvSpec) -> CacheSettings {
    let mut specs = vec![KvSpec::dense(); n_layers];
    specs[layer] = spec;
    CacheSettings { spec: KvSpec::dense(), layers: LayerOverrides::per_layer(&specs), max_kv_size: None }
}

/// The budget in stored bits per element (K and V averaged), and the preset it came from.
fn parse_budget(text: &str, bytes_per_bit_element: f64) -> Result<(f64, String)> {
    let t = text.trim();
    if let Some(b) = t.strip_suffix('B') {
        let bytes: f64 = b.trim().parse().with_context(|| format!("--budget {text}: not a byte count"))?;
        return Ok((bytes / bytes_per_bit_element, "custom".into()));
    }
    if let Ok(bits) = t.parse::<f64>() {
        if !(2.0..=16.0).contains(&bits) {
            bail!("--budget {text}: bits per element must be between 2 and 16");
        }
        return Ok((bits, "custom".into()));
    }
    let spec = KvSpec::parse(t).with_context(|| format!("--budget {text}: not a preset, bits per element or bytes per token"))?;
    if !spec.k.is_quantized() || !spec.v.is_quantized() {
        bail!("--budget {text}: a budget preset quantizes both K and V");
    }
    Ok((bits_per_element(&spec), spec.to_string()))
}

fn score_all(engine: &Engine, windows: &[&[u32]], settings: &CacheSettings, opts: &PplOptions, base: &[WindowScore]) -> Result<PplResult> {
    let mut r = PplResult::default();
    for (w, b) in windows.iter().zip(base) {
        r.add(&score_window(engine, w, settings, opts)?, Some(b))?;
    }
    Ok(r)
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    if let Some(file) = &a.recipe {
        return remeasure(&a, file);
    }
    if a.windows == 0 {
        bail!("--windows: must be at least 1");
    }
    let opts = PplOptions { ctx: a.window.ctx, chunk: a.window.chunk, score_all: a.window.score_all, max_windows: None };
    opts.validate()?;
    let (text_bytes, label, _) = a.text.read()?;
    let (loaded, path) = load(&a.model, &[])?;
    let engine = Engine::from_loaded(loaded);
    let model = engine.model();
    let (n_layers, head_dim, heads) = (model.n_layers(), model.head_dim(), model.n_kv_heads());
    // Bytes per token of one bit per element, over K and V of every layer.
    let per_bit = (2 * n_layers * heads * head_dim) as f64 / 8.0;
    let budgets: Vec<(f64, String)> = a.budget.iter().map(|b| parse_budget(b, per_bit)).collect::<Result<_>>()?;
    let tokens = engine.tokenizer()?.encode_with(&text_bytes, true, false);
    let need = a.windows * opts.ctx;
    if tokens.len() < need {
        bail!("--windows {}: the text has {} tokens, fewer than {need}", a.windows, tokens.len());
    }
    let start = a.start_token.unwrap_or(tokens.len() - need);
    if start + need > tokens.len() {
        bail!("--start-token {start}: {need} tokens from there pass the text's end ({})", tokens.len());
    }
    let windows: Vec<&[u32]> = (0..a.windows).map(|w| &tokens[start + w * opts.ctx..start + (w + 1) * opts.ctx]).collect();
    let dense = CacheSettings::default();
    println!("model:   {} ({n_layers} layers, {heads} KV heads, head_dim {head_dim})", path.display());
    println!("text:    {label}: windows {}..{} of {} tokens", start, start + need, tokens.len());
    for (bits, preset) in &budgets {
        println!("budget:  {bits:.4} bits per element ({preset}), {:.0} bytes per token", bits * per_bit);
    }

    let base: Vec<WindowScore> = windows.iter().map(|w| score_window(&engine, w, &dense, &opts)).collect::<models::error::Result<_>>()?;
    let parts = [Part::K, Part::V];
    let refs = |p: Part| references(p, head_dim, opts.ctx);
    // A per-channel group longer than a window would never leave the float tail.
    let offered = |p: Part| -> Vec<Cand> { candidates(p, head_dim).into_iter().filter(|c| !c.channel || c.q.group <= opts.ctx).collect() };
    let probed = |p: Part| match a.probes {
        Probes::All => offered(p),
        Probes::Reference => refs(p),
    };
    let total: usize = parts.iter().map(|&p| probed(p).len()).sum::<usize>() * n_layers;
    println!("probes:  {total} model runs over {} window(s) ({:?})", a.windows, a.probes);
    let bar = ProgressBar::new(total as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} probes [{elapsed_precise}<{eta_precise}] {msg}")?);
    let captured = match a.probes {
        Probes::Reference => Some(capture(&engine, &windows, opts.chunk)?),
        Probes::All => None,
    };
    let hadamard = if head_dim.is_power_of_two() { Some(mlx_kv::rotation::hadamard(head_dim, mlx_rs::Dtype::Float32)?) } else { None };
    // items[2 * layer + part]: that tensor's candidates with their (measured or scaled) damage.
    let mut items: Vec<Vec<(Cand, Choice)>> = Vec::new();
    let mut csv = String::from("layer,tensor,bits,group,rotate,center,channel,quarter_bits,kld_mean,kld_se,measured,reconstruction_mse\n");
    let started = std::time::Instant::now();
    let mut done = 0usize;
    for layer in 0..n_layers {
        for part in parts {
            let mut measured: Vec<(Cand, f64, f64)> = Vec::new();
            for cand in probed(part) {
                bar.set_message(format!("layer {layer} {part:?} {}-bit g{}{}{}", cand.q.bits, cand.q.group, if cand.rotate { " rotated" } else { "" }, if cand.center { " centered" } else if cand.channel { " per-channel" } else { "" }));
                let r = score_all(&engine, &windows, &probe(n_layers, layer, with_sinks(model, layer, probe_spec(part, cand), a.kv_sinks)), &opts, &base).with_context(|| format!("layer {layer} {part:?}"))?;
                measured.push((cand, r.kld_mean(), kld_se(&r)));
                bar.inc(1);
                done += 1;
                if bar.is_hidden() && done.is_multiple_of((total / 20).max(1)) {
                    let el = started.elapsed().as_secs_f64();
                    eprintln!("calibrate: {done}/{total} probes, {el:.0} s, about {:.0} s left", el / done as f64 * (total - done) as f64);
                }
            }
            let mse = |c: Cand| -> Result<f64> {
                let Some(cap) = &captured else { return Ok(f64::NAN) };
                let xs = if part == Part::K { &cap[layer].0 } else { &cap[layer].1 };
                let mut sum = 0.0;
                for x in xs {
                    sum += reconstruction_mse(x, c, hadamard.as_ref(), opts.chunk)?;
                }
                Ok(sum / xs.len() as f64)
            };
            let mut item = Vec::new();
            for cand in offered(part) {
                let cost = quarter_bits(cand.q.bits, cand.q.group);
                let (damage, se, was_measured, e) = match measured.iter().find(|m| m.0 == cand) {
                    Some(&(_, k, se)) => (k, se, true, mse(cand)?),
                    None => {
                        let r = reference_for(cand, &refs(part));
                        let &(_, k_ref, _) = measured.iter().find(|m| m.0 == r).expect("references are probed");
                        let (e, e_ref) = (mse(cand)?, mse(r)?);
                        (k_ref * e / e_ref.max(f64::MIN_POSITIVE), f64::NAN, false, e)
                    }
                };
                csv.push_str(&format!("{layer},{part:?},{},{},{},{},{},{cost},{damage:.8},{se:.8},{was_measured},{e:.6e}\n", cand.q.bits, cand.q.group, cand.rotate, cand.center, cand.channel));
                item.push((cand, Choice { cost, damage }));
            }
            items.push(item);
        }
    }
    bar.finish_and_clear();

    let stem = path.file_stem().map_or_else(|| "model".into(), |f| f.to_string_lossy().into_owned());
    std::fs::create_dir_all(&a.out_dir).with_context(|| format!("--out-dir {}", a.out_dir.display()))?;
    let sens = a.out_dir.join(format!("{stem}.sensitivity.csv"));
    std::fs::File::create(&sens).and_then(|mut f| f.write_all(csv.as_bytes())).with_context(|| format!("writing {}", sens.display()))?;
    println!("wrote {}", sens.display());
    let mut dense_r = PplResult::default();
    for b in &base {
        dense_r.add(b, Some(b))?;
    }
    let choices: Vec<Vec<Choice>> = items.iter().map(|it| it.iter().map(|(_, c)| *c).collect()).collect();
    for ((budget_bits, preset), text) in budgets.into_iter().zip(&a.budget) {
        let budget_units = (budget_bits * 2.0 * 4.0 * n_layers as f64 + 1e-9).floor() as u32;
        let Some(pick) = allocate(&choices, budget_units) else {
            bail!("--budget {text}: even the cheapest candidates (2-bit) exceed it");
        };
        let chosen = |i: usize| items[i][pick[i]].0;
        let specs: Vec<KvSpec> = (0..n_layers).map(|l| with_sinks(model, l, layer_spec(chosen(2 * l), chosen(2 * l + 1)), a.kv_sinks)).collect();
        let predicted: f64 = pick.iter().zip(&items).map(|(&j, it)| it[j].1.damage).sum();
        let bits = specs.iter().map(bits_per_element).sum::<f64>() / n_layers as f64;
        println!("budget {text}: {bits:.4} bits per element chosen; summed single-tensor damage {predicted:.6}");
        for (l, s) in specs.iter().enumerate() {
            println!("  layer {l:>2}: {s}");
        }
        let recipe_settings = CacheSettings { spec: KvSpec::dense(), layers: LayerOverrides::per_layer(&specs), max_kv_size: None };
        let measured = score_all(&engine, &windows, &recipe_settings, &opts, &base)?;
        let plain_kld = match KvSpec::parse(&preset) {
            Ok(p) => Some(score_all(&engine, &windows, &CacheSettings { spec: p, ..Default::default() }, &opts, &base)?.kld_mean()),
            Err(_) => None,
        };
        let paired = measured.paired(&dense_r).context("the recipe and the reference cover the same tokens")?;
        println!(
            "  on the calibration windows: recipe KLD {:.6} ± {:.6}, Δppl {:+.3} ± {:.3} %; plain {preset} KLD {}",
            measured.kld_mean(),
            paired.kld_se,
            paired.delta_ppl_pct,
            paired.delta_ppl_se_pct,
            plain_kld.map_or("-".into(), |k| format!("{k:.6}"))
        );
        let tag = if preset == "custom" { format!("{budget_bits:.3}b") } else { preset.clone() };
        let out = a.out_dir.join(format!("{stem}-{tag}.json"));
        let recipe = Recipe {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            model_id: engine.model_id(),
            model_name: path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned()),
            preset,
            budget_bits,
            bits_per_element: bits,
            layers: specs.iter().map(|s| s.to_string()).collect(),
            calibration: Calibration {
                text: a.text.file.as_ref().map_or_else(|| "wikitext-2-raw/wiki.test.raw".into(), |f| f.display().to_string()),
                text_sha256: sha256_hex(text_bytes.as_bytes()),
                start_token: start,
                windows: a.windows,
                ctx: opts.ctx,
                chunk: opts.chunk,
            },
            measured: Measured {
                kld_mean: measured.kld_mean(),
                kld_se: paired.kld_se,
                delta_ppl_pct: paired.delta_ppl_pct,
                delta_ppl_se_pct: paired.delta_ppl_se_pct,
                predicted_kld: predicted,
                plain_kld_mean: plain_kld,
            },
            method: format!(
                "per-tensor damage with only that tensor quantized, candidates 2/3/4/6/8 bits, groups 32/64/128, with and without Hadamard \
                 rotation, keys below 8 bits also centered or per-channel (groups of 64/128 tokens{}) ({}); exact multiple-choice knapsack on the summed damage within the budget",
                match a.kv_sinks {
                    0 => String::new(),
                    n => format!(", the first {n} token(s) kept in float"),
                },
                match a.probes {
                    Probes::All => "every candidate's KLD measured",
                    Probes::Reference => {
                        "KLD measured at 4-bit g64 in both frames and 2-bit g64 rotated, and for keys 4-bit per-channel g128 in \
                         both frames, scaled to the other candidates of the same layout and frame by their reconstruction error of \
                         the tensor's real values"
                    }
                }
            ),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            created: crate::results::Env::detect().date,
        };
        recipe.save(&out).with_context(|| format!("writing {}", out.display()))?;
        println!("  wrote {}", out.display());
    }
    Ok(())
}

/// Layer `i` at `spec`, keeping `sinks` sink tokens if its keys are per channel and it has no
/// sliding window (a window's ring holds whole key groups, which sinks would break), else none.
fn with_sinks(model: &dyn models::model::LanguageModel, i: usize, spec: KvSpec, sinks: usize) -> KvSpec {
    let sinks = if spec.key_layout == KeyLayout::PerChannel && model.layer_window(i).is_none() { sinks } else { 0 };
    KvSpec { sinks, ..spec }
}

/// `calibrate --recipe FILE`: the recipe's layers (sinks set by --kv-sinks on per-channel key
/// layers) scored again on the windows it records, and written with that measurement. The
/// knapsack's prediction stays as calibrated.
fn remeasure(a: &CalibrateArgs, file: &std::path::Path) -> Result<()> {
    let what = || format!("--recipe {}", file.display());
    let recipe = Recipe::load(file).with_context(what)?;
    let c = &recipe.calibration;
    let (text_bytes, label, _) = a.text.read()?;
    if sha256_hex(text_bytes.as_bytes()) != c.text_sha256 {
        bail!("--recipe {}: it was calibrated on {} (sha256 {}), not on {label}", file.display(), c.text, c.text_sha256);
    }
    let opts = PplOptions { ctx: c.ctx, chunk: c.chunk, score_all: a.window.score_all, max_windows: None };
    opts.validate()?;
    let (loaded, path) = load(&a.model, &[])?;
    let engine = Engine::from_loaded(loaded);
    let n_layers = engine.model().n_layers();
    recipe.overrides_for(&engine.model_id(), n_layers, file).with_context(what)?;
    let specs: Vec<KvSpec> = recipe
        .specs()
        .with_context(what)?
        .into_iter()
        .enumerate()
        .map(|(i, s)| with_sinks(engine.model(), i, s, a.kv_sinks))
        .collect();
    let tokens = engine.tokenizer()?.encode_with(&text_bytes, true, false);
    let end = c.start_token + c.windows * c.ctx;
    if end > tokens.len() {
        bail!("--recipe {}: its windows end at token {end}, past the text's {} tokens", file.display(), tokens.len());
    }
    let windows: Vec<&[u32]> = (0..c.windows).map(|w| &tokens[c.start_token + w * c.ctx..c.start_token + (w + 1) * c.ctx]).collect();
    println!("model:   {}", path.display());
    println!("text:    {label}: windows {}..{end}, as the recipe records", c.start_token);
    let dense = CacheSettings::default();
    let base: Vec<WindowScore> = windows.iter().map(|w| score_window(&engine, w, &dense, &opts)).collect::<models::error::Result<_>>()?;
    let mut dense_r = PplResult::default();
    for b in &base {
        dense_r.add(b, Some(b))?;
    }
    let settings = CacheSettings { spec: KvSpec::dense(), layers: LayerOverrides::per_layer(&specs), max_kv_size: None };
    let measured = score_all(&engine, &windows, &settings, &opts, &base)?;
    let paired = measured.paired(&dense_r).context("the recipe and the reference cover the same tokens")?;
    println!(
        "  before: KLD {:.6} ± {:.6}, Δppl {:+.3} %; now: KLD {:.6} ± {:.6}, Δppl {:+.3} ± {:.3} %",
        recipe.measured.kld_mean,
        recipe.measured.kld_se,
        recipe.measured.delta_ppl_pct,
        measured.kld_mean(),
        paired.kld_se,
        paired.delta_ppl_pct,
        paired.delta_ppl_se_pct
    );
    let method = format!(
        "{}; re-measured by `calibrate --recipe` with the first {} token(s) kept in float on per-channel key layers without a sliding window",
        recipe.method.split("; re-measured by").next().unwrap_or_default(),
        a.kv_sinks
    );
    let out = a.out_dir.join(file.file_name().context("--recipe names a file")?);
    let updated = Recipe {
        layers: specs.iter().map(|s| s.to_string()).collect(),
        measured: Measured {
            kld_mean: measured.kld_mean(),
            kld_se: paired.kld_se,
            delta_ppl_pct: paired.delta_ppl_pct,
            delta_ppl_se_pct: paired.delta_ppl_se_pct,
            ..recipe.measured.clone()
        },
        method,
        // The calibration's own command stays: this one only re-scored its choice.
        command: format!("{}; then {}", recipe.command.split("; then ").next().unwrap_or_default(), std::env::args().collect::<Vec<_>>().join(" ")),
        created: crate::results::Env::detect().date,
        ..recipe
    };
    std::fs::create_dir_all(&a.out_dir).with_context(|| format!("--out-dir {}", a.out_dir.display()))?;
    updated.save(&out).with_context(|| format!("writing {}", out.display()))?;
    println!("  wrote {}", out.display());
    Ok(())
}

/// Standard error of the mean KLD, clustered by window (as `ppl` reports it; pairing a result
/// with itself leaves the KLD's own spread).
fn kld_se(r: &PplResult) -> f64 {
    r.paired(r).map_or(f64::NAN, |p| p.kld_se)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(bits: u8, group: usize, rotate: bool, channel: bool) -> Cand {
        Cand { q: QuantSpec { bits, group }, rotate, center: false, channel }
    }

    #[test]
    fn per_channel_keys_scale_from_a_per_channel_reference_in_their_own_frame() {
        let refs = references(Part::K, 64, 512);
        assert_eq!(refs.len(), 5, "three per-token and two per-channel key references");
        for rotate in [false, true] {
            for bits in [2u8, 3, 6] {
                let r = reference_for(cand(bits, 64, rotate, true), &refs);
                assert!(r.channel && r.rotate == rotate && r.q.bits == 4, "{bits}-bit per-channel keys took {r:?}");
            }
        }
        assert_eq!(reference_for(cand(2, 32, true, false), &refs), cand(2, 64, true, false));
        assert_eq!(reference_for(cand(6, 128, false, false), &refs), cand(4, 64, false, false));
        // Values are never per channel; windows shorter than a group get no per-channel probe,
        // and per-channel candidates fall back to the per-token reference of their frame.
        assert!(references(Part::V, 64, 512).iter().all(|r| !r.channel));
        let short = references(Part::K, 64, 96);
        assert_eq!(reference_for(cand(4, 64, true, true), &short), cand(4, 64, true, false));
    }
}
