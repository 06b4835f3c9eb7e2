//! `plot` on synthetic rows: every figure renders to a non-empty PNG and SVG.

use super::*;
use crate::results::write_rows;

fn ppl_row(kv: &str, ppl: f64, bytes: f64) -> PplRow {
    PplRow {
        model: "tiny.gguf".into(),
        kv: kv.into(),
        kv_source: "plain".into(),
        ctx: 512,
        chunk: 512,
        score_all: "false".into(),
        windows: 4,
        tokens_scored: 1024,
        ppl,
        ppl_stderr: 0.1,
        kld_mean: Some((ppl - 10.0).abs() / 100.0 + 1e-4),
        kld_p99: Some((ppl - 10.0).abs() / 10.0 + 1e-3),
        top1_agree: Some(0.9),
        delta_ppl_pct: None,
        delta_ppl_se_pct: None,
        kld_se: None,
        kv_bytes_per_token: bytes,
        backend: "cpu".into(),
        mlx_version: "0.32.2".into(),
        engine: mlx_ext::EngineOptions::default().describe(),
        commit: "abc".into(),
        date: "2026-01-01T00:00:00Z".into(),
    }
}

fn model_row(kv: &str, depth: usize, tps: f64) -> ModelRow {
    ModelRow {
        kind: "model".into(),
        model: "tiny.gguf".into(),
        kv: kv.into(),
        depth,
        n_prompt: 64,
        n_gen: 8,
        repeats: 2,
        prefill_tps_median: tps * 10.0,
        prefill_tps_min: tps * 9.0,
        prefill_tps_max: tps * 11.0,
        decode_tps_median: tps,
        decode_tps_min: tps * 0.9,
        decode_tps_max: tps * 1.1,
        kv_bytes_measured: (depth as u64 + 72) * 1000,
        kv_bytes_formula: (depth as u64 + 72) * 900,
        ..Default::default()
    }
}

fn attention_row(kv: &str, depth: usize, ms: f64) -> AttentionRow {
    AttentionRow {
        kind: "attention".into(),
        model: "synthetic h4/kv2/d64".into(),
        kv: kv.into(),
        depth,
        decode_ms_median: ms,
        decode_ms_min: ms,
        decode_ms_max: ms,
        prefill_ms_median: ms * 50.0,
        prefill_ms_min: ms * 40.0,
        prefill_ms_max: ms * 60.0,
        kv_bytes_measured: depth as u64 * 512,
        kv_bytes_formula: depth as u64 * 500,
        ..Default::default()
    }
}

#[test]
fn renders_every_figure_from_synthetic_files() {
    let dir = std::env::temp_dir().join(format!("kvsplit-plot-{}", std::process::id()));
    let ppl = vec![
        ppl_row("fp16", 10.0, 15360.0),
        ppl_row("k8v8", 10.01, 8160.0),
        ppl_row("k8v4", 10.08, 6240.0),
        ppl_row("k4v8", 10.4, 6240.0),
        ppl_row("k4v4", 10.6, 4320.0),
        ppl_row("k4v2", 11.9, 3360.0),
    ];
    let model: Vec<ModelRow> = ["fp16", "k8v4"].iter().flat_map(|kv| [0, 1024, 4096].map(|d| model_row(kv, d, 20.0 - d as f64 / 1000.0))).collect();
    let attn: Vec<AttentionRow> = ["fp16", "k8v4", "k4v2"].iter().flat_map(|kv| [1024, 4096, 16384].map(|d| attention_row(kv, d, d as f64 / 1000.0))).collect();
    let (ppl_csv, _) = write_rows(&dir, "ppl", &ppl).unwrap();
    let (_, model_json) = write_rows(&dir, "model", &model).unwrap();
    let (attn_csv, _) = write_rows(&dir, "attn", &attn).unwrap();

    let data = load(&[ppl_csv, model_json, attn_csv]).unwrap();
    assert_eq!((data.ppl.len(), data.model.len(), data.attention.len()), (6, 6, 9));
    let out = dir.join("figures");
    let written = draw_all(&data, &out, None).unwrap();
    let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for fig in ["kv-memory-vs-context", "throughput-vs-depth", "attention-time-vs-context", "ppl-kld", "kv-bits-heatmap", "memory-quality-frontier"] {
        for ext in ["png", "svg"] {
            assert!(names.contains(&format!("{fig}.{ext}")), "{fig}.{ext} missing from {names:?}");
        }
    }
    for p in &written {
        let bytes = std::fs::read(p).unwrap();
        if p.extension().unwrap() == "png" {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
            assert!(bytes.len() > 10_000, "{} is only {} bytes", p.display(), bytes.len());
        } else {
            let text = String::from_utf8(bytes).unwrap();
            assert!(text.starts_with("<svg") && text.contains("<text"), "{}", p.display());
        }
    }
    // The heatmap states the k4v2 delta it was given.
    let heat = std::fs::read_to_string(out.join("kv-bits-heatmap.svg")).unwrap();
    assert!(heat.contains("+1.900"), "heatmap lacks the k4v2 cell");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kv_labels_and_baseline_grouping() {
    assert_eq!(kv_bits("k8v4"), Some((8, 4)));
    assert_eq!(kv_bits("k4v2-g32,32-pc"), Some((4, 2)));
    assert_eq!(kv_bits("fp16"), Some((16, 16)));
    assert_eq!(kv_bits("bogus"), None);
    // Rows at another context are never paired with this fp16 baseline.
    let mut rows = vec![ppl_row("fp16", 10.0, 1.0), ppl_row("k8v4", 10.1, 0.5)];
    let mut other = ppl_row("k4v4", 12.0, 0.3);
    other.ctx = 1024;
    rows.push(other);
    let (base, group) = comparable_ppl(&rows).unwrap();
    assert_eq!(base.kv, "fp16");
    assert_eq!(group.iter().map(|r| r.kv.as_str()).collect::<Vec<_>>(), vec!["fp16", "k8v4"]);
    assert!(comparable_ppl(&rows[1..]).is_none());
}

#[test]
fn every_figure_names_the_commits_and_dates_of_its_rows() {
    assert_eq!(provenance([("abc123", "2026-12-05T08:00:00Z"), ("abc123", "2026-12-05T09:30:00Z")]), "measured at commit abc123 on 2026-12-05");
    assert_eq!(
        provenance([("def456", "2026-12-06T01:00:00Z"), ("abc123", "2026-12-05T08:00:00Z")]),
        "measured at commits abc123, def456 on 2026-12-05 to 2026-12-06"
    );
    assert_eq!(provenance([("", "")]), "measured at commit unknown on an unknown date");
}

#[test]
fn rows_measured_with_different_engine_options_are_not_drawn_together() {
    let out = std::env::temp_dir().join(format!("kvsplit-plot-engine-{}", std::process::id()));
    let other = mlx_ext::EngineOptions { cpu_kernels: mlx_ext::Toggle::Off, ..Default::default() }.describe();
    let same = mlx_ext::EngineOptions::default().describe();
    let d = Data {
        model: vec![ModelRow { engine: same.clone(), ..model_row("fp16", 0, 20.0) }, ModelRow { engine: other.clone(), ..model_row("k8v4", 0, 25.0) }],
        ..Default::default()
    };
    let err = draw_all(&d, &out, None).unwrap_err().to_string();
    assert!(err.contains("throughput-vs-depth") && err.contains("cpu-kernels: on vs off"), "{err}");
    let mut ppl = ppl_row("k8v4", 10.1, 6240.0);
    ppl.engine = other;
    let d = Data { ppl: vec![ppl_row("fp16", 10.0, 15360.0), ppl], ..Default::default() };
    let err = draw_all(&d, &out, None).unwrap_err().to_string();
    assert!(err.contains("ppl-kld") && err.contains("cpu-kernels: on vs off"), "{err}");
    let d = Data { model: vec![ModelRow { engine: same.clone(), ..model_row("fp16", 0, 20.0) }, ModelRow { engine: same.clone(), ..model_row("k8v4", 0, 25.0) }], ..Default::default() };
    assert!(draw_all(&d, &out, None).is_ok());
    // A row from before `gpu-fused-rotate` existed ran it off: it pairs with `off`, not with `on`.
    let before = same.replace(" gpu-fused-rotate=on", "");
    let off = same.replace("gpu-fused-rotate=on", "gpu-fused-rotate=off");
    let pair = |a: &str, b: &str| Data { model: vec![ModelRow { engine: a.into(), ..model_row("fp16", 0, 20.0) }, ModelRow { engine: b.into(), ..model_row("k8v4", 0, 25.0) }], ..Default::default() };
    assert!(draw_all(&pair(&before, &off), &out, None).is_ok());
    let err = draw_all(&pair(&before, &same), &out, None).unwrap_err().to_string();
    assert!(err.contains("gpu-fused-rotate: off vs on"), "{err}");
    // On the CPU backend the gpu-* options select kernels that never run: such rows pair, and
    // the same rows measured on CUDA do not.
    let on_backend = |backend: &str| {
        let mut a = ppl_row("k8v4", 10.1, 6240.0);
        a.engine = off.clone();
        let mut base = ppl_row("fp16", 10.0, 15360.0);
        base.engine = same.clone();
        for r in [&mut a, &mut base] {
            r.backend = backend.into();
        }
        Data { ppl: vec![base, a], ..Default::default() }
    };
    assert!(draw_all(&on_backend("cpu"), &out, None).is_ok());
    let err = draw_all(&on_backend("cuda"), &out, None).unwrap_err().to_string();
    assert!(err.contains("ppl-kld") && err.contains("gpu-fused-rotate: on vs off"), "{err}");
    std::fs::remove_dir_all(&out).ok();
}
