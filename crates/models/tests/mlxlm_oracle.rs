//! mlx-lm's own model classes as the oracle of ours (issue #21): `scripts/mlxlm-oracle.sh`
//! installs mlx[cpu] and mlx-lm 0.32.2 into a test venv and builds, for each architecture, a
//! tiny random checkpoint with the architecture's real config keys, dense (f32) and quantized
//! as mlx-community does (f16, `nn.quantize` with group 64 and 4 bits), with mlx-lm's logits at
//! every position of fixed token ids and its 16 greedy tokens after them (and a Gemma 3 that
//! stores its own output head, which mlx-lm uses). Gemma 2 soft-caps scores and logits at caps
//! that bite, and slides a window of 8 over its even layers (mlx-lm's gemma2 has no window; the
//! script adds Hugging Face's with mlx-lm's own mask and rotating cache). gpt-oss runs learned
//! sink logits, YaRN RoPE, biased experts with its clamped SwiGLU, and a sliding layer whose
//! window (8) is shorter than the sequence, in mlx-lm's layout and (f32) in Hugging Face's; and as
//! it ships, experts in MXFP4: mlx-community's layout (the rest 8-bit affine, `"mode": "mxfp4"` per
//! expert module) and OpenAI's (`*_blocks`/`*_scales`, `quant_method: mxfp4`, the rest f16). Our directory loader
//! loads the same directories and must agree, with the 16-bit (here: model dtype) cache.
//!
//! Tolerances follow from the dtypes. Our 16-bit cache stores K and V in f16 whatever the model
//! computes in (mlx-lm's cache keeps the model dtype), so even the f32 checkpoints see each
//! key and value rounded by 2^-11 relative, which reaches the logits at about that size
//! relative to the largest one per layer (two layers, and the head sums 128-256 terms): 2^-8 of
//! the largest logit. f16 (the quantized cases compute in the scales' dtype): every op output
//! rounds to 2^-11 relative, about 16 roundings from the embedding to the head, hence 2^-6.
//! With a final soft cap (Gemma 2) "largest logit" means before the cap ([`largest_raw_logit`]).
//! A wrong RoPE, norm, bias or head moves logits by their own size. Greedy tokens must match while mlx-lm's margin between its first and second
//! choice is wider than twice the tolerance (a near-tie may go either way in either engine).

use mlx_rs::{Array, Dtype};
use models::engine::Engine;
use models::generate::CacheSettings;
use models::gguf::GgufFile;
use models::load::load_dir;
use models::mlx_dir::ConvertOptions;
use models::sample::SamplerSettings;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn floats(a: &Array) -> Vec<f32> {
    a.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>().to_vec()
}

fn argmax(v: &[f32]) -> (usize, f32) {
    let best = v.iter().enumerate().fold(0, |b, (i, x)| if *x > v[b] { i } else { b });
    let second = v.iter().enumerate().filter(|(i, _)| *i != best).fold(f32::MIN, |m, (_, x)| m.max(*x));
    (best, v[best] - second)
}

/// The default model's tokenizer as `tokenizer.json` files (its vocabulary sets the tiny
/// models' `vocab_size`), then mlx-lm's checkpoints and results in `out`.
fn oracle_cases(out: &Path) -> Vec<Value> {
    let tok = out.join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    let gguf = GgufFile::open(test_support::assets::default_model()).unwrap();
    for (name, text) in models::tokenizer_json::files_from_gguf(&gguf).unwrap() {
        std::fs::write(tok.join(name), text).unwrap();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let run = Command::new("bash").arg(root.join("scripts/mlxlm-oracle.sh")).arg(out).arg(&tok).output().expect("bash runs scripts/mlxlm-oracle.sh");
    let text = String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "mlxlm-oracle.sh failed:\n{text}");
    serde_json::from_str::<Vec<Value>>(&std::fs::read_to_string(out.join("cases.json")).unwrap()).unwrap()
}

/// The largest |logit| before a final soft cap (Gemma 2): the rounding the tolerance scales
/// with happens before the cap, which passes it on unshrunk near zero (its slope is at most 1,
/// and 1 there) while squeezing the largest logits. The cap is undone with atanh; a logit
/// within f16's resolution of the cap counts as that close.
fn largest_raw_logit(logits: &[f32], final_cap: Option<f64>) -> f32 {
    let largest = logits.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    match final_cap {
        Some(cap) => (cap * (largest / cap).min(1.0 - 2f64.powi(-11)).atanh()) as f32,
        None => largest as f32,
    }
}

/// Logits at every position of `ids` from the directory `dir`, loaded as the test loads it.
fn all_logits(dir: &Path, quantized: bool, ids: &[u32]) -> Vec<f32> {
    let loaded = load_dir(dir, if quantized { Dtype::Float16 } else { Dtype::Float32 }).unwrap();
    let engine = Engine::from_loaded(loaded);
    let mut seq = engine.sequence(&CacheSettings::default(), SamplerSettings::default(), 256).unwrap();
    floats(&seq.forward(ids, false).unwrap())
}

#[test]
fn every_family_matches_mlx_lm_on_its_own_checkpoints() {
    let out: PathBuf = std::env::temp_dir().join(format!("kvsplit-mlxlm-oracle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let cases = oracle_cases(&out);
    assert!(cases.len() >= 29, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let name = c["case"].as_str().unwrap();
        let dir = out.join(name);
        let ids: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let want_greedy: Vec<usize> = c["greedy"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let reference = Array::load_safetensors(dir.join("oracle.safetensors")).unwrap().remove("logits").unwrap();
        let want = floats(&reference);
        let vocab = reference.shape()[1] as usize;
        let quantized = c["quantized"].as_bool().unwrap();
        let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let tol = if quantized { 2f32.powi(-6) } else { 2f32.powi(-8) } * largest_raw_logit(&want, config["final_logit_softcapping"].as_f64());
        // The dtype mlx-lm computed in: the checkpoint's (f16 scales for the quantized ones).
        let loaded = match load_dir(&dir, if quantized { Dtype::Float16 } else { Dtype::Float32 }) {
            Ok(l) => l,
            Err(e) => {
                failures.push(format!("{name}: our loader refused it: {e}"));
                continue;
            }
        };
        let engine = Engine::from_loaded(loaded);
        let mut seq = engine.sequence(&CacheSettings::default(), SamplerSettings::default(), 256).unwrap();
        let got = floats(&seq.forward(&ids, false).unwrap());
        assert_eq!(got.len(), want.len(), "{name}: logits shape");
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if worst > tol {
            let per_pos: Vec<String> = got.chunks(vocab).zip(want.chunks(vocab)).map(|(a, b)| format!("{:.2e}", a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max))).collect();
            eprintln!("{name}: per position {}", per_pos.join(" "));
            failures.push(format!("{name}: max |logit - mlx-lm| {worst:.3e} over the bound {tol:.3e}"));
            continue;
        }
        // Greedy: our own decode steps, compared while mlx-lm's choice is not a near-tie.
        let mut last = got[got.len() - vocab..].to_vec();
        for (step, &want_tok) in want_greedy.iter().enumerate() {
            let (tok, margin) = argmax(&last);
            if tok != want_tok {
                if margin > 2.0 * tol {
                    failures.push(format!("{name}: greedy token {step}: ours {tok}, mlx-lm {want_tok} (our margin {margin:.3e})"));
                }
                break;
            }
            last = floats(&seq.forward(&[tok as u32], true).unwrap());
        }
        // `convert` writes the MoE layouts (stacked or per-expert, dense or quantized) so that
        // they reload to the same logits, bit for bit.
        if ["mixtral", "qwen3_moe", "gpt_oss"].contains(&c["module"].as_str().unwrap()) {
            let converted = out.join(format!("{name}-converted"));
            let opts = ConvertOptions { dtype: None, quantize: None, dequantize: false, max_shard_bytes: 5_000_000_000, force: false };
            models::mlx_dir::write(models::mlx_dir::source_from_dir(&dir).unwrap(), &converted, &opts, &mut |_| {}).unwrap();
            let again = all_logits(&converted, quantized, &ids);
            if again != got {
                failures.push(format!("{name}: converted directory's logits differ from the original's"));
            }
        }
        eprintln!("{name}: max |logit diff| {worst:.2e} (bound {tol:.2e}), greedy checked");
    }
    assert!(failures.is_empty(), "{} of {} cases disagree with mlx-lm:\n{}", failures.len(), cases.len(), failures.join("\n"));
    let _ = std::fs::remove_dir_all(&out);
}
