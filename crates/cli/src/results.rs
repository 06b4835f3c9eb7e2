//! Result rows shared by `bench`, `bench attention` and `plot`: the row schemas, the
//! environment every row records, CSV/JSON files and the human tables printed beside them.

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where and with what a row was measured; copied into every row so rows stand alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Env {
    pub machine: String,
    pub backend: String,
    pub device: String,
    pub mlx_version: String,
    /// The engine options in force ([`mlx_ext::EngineOptions::describe`]).
    pub engine: String,
    pub commit: String,
    pub date: String,
}

impl Env {
    pub fn detect() -> Env {
        Env {
            machine: machine(),
            backend: mlx_kv::Backend::current().name().to_string(),
            device: format!("{}", mlx_rs::Device::default()),
            mlx_version: mlx_version(),
            // A tensor-parallel group's size is part of the engine a row measured.
            engine: format!("{} tensor-parallel={}", mlx_ext::options::current().describe(), models::shard::current().map_or(1, |s| s.size())),
            commit: BUILD_COMMIT.to_string(),
            date: utc_now(),
        }
    }
}

pub fn mlx_version() -> String {
    // SAFETY: mlx_version fills a string we own and free; the data pointer is a C string valid
    // until the free.
    unsafe {
        let mut s = mlx_sys::mlx_string_new();
        mlx_sys::mlx_version(&mut s);
        let v = std::ffi::CStr::from_ptr(mlx_sys::mlx_string_data(s)).to_string_lossy().into_owned();
        mlx_sys::mlx_string_free(s);
        v
    }
}

/// CPU model, core count and memory: enough to tell two machines' rows apart.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| std::env::consts::ARCH.to_string(), |(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(String::new(), |kb| format!(" / {:.0} GiB", kb as f64 / (1u64 << 20) as f64));
    format!("{cpu} / {cores} cores{mem}")
}

/// The commit the binary was built from (short hash, `-dirty` when the engine's sources
/// differed from it), stamped by build.rs: not the git state of the folder it runs in.
pub const BUILD_COMMIT: &str = env!("KVSPLIT_BUILD_COMMIT");

/// `YYYY-MM-DDTHH:MM:SSZ` from the system clock, without a date crate.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format_utc(secs)
}

pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), eras of 400 years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// One whole-model row (`kind = model`); the field order is the CSV column order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    pub kind: String,
    pub machine: String,
    pub backend: String,
    pub device: String,
    pub mlx_version: String,
    pub model: String,
    pub kv: String,
    /// Which choice ran (`plain`, `general`, `recipe:<name>`, `custom`); see [`PplRow`].
    #[serde(default)]
    pub kv_source: String,
    pub depth: usize,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub repeats: usize,
    pub prefill_tps_median: f64,
    pub prefill_tps_min: f64,
    pub prefill_tps_max: f64,
    pub decode_tps_median: f64,
    pub decode_tps_min: f64,
    pub decode_tps_max: f64,
    pub ttft_ms: f64,
    pub kv_bytes_measured: u64,
    pub kv_bytes_formula: u64,
    pub peak_memory: u64,
    /// The attention path of the last decode step and why (`fused-step (...)`, `cpu-primitive (...)`).
    #[serde(default)]
    pub decode_path: String,
    /// Engine options (empty in rows written before they were recorded).
    #[serde(default)]
    pub engine: String,
    pub commit: String,
    pub date: String,
    /// Sequences decoded together (`bench --batch`); prefill and decode tok/s are then
    /// aggregates over all of them. Rows written before batching are single-stream (1).
    #[serde(default = "one")]
    pub batch: usize,
}

fn one() -> usize {
    1
}

/// One attention-only row (`kind = attention`). Shares the environment, `model` (here the
/// synthetic shape), `kv`, `depth` (context tokens already cached), `repeats`,
/// `kv_bytes_measured`/`kv_bytes_formula` and `peak_memory` with [`ModelRow`]; the rest is
/// specific to one attention call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttentionRow {
    pub kind: String,
    pub machine: String,
    pub backend: String,
    pub device: String,
    pub mlx_version: String,
    pub model: String,
    pub kv: String,
    /// Which choice ran (`plain`, `general`, `recipe:<name>`, `custom`); see [`PplRow`].
    #[serde(default)]
    pub kv_source: String,
    pub depth: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Queries in the prefill measurement.
    pub chunk: usize,
    pub repeats: usize,
    /// Dtype of queries and of the dense ("fp16") cache: f32 on CPU.
    pub compute_dtype: String,
    pub decode_ms_median: f64,
    pub decode_ms_min: f64,
    pub decode_ms_max: f64,
    pub prefill_ms_median: f64,
    pub prefill_ms_min: f64,
    pub prefill_ms_max: f64,
    /// Bytes one decode step must read: packed K and V plus scales and biases (or the dense
    /// K and V) for `depth` tokens.
    pub bytes_read: u64,
    /// Resident KV bytes with `depth` tokens cached (allocation rounded up to whole steps).
    pub kv_bytes_measured: u64,
    pub kv_bytes_formula: u64,
    /// Peak MLX memory during one decode step (cache included).
    pub peak_memory: u64,
    /// Peak MLX memory during one prefill chunk (cache included).
    pub prefill_peak_memory: u64,
    /// Ratios to the fp16 row of the same context (empty where there is none).
    pub decode_vs_fp16: Option<f64>,
    pub prefill_vs_fp16: Option<f64>,
    pub bytes_vs_fp16: Option<f64>,
    pub prefill_peak_vs_fp16: Option<f64>,
    #[serde(default)]
    pub engine: String,
    pub commit: String,
    pub date: String,
}

/// A perplexity row as written by `ppl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PplRow {
    pub model: String,
    pub kv: String,
    /// Which choice ran (`plain`, `general`, `recipe:<name>`, `custom`); empty in rows written
    /// before presets meant recipes, when every preset ran plain.
    #[serde(default)]
    pub kv_source: String,
    pub ctx: usize,
    pub chunk: usize,
    pub score_all: String,
    pub windows: usize,
    pub tokens_scored: usize,
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub kld_mean: Option<f64>,
    pub kld_p99: Option<f64>,
    pub top1_agree: Option<f64>,
    /// Paired against the baseline over the same tokens (`models::perplexity::Paired`): the
    /// change in perplexity and its standard error, and the mean KLD's standard error.
    #[serde(default)]
    pub delta_ppl_pct: Option<f64>,
    #[serde(default)]
    pub delta_ppl_se_pct: Option<f64>,
    #[serde(default)]
    pub kld_se: Option<f64>,
    pub kv_bytes_per_token: f64,
    pub backend: String,
    pub mlx_version: String,
    #[serde(default)]
    pub engine: String,
    pub commit: String,
    pub date: String,
}

/// Median, min and max of samples (median of an even count is the mean of the middle two).
pub fn stats(samples: &[f64]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    (median, s[0], s[n - 1])
}

/// Whether this process writes result files: rank 0 writes a tensor-parallel group's rows (the
/// other ranks measured the same steps and would race it for the same paths).
pub fn writes_results() -> bool {
    models::shard::current().is_none_or(|s| s.rank() == 0)
}

/// Writes `<dir>/<stem>.csv` and `<dir>/<stem>.json`; returns both paths. Call it only where
/// [`writes_results`].
pub fn write_rows<T: Serialize>(dir: &Path, stem: &str, rows: &[T]) -> Result<(PathBuf, PathBuf)> {
    let csv_path = dir.join(format!("{stem}.csv"));
    let json_path = dir.join(format!("{stem}.json"));
    if !writes_results() {
        return Ok((csv_path, json_path));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("--out {}: cannot create the directory", dir.display()))?;
    let mut w = csv::Writer::from_path(&csv_path).with_context(|| format!("writing {}", csv_path.display()))?;
    for r in rows {
        w.serialize(r).with_context(|| format!("writing {}", csv_path.display()))?;
    }
    w.flush().with_context(|| format!("writing {}", csv_path.display()))?;
    let json = serde_json::to_string_pretty(rows)?;
    std::fs::write(&json_path, json + "\n").with_context(|| format!("writing {}", json_path.display()))?;
    Ok((csv_path, json_path))
}

/// The header line of a CSV file, or the keys of the first object of a JSON file.
pub fn columns(path: &Path) -> Result<Vec<String>> {
    if is_json(path) {
        let v: serde_json::Value = serde_json::from_str(&read(path)?).with_context(|| format!("{}: not JSON", path.display()))?;
        let first = json_rows(v).into_iter().next();
        Ok(first.and_then(|r| r.as_object().map(|o| o.keys().cloned().collect())).unwrap_or_default())
    } else {
        let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(r.headers().with_context(|| format!("{}: no CSV header", path.display()))?.iter().map(String::from).collect())
    }
}

/// Reads rows of one schema from a `.csv` or `.json` file (a JSON array, or `{"rows": [...]}`).
pub fn read_rows<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if is_json(path) {
        let v: serde_json::Value = serde_json::from_str(&read(path)?).with_context(|| format!("{}: not JSON", path.display()))?;
        json_rows(v)
            .into_iter()
            .enumerate()
            .map(|(i, r)| serde_json::from_value(r).with_context(|| format!("{}: row {}", path.display(), i + 1)))
            .collect()
    } else {
        let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
        r.deserialize()
            .enumerate()
            .map(|(i, row)| row.with_context(|| format!("{}: data row {}", path.display(), i + 1)))
            .collect()
    }
}

fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn json_rows(v: serde_json::Value) -> Vec<serde_json::Value> {
    match v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(mut o) => match o.remove("rows") {
            Some(serde_json::Value::Array(a)) => a,
            _ => vec![serde_json::Value::Object(o)],
        },
        _ => Vec::new(),
    }
}

/// A Markdown table (also readable in a terminal) with right-aligned columns.
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len()).map(|i| rows.iter().map(|r| r[i].len()).chain([header[i].len()]).max().unwrap_or(0)).collect();
    let line = |cells: Vec<String>| format!("| {} |\n", cells.iter().zip(&widths).map(|(c, w)| format!("{c:>w$}")).collect::<Vec<_>>().join(" | "));
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    out.push_str(&format!("|{}|\n", widths.iter().map(|w| format!("{}:", "-".repeat(w + 1))).collect::<Vec<_>>().join("|")));
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

/// Up to three significant digits without trailing zeros (`1.5`, `20`, `0.012`).
pub fn num_label(v: f64) -> String {
    let a = v.abs();
    let digits = if a >= 100.0 || a == 0.0 { 0 } else if a >= 10.0 { 1 } else if a >= 1.0 { 2 } else { (2.0 - a.log10().floor()) as usize };
    let s = format!("{v:.digits$}");
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// Bytes in powers of 1000 (axis ticks fall on round decimal numbers).
pub fn si_bytes(v: f64) -> String {
    let (d, unit) = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")].into_iter().find(|(d, _)| v.abs() >= *d).unwrap_or((1.0, "B"));
    format!("{} {unit}", num_label(v / d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_model_row(kv: &str, depth: usize) -> ModelRow {
        ModelRow {
            kind: "model".into(),
            machine: "test cpu, with comma / 2 cores".into(),
            backend: "cpu".into(),
            device: "Device(cpu, 0)".into(),
            mlx_version: "0.32.2".into(),
            model: "m.gguf".into(),
            kv: kv.into(),
            kv_source: "plain".into(),
            depth,
            n_prompt: 512,
            n_gen: 64,
            repeats: 3,
            prefill_tps_median: 101.25,
            prefill_tps_min: 99.5,
            prefill_tps_max: 103.0,
            decode_tps_median: 12.5,
            decode_tps_min: 12.0,
            decode_tps_max: 13.0,
            ttft_ms: 5.056_f64 * depth as f64,
            kv_bytes_measured: 1 << 20,
            kv_bytes_formula: 1_000_000,
            peak_memory: 123_456_789,
            decode_path: "cpu-primitive (one packed per-token body, no mask or sinks)".into(),
            engine: mlx_ext::EngineOptions::default().describe(),
            commit: "abc".into(),
            date: "2026-01-01T00:00:00Z".into(),
            batch: 4,
        }
    }

    #[test]
    fn csv_and_json_round_trip_model_and_attention_rows() {
        let dir = std::env::temp_dir().join(format!("kvsplit-results-{}", std::process::id()));
        let rows = vec![sample_model_row("fp16", 0), sample_model_row("k8v4", 4096)];
        let (c, j) = write_rows(&dir, "m", &rows).unwrap();
        assert_eq!(read_rows::<ModelRow>(&c).unwrap(), rows);
        assert_eq!(read_rows::<ModelRow>(&j).unwrap(), rows);
        let cols = columns(&c).unwrap();
        assert_eq!(cols.first().map(String::as_str), Some("kind"));
        assert_eq!(cols.len(), 27);
        // Rows written before `--batch` existed have no `batch` column: single-stream.
        let old = dir.join("old.csv");
        let text = std::fs::read_to_string(&c).unwrap();
        let stripped: String = text.lines().map(|l| l.rsplit_once(',').unwrap().0.to_string() + "\n").collect();
        std::fs::write(&old, stripped).unwrap();
        assert!(read_rows::<ModelRow>(&old).unwrap().iter().all(|r| r.batch == 1));

        let a = AttentionRow { kind: "attention".into(), kv: "k4v2".into(), depth: 1024, decode_ms_median: 0.75, decode_vs_fp16: Some(0.5), ..Default::default() };
        let b = AttentionRow { decode_vs_fp16: None, ..a.clone() };
        let (c, j) = write_rows(&dir, "a", &[a.clone(), b.clone()]).unwrap();
        assert_eq!(read_rows::<AttentionRow>(&c).unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(read_rows::<AttentionRow>(&j).unwrap(), vec![a, b]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rows_record_the_commit_the_binary_was_built_from() {
        let head = std::process::Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        match head {
            // Built from this checkout: the stamp is its HEAD, maybe with -dirty.
            Some(h) => assert!(BUILD_COMMIT == h || BUILD_COMMIT == format!("{h}-dirty"), "stamp {BUILD_COMMIT}, HEAD {h}"),
            None => assert_eq!(BUILD_COMMIT, "unknown"),
        }
        assert_eq!(Env::detect().commit, BUILD_COMMIT);
    }

    #[test]
    fn stats_and_dates() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(&[4.0, 1.0]), (2.5, 1.0, 4.0));
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!((num_label(3000.0), num_label(1.5), num_label(0.0125), num_label(20.0)), ("3000".into(), "1.5".into(), "0.0125".into(), "20".into()));
        assert_eq!(si_bytes(1e9), "1 GB");
        assert_eq!(format_utc(951_782_400 + 3661), "2000-02-29T01:01:01Z");
        assert_eq!(format_utc(1_709_251_199), "2024-02-29T23:59:59Z");
    }
}
