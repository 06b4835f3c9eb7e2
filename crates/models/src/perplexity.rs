//! Perplexity and distribution drift of a KV setting.
//!
//! Protocol: the text is tokenized once and cut into non-overlapping windows of `ctx` tokens.
//! Each window gets fresh caches and is fed in chunks of `chunk` tokens, so every chunk after
//! the first attends to the (split-)quantized cache that the earlier chunks left behind; a
//! single full-window pass would never read a quantized key. Only the second half of each
//! window's tokens is scored (llama-perplexity's choice: every scored token has at least
//! `ctx/2` tokens of context) unless `score_all`.
//!
//! Drift against a baseline (KL divergence, same top-1) needs the baseline's full distribution
//! at every scored position. [`WindowScore`] keeps those rows (`[n, V]` f32 log-probs) for one
//! window only, so a sweep runs the baseline and each setting window by window and never holds
//! more than one window of rows per setting.

use crate::error::{ModelError, Result};
use crate::engine::Engine;
use crate::generate::CacheSettings;
use crate::sample::SamplerSettings;
use mlx_rs::ops::indexing::{argmax_axis, IndexOp};
use mlx_rs::transforms::eval;
use mlx_rs::{Array, Dtype};
use std::ops::Range;

/// How a text is cut into windows and which tokens are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PplOptions {
    /// Tokens per window; each window starts from an empty cache.
    pub ctx: usize,
    /// Tokens fed per forward call.
    pub chunk: usize,
    /// Score every token after the first instead of the second half.
    pub score_all: bool,
    /// Use at most this many windows (`None`: all that fit).
    pub max_windows: Option<usize>,
}

impl Default for PplOptions {
    fn default() -> Self {
        PplOptions { ctx: 512, chunk: 128, score_all: false, max_windows: None }
    }
}

impl PplOptions {
    pub fn validate(&self) -> Result<()> {
        if self.ctx < 2 {
            return Err(ModelError::Invalid { flag: "--ctx", message: format!("a window needs at least 2 tokens, got {}", self.ctx) });
        }
        if self.chunk == 0 {
            return Err(ModelError::Invalid { flag: "--chunk", message: "must be at least 1".into() });
        }
        if self.max_windows == Some(0) {
            return Err(ModelError::Invalid { flag: "--max-windows", message: "must be at least 1".into() });
        }
        Ok(())
    }

    /// Windows that `n_tokens` yield under this protocol; a partial last window is dropped.
    pub fn n_windows(&self, n_tokens: usize) -> usize {
        let all = n_tokens / self.ctx.max(1);
        self.max_windows.map_or(all, |m| m.min(all))
    }

    /// Indices, within a window, of the tokens that are scored (each predicted from the
    /// logits one position earlier).
    pub fn scored_targets(&self) -> Range<usize> {
        if self.score_all {
            1..self.ctx
        } else {
            self.ctx / 2..self.ctx
        }
    }

    /// The tokens of window `w`.
    pub fn window<'a>(&self, tokens: &'a [u32], w: usize) -> &'a [u32] {
        &tokens[w * self.ctx..(w + 1) * self.ctx]
    }
}

/// One window scored under one cache setting.
pub struct WindowScore {
    /// Negative log-likelihood of each scored token (natural log).
    pub nll: Vec<f32>,
    /// Most likely token at each scored position.
    pub top1: Vec<u32>,
    /// `[n_scored, V]` float32 log-probabilities; kept for drift against another run.
    pub logprobs: Array,
}

impl WindowScore {
    /// Derives NLL and top-1 from log-prob rows, so a baseline read back from disk is scored by
    /// exactly the code that scores a fresh run.
    pub fn from_logprobs(logprobs: Array, targets: &[u32]) -> Result<Self> {
        let n = logprobs.shape()[0] as usize;
        if n != targets.len() {
            return Err(ModelError::Invalid {
                flag: "--ctx",
                message: format!("{n} log-prob rows for {} scored tokens", targets.len()),
            });
        }
        let idx = Array::from_slice(targets, &[n as i32, 1]).as_dtype(Dtype::Int32)?;
        let picked = logprobs.take_along_axis(&idx, -1)?.reshape(&[n as i32])?;
        let nll = picked.negative()?;
        let top1 = argmax_axis(&logprobs, -1, None)?.as_dtype(Dtype::Uint32)?;
        eval([&nll, &top1])?;
        Ok(WindowScore { nll: nll.as_slice::<f32>().to_vec(), top1: top1.as_slice::<u32>().to_vec(), logprobs })
    }

    /// KL(baseline ‖ self) at each scored position, in nats.
    pub fn kld_from(&self, baseline: &WindowScore) -> Result<Vec<f32>> {
        if baseline.logprobs.shape() != self.logprobs.shape() {
            return Err(ModelError::Invalid {
                flag: "--kv",
                message: format!("baseline rows {:?} and scored rows {:?} differ in shape", baseline.logprobs.shape(), self.logprobs.shape()),
            });
        }
        let p = &baseline.logprobs;
        let kl = p.exp()?.multiply(p.subtract(&self.logprobs)?)?.sum_axis(-1, None)?;
        eval([&kl])?;
        Ok(kl.as_slice::<f32>().to_vec())
    }
}

/// Log-softmax in float32 whatever the model's dtype: f16 log-probs would round away the
/// small differences KL divergence is meant to show.
fn log_softmax_f32(logits: &Array) -> Result<Array> {
    let x = logits.as_dtype(Dtype::Float32)?;
    let lse = x.logsumexp_axis(-1, true)?;
    Ok(x.subtract(&lse)?)
}

/// Scores one window (`opts.ctx` tokens) in a fresh sequence of `engine` with `settings`.
pub fn score_window(engine: &Engine, window: &[u32], settings: &CacheSettings, opts: &PplOptions) -> Result<WindowScore> {
    opts.validate()?;
    if window.len() != opts.ctx {
        return Err(ModelError::Invalid { flag: "--ctx", message: format!("window of {} tokens, expected {}", window.len(), opts.ctx) });
    }
    let targets = opts.scored_targets();
    // Logits at position p predict token p + 1.
    let scored = targets.start - 1..targets.end - 1;
    let mut seq = engine.sequence(settings, SamplerSettings::default(), opts.chunk)?;
    let mut rows = Vec::new();
    for (i, part) in window.chunks(opts.chunk).enumerate() {
        let start = i * opts.chunk;
        let end = start + part.len();
        let (lo, hi) = (scored.start.max(start), scored.end.min(end));
        // A chunk with nothing to score only fills the cache: skip its vocabulary projection.
        let logits = seq.forward(part, lo >= hi)?;
        let mut arrays: Vec<&Array> = seq.caches().iter().flat_map(|c| c.arrays()).collect();
        if lo >= hi {
            arrays.push(&logits);
            eval(arrays)?;
            continue;
        }
        let rows_here = log_softmax_f32(&logits.index((0, (lo - start) as i32..(hi - start) as i32)))?;
        arrays.push(&rows_here);
        // Evaluating per chunk keeps the graph (and its temporaries) one chunk deep.
        eval(arrays)?;
        rows.push(rows_here);
    }
    let logprobs = mlx_rs::ops::concatenate(&rows, 0)?;
    WindowScore::from_logprobs(logprobs, &window[targets])
}

/// Per-token scores gathered over windows, and the summary statistics reported from them.
#[derive(Debug, Clone, Default)]
pub struct PplResult {
    /// NLL of every scored token, in window order.
    pub nll: Vec<f32>,
    /// KL(baseline ‖ this) of every scored token; empty without a baseline.
    pub kld: Vec<f32>,
    /// Scored positions whose top-1 token equals the baseline's.
    pub top1_same: usize,
    pub windows: usize,
}

impl PplResult {
    /// Adds one window; `baseline` is the same window under the reference setting.
    pub fn add(&mut self, score: &WindowScore, baseline: Option<&WindowScore>) -> Result<()> {
        if let Some(b) = baseline {
            self.kld.extend(score.kld_from(b)?);
            self.top1_same += score.top1.iter().zip(&b.top1).filter(|(a, b)| a == b).count();
        }
        self.nll.extend_from_slice(&score.nll);
        self.windows += 1;
        Ok(())
    }

    pub fn tokens(&self) -> usize {
        self.nll.len()
    }

    pub fn nll_mean(&self) -> f64 {
        mean(&self.nll)
    }

    /// Standard error of the mean NLL (sample standard deviation over sqrt(n)).
    pub fn nll_stderr(&self) -> f64 {
        let n = self.nll.len();
        if n < 2 {
            return f64::NAN;
        }
        let m = self.nll_mean();
        let var = self.nll.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    }

    pub fn ppl(&self) -> f64 {
        self.nll_mean().exp()
    }

    /// First-order propagation of the NLL standard error through exp: ppl · se(nll).
    pub fn ppl_stderr(&self) -> f64 {
        self.ppl() * self.nll_stderr()
    }

    pub fn has_baseline(&self) -> bool {
        !self.kld.is_empty()
    }

    pub fn kld_mean(&self) -> f64 {
        mean(&self.kld)
    }

    /// 99th percentile of per-token KLD (nearest rank).
    pub fn kld_p99(&self) -> f64 {
        percentile(&self.kld, 0.99)
    }

    /// Share of scored positions with the baseline's top-1 token, in percent.
    pub fn top1_agree(&self) -> f64 {
        100.0 * self.top1_same as f64 / self.kld.len().max(1) as f64
    }
}

/// A setting against the baseline over the same scored tokens (paired): the change in
/// perplexity and the mean KLD, each with its standard error. Tokens of one window are not
/// independent (one text, one cache), so the errors come from the spread of per-window means
/// (clustered by window); with one window, from the per-token spread, which understates them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    /// `100 (ppl / ppl_base - 1)` = `100 (exp(mean(nll - nll_base)) - 1)`.
    pub delta_ppl_pct: f64,
    /// Its standard error, `100 exp(d) se(d)` (first order).
    pub delta_ppl_se_pct: f64,
    pub kld_mean: f64,
    pub kld_se: f64,
    /// Whether the errors are clustered by window (more than one window).
    pub clustered: bool,
}

/// Mean and standard error of `v`'s values grouped in consecutive runs of `per` (the mean of
/// the run means, and their spread over sqrt(runs)); per-value when there is one run.
fn clustered_mean_se(v: &[f64], per: usize) -> (f64, f64, bool) {
    let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let groups: Vec<f64> = if per > 0 && v.len() / per >= 2 { v.chunks(per).map(|c| c.iter().sum::<f64>() / c.len() as f64).collect() } else { v.to_vec() };
    let n = groups.len();
    if n < 2 {
        return (m, f64::NAN, false);
    }
    let gm = groups.iter().sum::<f64>() / n as f64;
    let var = groups.iter().map(|x| (x - gm).powi(2)).sum::<f64>() / (n - 1) as f64;
    (m, (var / n as f64).sqrt(), groups.len() != v.len())
}

impl PplResult {
    /// [`Paired`] statistics of this result against `base`, or `None` when they did not score
    /// the same tokens (different window counts) or there is no KLD.
    pub fn paired(&self, base: &PplResult) -> Option<Paired> {
        if self.nll.len() != base.nll.len() || self.windows != base.windows || self.nll.is_empty() || self.kld.len() != self.nll.len() {
            return None;
        }
        let per = self.nll.len() / self.windows.max(1);
        let d: Vec<f64> = self.nll.iter().zip(&base.nll).map(|(&a, &b)| a as f64 - b as f64).collect();
        let (dm, dse, clustered) = clustered_mean_se(&d, per);
        let kl: Vec<f64> = self.kld.iter().map(|&x| x as f64).collect();
        let (km, kse, _) = clustered_mean_se(&kl, per);
        Some(Paired { delta_ppl_pct: 100.0 * dm.exp_m1(), delta_ppl_se_pct: 100.0 * dm.exp() * dse, kld_mean: km, kld_se: kse, clustered })
    }
}

fn mean(v: &[f32]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
}

/// Nearest-rank percentile: the smallest value with at least `q` of the data at or below it.
pub fn percentile(v: &[f32], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1] as f64
}

/// Scores every window of `tokens` under `settings`; with `baseline` (the same windows under
/// the reference setting, in order) also gathers drift. `on_window` runs after each window.
pub fn score_windows(
    engine: &Engine,
    tokens: &[u32],
    settings: &CacheSettings,
    opts: &PplOptions,
    baseline: Option<&[WindowScore]>,
    mut on_window: impl FnMut(usize),
) -> Result<PplResult> {
    opts.validate()?;
    let n = opts.n_windows(tokens.len());
    if n == 0 {
        return Err(ModelError::Invalid {
            flag: "--ctx",
            message: format!("the text has {} tokens, fewer than one window of {}", tokens.len(), opts.ctx),
        });
    }
    if let Some(b) = baseline {
        if b.len() < n {
            return Err(ModelError::Invalid { flag: "--kv", message: format!("baseline has {} windows, {n} needed", b.len()) });
        }
    }
    let mut result = PplResult::default();
    for w in 0..n {
        let score = score_window(engine, opts.window(tokens, w), settings, opts)?;
        result.add(&score, baseline.map(|b| &b[w]))?;
        on_window(w);
    }
    Ok(result)
}

/// Baseline log-prob rows kept on disk between runs, exactly (float32, as computed).
///
/// Full rows are large (V·4 bytes per scored token: 50 MB for one 512-token window of a
/// 49k vocabulary), so the store is bounded: the whole root holds at most `cap_bytes`; saving
/// evicts the least recently written other entries first and skips the save when one window
/// would not fit even then. A miss only costs recomputing the baseline window in-process, so
/// results never depend on what the store holds. One file per window, named by a hash of the
/// window's tokens: any run that scores the same window (more windows, another command)
/// reuses it.
pub struct BaselineStore {
    root: std::path::PathBuf,
    entry: std::path::PathBuf,
    cap_bytes: u64,
}

const STORE_MAGIC: &[u8; 8] = b"KVPPLB01";

impl BaselineStore {
    /// `key` names everything but the tokens that the rows depend on (model file, ctx, chunk,
    /// scoring, backend).
    pub fn new(root: &std::path::Path, key: &str, cap_bytes: u64) -> Self {
        BaselineStore { root: root.to_path_buf(), entry: root.join(key), cap_bytes }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.entry
    }

    fn file(&self, window: &[u32]) -> std::path::PathBuf {
        let bytes: Vec<u8> = window.iter().flat_map(|t| t.to_le_bytes()).collect();
        self.entry.join(format!("{:016x}-{}.bin", fnv1a(&bytes, FNV_OFFSET), window.len()))
    }

    /// The stored window, or `None` when absent or unreadable (the caller recomputes).
    pub fn load(&self, window: &[u32], targets: &[u32]) -> Option<WindowScore> {
        let bytes = std::fs::read(self.file(window)).ok()?;
        let (head, data) = bytes.split_at_checked(24)?;
        let rows = u64::from_le_bytes(head[8..16].try_into().ok()?) as usize;
        let vocab = u64::from_le_bytes(head[16..24].try_into().ok()?) as usize;
        if &head[..8] != STORE_MAGIC || rows != targets.len() || data.len() != rows * vocab * 4 {
            return None;
        }
        let v: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        WindowScore::from_logprobs(Array::from_slice(&v, &[rows as i32, vocab as i32]), targets).ok()
    }

    /// Saves the rows of `window`; returns whether they were stored (false: over the cap).
    pub fn save(&self, window: &[u32], score: &WindowScore) -> Result<bool> {
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let shape = score.logprobs.shape();
        let need = 24 + score.logprobs.nbytes() as u64;
        if !self.make_room(need) {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.entry).map_err(io(&self.entry))?;
        let rows = score.logprobs.as_dtype(Dtype::Float32)?;
        rows.eval()?;
        let mut out = Vec::with_capacity(need as usize);
        out.extend_from_slice(STORE_MAGIC);
        out.extend_from_slice(&(shape[0] as u64).to_le_bytes());
        out.extend_from_slice(&(shape[1] as u64).to_le_bytes());
        for x in rows.as_slice::<f32>() {
            out.extend_from_slice(&x.to_le_bytes());
        }
        // Write then rename: a concurrent reader sees a whole file or none.
        let tmp = self.entry.join(format!(".{}.tmp", std::process::id()));
        std::fs::write(&tmp, &out).map_err(io(&tmp))?;
        std::fs::rename(&tmp, self.file(window)).map_err(io(&tmp))?;
        Ok(true)
    }

    /// Evicts other entries, oldest first, until `need` more bytes fit under the cap.
    fn make_room(&self, need: u64) -> bool {
        let size_of = |d: &std::path::Path| -> u64 {
            std::fs::read_dir(d).map_or(0, |it| it.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        };
        let mut entries: Vec<(std::time::SystemTime, std::path::PathBuf, u64)> = std::fs::read_dir(&self.root)
            .map(|it| {
                it.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path(), size_of(&e.path())))
                    .collect()
            })
            .unwrap_or_default();
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        entries.sort_by_key(|e| e.0);
        for (_, path, size) in entries {
            if total + need <= self.cap_bytes {
                break;
            }
            if path != self.entry && std::fs::remove_dir_all(&path).is_ok() {
                total -= size;
            }
        }
        total + need <= self.cap_bytes
    }
}

/// FNV-1a, 64-bit: a stable hash (std's `DefaultHasher` may change between Rust releases,
/// which would silently orphan stored baselines).
pub fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::with_key(seed);
    h.write(bytes);
    h.finish()
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

#[cfg(test)]
mod tests {
    use super::*;

    fn result(nll: Vec<f32>, kld: Vec<f32>, windows: usize) -> PplResult {
        PplResult { nll, kld, top1_same: 0, windows }
    }

    #[test]
    fn paired_errors_come_from_the_spread_of_window_means() {
        // Base NLL 1 everywhere; the setting adds 0.01 in window 1 and 0.03 in window 2, with
        // per-token noise that cancels inside each window: mean difference 0.02, window means
        // 0.01 and 0.03, so se = sd(0.01, 0.03) / sqrt(2) = 0.01 exactly.
        let base = result(vec![1.0; 4], vec![], 2);
        let nll = vec![1.005, 1.015, 1.02, 1.04];
        let kld = vec![0.001, 0.003, 0.002, 0.002];
        let r = result(nll, kld, 2);
        let p = r.paired(&base).expect("same tokens");
        assert!(p.clustered);
        assert!((p.delta_ppl_pct - 100.0 * (0.02f64.exp() - 1.0)).abs() < 1e-4, "{p:?}");
        assert!((p.delta_ppl_se_pct - 100.0 * 0.02f64.exp() * 0.01).abs() < 1e-4, "{p:?}");
        // KLD window means 0.002 and 0.002: no spread between windows.
        assert!((p.kld_mean - 0.002).abs() < 1e-9 && p.kld_se.abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn results_over_different_tokens_are_not_paired() {
        let base = result(vec![1.0; 4], vec![], 2);
        assert!(result(vec![1.0; 6], vec![0.0; 6], 3).paired(&base).is_none());
        assert!(result(vec![1.0; 4], vec![], 2).paired(&base).is_none(), "no KLD, no pairing");
    }
}
