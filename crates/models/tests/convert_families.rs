//! GGUF → MLX directory → load for the families beyond Llama, and the directory loaders of
//! Gemma 3 and Phi-3.
//!
//! Real weights (scripts/fetch-models.sh): Gemma-3-270M and Qwen2.5-Coder-0.5B, both Q4_K_M.
//! `convert` dequantizes their k-quant and Q5_0 tensors to f32 (exact) and carries Q8_0/Q4_0
//! tensors over as triplets, so the directory must give the logits of the GGUF model read the
//! same way bit for bit, and the same greedy tokens. Phi-3 has no registry weights: a tiny random checkpoint in the Hugging Face layout
//! (fused `qkv_proj` and `gate_up_proj`) tests its directory loader and converter instead.

use mlx_rs::{Array, Dtype};
use models::generate::{prefill, CacheSettings};
use models::mlx_dir::{self, ConvertOptions};
use models::load::{load_dir, model_id, Loaded};
use models::tokenizer::Tokenizer;
use models::load::safetensors;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const GREEDY_TOKENS: usize = 8;

fn model(name: &str) -> PathBuf {
    test_support::assets::model(name)
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvsplit-convfam-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts() -> ConvertOptions {
    ConvertOptions { dtype: None, quantize: None, dequantize: false, max_shard_bytes: 5_000_000_000, force: false }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold(0, |b, (i, x)| if *x > v[b] { i } else { b }) as u32
}

/// Last-position logits of `prompt`, then `n` greedy tokens.
fn run(m: &Loaded, prompt: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let mut caches = CacheSettings::default().build(m.model.as_ref(), 256).unwrap();
    let mut logits = prefill(m.model.as_ref(), &mut caches, prompt, 256).unwrap();
    let first = logits.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>().to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(logits.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>());
        out.push(next);
        logits = prefill(m.model.as_ref(), &mut caches, &[next], 1).unwrap();
    }
    (first, out)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn config_json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// The GGUF model with the tensors as `convert` reads them. Inference loading (`load_gguf`) keeps
/// the k-quants and Q5_x packed too, with the same weights in another summation order, which is
/// not what a lossless conversion is checked against.
fn load_gguf_as_converted(path: &Path, dtype: Dtype) -> Loaded {
    let (cfg, weights, gguf) = models::load::gguf::load_any_lossless(path, dtype).unwrap();
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let model = cfg.build(weights, dtype).unwrap();
    Loaded { model, tokenizer, id: model_id(path).unwrap() }
}

/// Converts `file` losslessly and checks the directory against the GGUF: model_type, prompt
/// ids, logits (max abs diff 0) and greedy tokens.
fn lossless_round_trip(file: &str, model_type: &str, prompt: &str) -> Vec<u32> {
    let gguf = model(file);
    let out = temp_dir(model_type).join("m");
    let src = mlx_dir::source_from_gguf(&gguf).unwrap();
    mlx_dir::write(src, &out, &opts(), &mut |_| {}).unwrap();
    let config = config_json(&out);
    assert_eq!(config["model_type"], model_type);
    if model_type == "gemma3_text" {
        // transformers (and so mlx-lm) rejects a float here.
        assert!(config["query_pre_attn_scalar"].is_u64(), "{}", config["query_pre_attn_scalar"]);
    }

    let (ids, want_logits, want_tokens) = {
        let g = load_gguf_as_converted(&gguf, Dtype::Float32);
        let ids = g.tokenizer.encode(prompt, true);
        let (l, t) = run(&g, &ids, GREEDY_TOKENS);
        (ids, l, t)
    };
    let d = load_dir(&out, Dtype::Float32).unwrap();
    assert_eq!(d.tokenizer.encode(prompt, true), ids, "{file}: the directory's tokenizer encodes the prompt differently");
    let (got_logits, got_tokens) = run(&d, &ids, GREEDY_TOKENS);
    assert_eq!(max_abs_diff(&want_logits, &got_logits), 0.0, "{file}: logits differ");
    assert_eq!(got_tokens, want_tokens, "{file}: greedy tokens differ");
    std::fs::remove_dir_all(out.parent().unwrap()).ok();
    eprintln!("{file}: {:?} -> {:?}", prompt, d.tokenizer.decode(&got_tokens));
    got_tokens
}

#[test]
fn gemma3_gguf_to_mlx_dir_is_lossless() {
    lossless_round_trip("gemma-3-270m-q4_k_m.gguf", "gemma3_text", "The Eiffel Tower is located in the city of");
}

#[test]
fn qwen2_gguf_to_mlx_dir_is_lossless() {
    lossless_round_trip("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2", "def fibonacci(n):");
}

// ---- Phi-3: a tiny random checkpoint in the Hugging Face layout ----

const PHI3_HIDDEN: usize = 32;
const PHI3_LAYERS: usize = 2;
const PHI3_FF: usize = 48;
const PHI3_HEADS: usize = 4;
const PHI3_KV_HEADS: usize = 2;
const PHI3_VOCAB: usize = 40;

/// `config.json` as Hugging Face writes it for Phi-3 (fields we do not use included).
fn phi3_config() -> Value {
    json!({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
        "hidden_size": PHI3_HIDDEN, "num_hidden_layers": PHI3_LAYERS, "intermediate_size": PHI3_FF,
        "num_attention_heads": PHI3_HEADS, "num_key_value_heads": PHI3_KV_HEADS, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "vocab_size": PHI3_VOCAB, "max_position_embeddings": 128,
        "original_max_position_embeddings": 128, "partial_rotary_factor": 0.5, "rope_scaling": null,
        "sliding_window": 2047, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32"
    })
}

/// Random tensors with the checkpoint's names and shapes (norm weights near 1).
fn phi3_tensors() -> Vec<(String, Array)> {
    let (h, f, d) = (PHI3_HIDDEN as i32, PHI3_FF as i32, (PHI3_HIDDEN / PHI3_HEADS) as i32);
    let qkv = (PHI3_HEADS + 2 * PHI3_KV_HEADS) as i32 * d;
    let mut shapes: Vec<(String, Vec<i32>)> = vec![
        ("model.embed_tokens.weight".into(), vec![PHI3_VOCAB as i32, h]),
        ("lm_head.weight".into(), vec![PHI3_VOCAB as i32, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for i in 0..PHI3_LAYERS {
        let p = format!("model.layers.{i}");
        shapes.push((format!("{p}.self_attn.qkv_proj.weight"), vec![qkv, h]));
        shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![h, PHI3_HEADS as i32 * d]));
        shapes.push((format!("{p}.mlp.gate_up_proj.weight"), vec![2 * f, h]));
        shapes.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    let mut key = mlx_rs::random::key(3).unwrap();
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let (k1, k2) = mlx_rs::random::split(&key, 2).unwrap();
            key = k1;
            let (loc, scale) = if shape.len() == 1 { (1.0, 0.1) } else { (0.0, (shape[1] as f32).powf(-0.5)) };
            (name, mlx_rs::random::normal::<f32>(&shape[..], loc, scale, &k2).unwrap())
        })
        .collect()
}

/// A word-level vocabulary of single letters: enough for the loader, which needs a tokenizer.
fn tiny_tokenizer() -> Value {
    let vocab: serde_json::Map<String, Value> =
        (0..PHI3_VOCAB).map(|i| (format!("t{i}"), json!(i))).collect();
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}})
}

fn write_phi3_dir(dir: &Path, config: &Value, tensors: Vec<(String, Array)>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer().to_string()).unwrap();
    let map: HashMap<String, Array> = tensors.into_iter().collect();
    Array::save_safetensors(map, None::<&HashMap<String, String>>, dir.join("model.safetensors")).unwrap();
}

fn all_logits(m: &Loaded, ids: &[i32]) -> Array {
    let mut caches = CacheSettings::default().build(m.model.as_ref(), 64).unwrap();
    let x = Array::from_slice(ids, &[1, ids.len() as i32]);
    m.model.forward(&x, &mut caches, false).unwrap()
}

const PHI3_IDS: [i32; 6] = [1, 7, 22, 39, 5, 13];

#[test]
fn phi3_directory_loads_and_converts_without_loss() {
    let root = temp_dir("phi3");
    let src = root.join("hf");
    write_phi3_dir(&src, &phi3_config(), phi3_tensors());
    let m = load_dir(&src, Dtype::Float32).unwrap();
    assert_eq!(m.model.family(), "phi3");
    assert_eq!((m.model.n_layers(), m.model.n_kv_heads(), m.model.head_dim()), (PHI3_LAYERS, PHI3_KV_HEADS, PHI3_HIDDEN / PHI3_HEADS));
    let logits = all_logits(&m, &PHI3_IDS);
    assert_eq!(logits.shape(), &[1, PHI3_IDS.len() as i32, PHI3_VOCAB as i32]);
    let want = logits.as_slice::<f32>().to_vec();
    assert!(want.iter().all(|x| x.is_finite()));

    // HF directory → MLX directory, no quantization: the same model exactly.
    let out = root.join("mlx");
    mlx_dir::write(mlx_dir::source_from_dir(&src).unwrap(), &out, &opts(), &mut |_| {}).unwrap();
    let cfg = config_json(&out);
    assert_eq!((cfg["model_type"].as_str(), cfg["partial_rotary_factor"].as_f64()), (Some("phi3"), Some(0.5)));
    let converted = load_dir(&out, Dtype::Float32).unwrap();
    let got = all_logits(&converted, &PHI3_IDS).as_slice::<f32>().to_vec();
    assert_eq!(max_abs_diff(&want, &got), 0.0);
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn phi3_directory_reports_every_missing_and_unexpected_key_and_bad_shapes() {
    let root = temp_dir("phi3-keys");
    let dir = root.join("m");
    let mut tensors = phi3_tensors();
    tensors.retain(|(n, _)| n != "model.layers.1.mlp.gate_up_proj.weight" && n != "lm_head.weight");
    // Unfused names, as a Llama-style export would write them, are not Phi-3 keys.
    tensors.push(("model.layers.0.self_attn.q_proj.weight".into(), Array::zeros::<f32>(&[32, 32]).unwrap()));
    write_phi3_dir(&dir, &phi3_config(), tensors);
    let e = load_dir(&dir, Dtype::Float32).err().expect("must fail").to_string();
    for key in ["model.layers.1.mlp.gate_up_proj.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"] {
        assert!(e.contains(key), "{key} not reported: {e}");
    }

    let mut tensors = phi3_tensors();
    let qkv = tensors.iter_mut().find(|(n, _)| n == "model.layers.0.self_attn.qkv_proj.weight").unwrap();
    qkv.1 = Array::zeros::<f32>(&[40, PHI3_HIDDEN as i32]).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    write_phi3_dir(&dir, &phi3_config(), tensors);
    let e = load_dir(&dir, Dtype::Float32).err().expect("must fail").to_string();
    assert!(e.contains("model.layers.0.self_attn.qkv_proj.weight") && e.contains("[40, 32]") && e.contains("[64, 32]"), "{e}");

    // LongRoPE is refused by name rather than run with the wrong positions.
    let mut cfg = phi3_config();
    cfg["rope_scaling"] = json!({"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]});
    std::fs::remove_dir_all(&dir).unwrap();
    write_phi3_dir(&dir, &cfg, phi3_tensors());
    let e = load_dir(&dir, Dtype::Float32).err().expect("must fail").to_string();
    assert!(e.contains("longrope"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn unknown_model_type_is_named() {
    let dir = temp_dir("unknown").join("m");
    let mut cfg = phi3_config();
    cfg["model_type"] = json!("mamba");
    write_phi3_dir(&dir, &cfg, phi3_tensors());
    let e = safetensors::read_dir_config(&dir).expect_err("must fail").to_string();
    assert!(e.contains("mamba") && e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(dir.parent().unwrap()).ok();
}

/// gpt-oss has no registry weights either: a tiny random checkpoint in mlx-lm's layout
/// (stacked, biased experts; learned sinks; a sliding layer of window 4 and a full one).
fn gpt_oss_config() -> Value {
    json!({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 64,
        "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "num_local_experts": 4, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 150000.0, "vocab_size": PHI3_VOCAB, "sliding_window": 4, "max_position_embeddings": 128,
        "layer_types": ["sliding_attention", "full_attention"], "swiglu_limit": 7.0, "tie_word_embeddings": false,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "truncate": false},
        "torch_dtype": "float32"
    })
}

fn gpt_oss_tensors() -> Vec<(String, Array)> {
    let (h, i, e, d, nq, nkv, v) = (64, 64, 4, 64, 4, 2, PHI3_VOCAB as i32);
    let mut shapes: Vec<(String, Vec<i32>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("lm_head.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (n, out, inp) in [("q_proj", nq * d, h), ("k_proj", nkv * d, h), ("v_proj", nkv * d, h), ("o_proj", h, nq * d)] {
            shapes.push((format!("{p}.self_attn.{n}.weight"), vec![out, inp]));
            shapes.push((format!("{p}.self_attn.{n}.bias"), vec![out]));
        }
        shapes.push((format!("{p}.self_attn.sinks"), vec![nq]));
        shapes.push((format!("{p}.mlp.router.weight"), vec![e, h]));
        shapes.push((format!("{p}.mlp.router.bias"), vec![e]));
        for (n, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            shapes.push((format!("{p}.mlp.experts.{n}.weight"), vec![e, out, inp]));
            shapes.push((format!("{p}.mlp.experts.{n}.bias"), vec![e, out]));
        }
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    let mut key = mlx_rs::random::key(5).unwrap();
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let (k1, k2) = mlx_rs::random::split(&key, 2).unwrap();
            key = k1;
            let (loc, scale) = match shape.len() {
                1 if name.ends_with("norm.weight") => (1.0, 0.1),
                1 | 2 if name.ends_with(".bias") || name.ends_with("sinks") => (0.0, 1.0),
                _ => (0.0, (shape[shape.len() - 1] as f32).powf(-0.5)),
            };
            (name, mlx_rs::random::normal::<f32>(&shape[..], loc, scale, &k2).unwrap())
        })
        .collect()
}

/// Loads, converts (as is, then quantized to 4 bits) and decodes past the window with the
/// split-precision cache (k8v4) and the 16-bit one.
#[test]
fn gpt_oss_directory_loads_converts_and_decodes_with_split_caches() {
    let root = temp_dir("gpt-oss");
    let src = root.join("mlx");
    write_phi3_dir(&src, &gpt_oss_config(), gpt_oss_tensors());
    let m = load_dir(&src, Dtype::Float32).unwrap();
    assert_eq!((m.model.family(), m.model.n_layers(), m.model.head_dim()), ("gpt_oss", 2, 64));
    assert_eq!((m.model.layer_window(0), m.model.layer_window(1)), (Some(4), None));
    let want = all_logits(&m, &PHI3_IDS).as_slice::<f32>().to_vec();
    assert!(want.iter().all(|x| x.is_finite()));

    let out = root.join("converted");
    mlx_dir::write(mlx_dir::source_from_dir(&src).unwrap(), &out, &opts(), &mut |_| {}).unwrap();
    assert_eq!(config_json(&out)["model_type"].as_str(), Some("gpt_oss"));
    let got = all_logits(&load_dir(&out, Dtype::Float32).unwrap(), &PHI3_IDS).as_slice::<f32>().to_vec();
    assert_eq!(max_abs_diff(&want, &got), 0.0);

    let q4 = root.join("q4");
    let plan = mlx_dir::QuantPlan::uniform(safetensors::QuantSpec { bits: 4, group: 64 });
    let report = mlx_dir::write(mlx_dir::source_from_dir(&src).unwrap(), &q4, &ConvertOptions { quantize: Some(plan), ..opts() }, &mut |_| {}).unwrap();
    assert!(report.quantized > 0);
    let quantized = load_dir(&q4, Dtype::Float32).unwrap();

    for (name, model) in [("f32", &m), ("q4", &quantized)] {
        for kv in ["8,4", "fp16"] {
            let settings = CacheSettings { spec: mlx_kv::KvSpec::parse(kv).unwrap(), ..CacheSettings::default() };
            let mut caches = settings.build(model.model.as_ref(), 256).unwrap();
            let prompt: Vec<u32> = PHI3_IDS.iter().map(|&x| x as u32).collect();
            let mut logits = prefill(model.model.as_ref(), &mut caches, &prompt, 256).unwrap();
            for _ in 0..GREEDY_TOKENS {
                let v = logits.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>().to_vec();
                assert!(v.iter().all(|x| x.is_finite()), "{name} --kv {kv}: non-finite logits");
                logits = prefill(model.model.as_ref(), &mut caches, &[argmax(&v)], 1).unwrap();
            }
            assert_eq!(caches[0].offset(), PHI3_IDS.len() + GREEDY_TOKENS, "{name} --kv {kv}");
        }
    }

    // NVIDIA's nvfp4 (a global scale per tensor) is refused naming the key and the mode; the
    // mlx-lm oracle test loads mxfp4 checkpoints.
    let mxfp4 = root.join("nvfp4");
    let mut cfg = gpt_oss_config();
    cfg["quantization"] = json!({"group_size": 16, "bits": 4, "mode": "nvfp4"});
    write_phi3_dir(&mxfp4, &cfg, gpt_oss_tensors());
    let e = load_dir(&mxfp4, Dtype::Float32).err().expect("nvfp4 must be refused").to_string();
    assert!(e.contains("quantization 'quantization': mode 'nvfp4' is not supported"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}
