//! Calibrated recipes as a user meets them: `calibrate` writes one, `--kv-recipe` runs it in
//! generate and ppl (rows say so), presets resolve to a recipe or the general choice, and bad
//! recipe files or budgets are errors that name the flag or file.

use std::path::{Path, PathBuf};
use std::process::Command;

fn kvsplit(args: &[&str]) -> (bool, String) {
    let model = test_support::assets::default_model();
    let out = Command::new(env!("CARGO_BIN_EXE_kvsplit-mlx")).args(args).arg("--model").arg(&model).output().expect("run kvsplit-mlx");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvsplit-recipes-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn calibrate_writes_a_recipe_within_budget_that_generate_and_ppl_run() {
    let dir = temp_dir("calibrate");
    // A short window keeps the 180 probes (30 layers x 2 tensors x 3 references) to seconds.
    let (ok, out) = kvsplit(&["calibrate", "wikitext", "--budget", "k8v4", "--windows", "1", "--ctx", "64", "--chunk", "32", "--out-dir", s(&dir)]);
    assert!(ok, "{out}");
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1-k8v4.json");
    let recipe: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("recipe written")).unwrap();
    assert_eq!(recipe["layers"].as_array().unwrap().len(), 30);
    // K8V4 at group 64 is 6.5 stored bits per element; the knapsack may not exceed it.
    let bits = recipe["bits_per_element"].as_f64().unwrap();
    assert!(bits <= 6.5 + 1e-9 && bits > 5.0, "{bits}");
    assert!(dir.join("SmolLM2-135M-Instruct.Q4_1.sensitivity.csv").is_file());

    let (ok, out) = kvsplit(&["generate", "--kv-recipe", s(&path), "--max-tokens", "4", "--prompt", "The capital of France is", "--verbose", "true"]);
    assert!(ok, "{out}");
    assert!(out.contains("k8v4+recipe, recipe:SmolLM2-135M-Instruct.Q4_1-k8v4"), "{out}");

    let results = dir.join("r");
    let (ok, out) = kvsplit(&["ppl", "wikitext", "--kv", "fp16", "--kv-recipe", s(&path), "--ctx", "64", "--max-windows", "1", "--baseline-cache-mb", "0", "--out", s(&results)]);
    assert!(ok, "{out}");
    let rows = std::fs::read_to_string(results.join("ppl-SmolLM2-135M-Instruct.Q4_1-64.json")).unwrap();
    assert!(rows.contains("\"kv\": \"k8v4+recipe\"") || rows.contains("\"kv\":\"k8v4+recipe\""), "{rows}");
    assert!(rows.contains("recipe:SmolLM2-135M-Instruct.Q4_1-k8v4"), "{rows}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn presets_say_which_setting_ran() {
    let (ok, out) = kvsplit(&["generate", "--kv", "8,4", "--max-tokens", "2", "--prompt", "Hi", "--verbose", "true"]);
    assert!(ok, "{out}");
    assert!(out.contains("+recipe, recipe:") || out.contains("k8v4-rotkv, general"), "{out}");
    let (ok, out) = kvsplit(&["generate", "--kv", "8,4", "--kv-plain", "--max-tokens", "2", "--prompt", "Hi", "--verbose", "true"]);
    assert!(ok && out.contains("(k8v4, plain;"), "{out}");
}

#[test]
fn bad_recipes_and_budgets_name_the_file_or_flag() {
    let dir = temp_dir("bad");
    let missing = dir.join("nope.json");
    let (ok, out) = kvsplit(&["generate", "--kv-recipe", s(&missing), "--max-tokens", "1"]);
    assert!(!ok && !out.contains("panicked") && out.contains("nope.json"), "{out}");

    let corrupt = dir.join("corrupt.json");
    std::fs::write(&corrupt, "{\"format\": \"kvsplit-mlx-kv-recipe\", \"version\": 1").unwrap();
    let (ok, out) = kvsplit(&["generate", "--kv-recipe", s(&corrupt), "--max-tokens", "1"]);
    assert!(!ok && !out.contains("panicked") && out.contains("corrupt.json") && out.contains("not a KV recipe"), "{out}");

    let other = dir.join("other.json");
    let layers: Vec<String> = (0..30).map(|_| "k8v4-g64,64".to_string()).collect();
    let recipe = serde_json::json!({
        "format": "kvsplit-mlx-kv-recipe", "version": 1, "model_id": "0000", "model_name": "another.gguf", "preset": "k8v4",
        "budget_bits": 6.5, "bits_per_element": 6.5, "layers": layers,
        "calibration": {"text": "t", "text_sha256": "00", "start_token": 0, "windows": 1, "ctx": 64, "chunk": 32},
        "measured": {"kld_mean": 0.0, "kld_se": 0.0, "delta_ppl_pct": 0.0, "delta_ppl_se_pct": 0.0, "predicted_kld": 0.0, "plain_kld_mean": null},
        "method": "m", "command": "c", "created": "d"
    });
    std::fs::write(&other, recipe.to_string()).unwrap();
    let (ok, out) = kvsplit(&["generate", "--kv-recipe", s(&other), "--max-tokens", "1"]);
    assert!(!ok && out.contains("other.json") && out.contains("another.gguf") && out.contains("not the loaded model"), "{out}");

    let (ok, out) = kvsplit(&["calibrate", "wikitext", "--budget", "k7v4", "--out-dir", s(&dir)]);
    assert!(!ok && !out.contains("panicked") && out.contains("--budget k7v4"), "{out}");
    let (ok, out) = kvsplit(&["calibrate", "wikitext", "--budget", "1.0", "--out-dir", s(&dir)]);
    assert!(!ok && out.contains("--budget 1.0"), "{out}");
    std::fs::remove_dir_all(dir).ok();
}
