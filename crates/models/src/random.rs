//! Random-weight models with real architectures' shapes, built where they run.
//!
//! Decode speed does not depend on weight values, so speed runs on the lent GPU use a model of
//! Llama-3.1-8B's (or another preset's) exact shapes whose weights are drawn on the device:
//! a GPU call carries at most 64 MiB, far less than 8B parameters. Quality numbers need real
//! weights; nothing here is meant for them.
//!
//! Weights are N(0, 0.02²) (the usual initialiser scale, so activations stay finite through 32
//! layers in f16) and norms are ones. Each tensor is evaluated as soon as it exists, so peak
//! memory is the model plus one tensor's float draw.

use crate::error::{ModelError, Result};
use crate::families::llama::{self, Config};
use crate::families::qwen3_moe;
use crate::model::LanguageModel;
use crate::weights::{Weight, WeightMap};
use mlx_rs::ops::quantize;
use mlx_rs::{random, Array, Dtype};
use std::path::PathBuf;

/// How the random linear and embedding weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomWeights {
    /// Plain float in the compute dtype.
    Float,
    /// MLX affine quantization at this many bits, group 64 (what mlx-lm's 4-bit models use).
    Quant(i32),
}

impl std::str::FromStr for RandomWeights {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" | "float" => Ok(RandomWeights::Float),
            "q4" => Ok(RandomWeights::Quant(4)),
            "q8" => Ok(RandomWeights::Quant(8)),
            other => Err(ModelError::Invalid { flag: "--random-weights", message: format!("'{other}' is not one of f16, q4, q8") }),
        }
    }
}

/// Group size of quantized random weights.
const WEIGHT_GROUP: i32 = 64;
/// Standard deviation of the random weights.
const WEIGHT_STD: f32 = 0.02;

/// Names accepted by [`preset`] (Llama-family shapes; also what `write_random_gguf` writes).
pub const PRESETS: &[&str] = &["llama3.1-8b", "qwen2.5-7b", "tiny"];

/// Mixture-of-experts presets, accepted by [`model`] beside [`PRESETS`]. `tiny-moe` is a
/// 2-layer toy (8 experts, top 2) for tests on the CPU.
pub const MOE_PRESETS: &[&str] = &["qwen3-30b-a3b", "tiny-moe"];

/// The `config.json` of a Qwen3-MoE preset.
pub fn moe_preset(name: &str) -> Result<qwen3_moe::Config> {
    let json = match name {
        // Qwen/Qwen3-30B-A3B config.json: 48 layers, each a 128-expert block choosing 8 experts
        // of width 768, 32 q heads over 4 KV heads of 128.
        "qwen3-30b-a3b" => serde_json::json!({
            "hidden_size": 2048, "num_hidden_layers": 48, "intermediate_size": 6144, "moe_intermediate_size": 768,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
            "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": true,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936, "max_position_embeddings": 40960,
            "tie_word_embeddings": false
        }),
        "tiny-moe" => serde_json::json!({
            "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512, "moe_intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8,
            "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [1], "norm_topk_prob": true,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 1000, "max_position_embeddings": 40960,
            "tie_word_embeddings": true
        }),
        other => return Err(unknown(other)),
    };
    serde_json::from_value(json).map_err(|e| ModelError::Invalid { flag: "--random-model", message: format!("preset '{name}': {e}") })
}

fn unknown(name: &str) -> ModelError {
    ModelError::Invalid { flag: "--random-model", message: format!("unknown preset '{name}'; use one of {PRESETS:?} or {MOE_PRESETS:?}") }
}

/// Vocabulary size of any preset (for synthetic token ids).
pub fn vocab_size(name: &str) -> Result<usize> {
    match MOE_PRESETS.contains(&name) {
        true => Ok(moe_preset(name)?.vocab_size),
        false => Ok(preset(name)?.vocab_size),
    }
}

/// The `config.json` of a known architecture, by preset name. `tiny` is a 2-layer toy of the
/// same family (GQA 4:2, head_dim 64) for tests on the CPU.
pub fn preset(name: &str) -> Result<Config> {
    let json = match name {
        // meta-llama/Llama-3.1-8B config.json (the fields our Config reads).
        "llama3.1-8b" => serde_json::json!({
            "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "vocab_size": 128256, "max_position_embeddings": 131072,
            "tie_word_embeddings": false,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}
        }),
        // Qwen/Qwen2.5-7B config.json: 28 q heads over 4 KV heads (7 query rows per KV head).
        "qwen2.5-7b" => serde_json::json!({
            "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944,
            "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "vocab_size": 152064, "max_position_embeddings": 131072, "tie_word_embeddings": false
        }),
        "tiny" => serde_json::json!({
            "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5,
            "vocab_size": 1000, "max_position_embeddings": 131072, "tie_word_embeddings": true
        }),
        other => return Err(unknown(other)),
    };
    serde_json::from_value(json).map_err(|e| ModelError::Invalid { flag: "--random-model", message: format!("preset '{name}': {e}") })
}

/// The widths that fix every tensor's shape.
struct Dims {
    hidden: usize,
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
    inter: usize,
    vocab: usize,
    /// Experts and each expert's width (zero for dense models).
    experts: usize,
    expert_inter: usize,
}

impl Dims {
    fn llama(cfg: &Config) -> Self {
        let (hidden, head_dim, heads, kv_heads) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.num_key_value_heads);
        Dims { hidden, head_dim, heads, kv_heads, inter: cfg.intermediate_size, vocab: cfg.vocab_size, experts: 0, expert_inter: 0 }
    }

    fn qwen3_moe(cfg: &qwen3_moe::Config) -> Self {
        Dims {
            hidden: cfg.hidden_size,
            head_dim: cfg.head_dim,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            inter: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            experts: cfg.num_experts,
            expert_inter: cfg.moe_intermediate_size,
        }
    }
}

/// Logical shape of checkpoint tensor `name` in a model of `dims` (Llama-family names, and
/// mlx-lm's stacked `switch_mlp` experts with their router `mlp.gate`).
fn shape_of(dims: &Dims, name: &str) -> Option<Vec<usize>> {
    let (h, d, f, v) = (dims.hidden, dims.head_dim, dims.inter, dims.vocab);
    let (q, kv) = (dims.heads * d, dims.kv_heads * d);
    let leaf = name.rsplit('.').nth(1)?;
    let bias = name.ends_with(".bias");
    if name.contains(".switch_mlp.") && !bias {
        let (e, m) = (dims.experts, dims.expert_inter);
        return Some(if leaf == "down_proj" { vec![e, h, m] } else { vec![e, m, h] });
    }
    Some(match (leaf, bias) {
        ("gate", false) if dims.experts > 0 => vec![dims.experts, h],
        ("embed_tokens" | "lm_head", false) => vec![v, h],
        ("q_proj", false) => vec![q, h],
        ("k_proj" | "v_proj", false) => vec![kv, h],
        ("q_proj", true) => vec![q],
        ("k_proj" | "v_proj", true) => vec![kv],
        ("o_proj", false) => vec![h, q],
        ("gate_proj" | "up_proj", false) => vec![f, h],
        ("down_proj", false) => vec![h, f],
        ("q_norm" | "k_norm", false) => vec![d],
        ("input_layernorm" | "post_attention_layernorm" | "norm", false) => vec![h],
        _ => return None,
    })
}

/// Every tensor of a Llama-family checkpoint of `cfg`, drawn at random on the default device.
pub fn weights(cfg: &Config, kind: RandomWeights, dtype: Dtype, seed: u64) -> Result<WeightMap> {
    draw(&cfg.model_type, &llama::expected_keys(cfg), &Dims::llama(cfg), kind, dtype, seed)
}

/// Tensors `keys` of a model of `dims`, drawn at random; quantized ones (linear layers and
/// stacked experts alike) along their input axis.
fn draw(model_type: &str, keys: &[String], dims: &Dims, kind: RandomWeights, dtype: Dtype, seed: u64) -> Result<WeightMap> {
    let mut map = WeightMap::new(PathBuf::from(format!("<random {model_type} weights>")));
    let mut key = random::key(seed)?;
    for name in keys {
        let shape = shape_of(dims, name)
            .ok_or_else(|| ModelError::Unsupported { path: map.source.clone(), reason: format!("no random shape for tensor '{name}'") })?;
        let dims: Vec<i32> = shape.iter().map(|&x| x as i32).collect();
        let w = if name.ends_with("norm.weight") {
            Weight::Dense(Array::ones::<f32>(&dims)?.as_dtype(dtype)?)
        } else {
            let (next, k) = random::split(&key, 2)?;
            key = next;
            let x = random::normal::<f32>(&dims, None, WEIGHT_STD, &k)?.as_dtype(dtype)?;
            match kind {
                RandomWeights::Quant(bits) if dims.len() >= 2 => {
                    let (w, scales, biases) = quantize(&x, WEIGHT_GROUP, bits)?;
                    Weight::Quant { w, scales, biases, bits, group: WEIGHT_GROUP }
                }
                _ => Weight::Dense(x),
            }
        };
        mlx_rs::transforms::eval(w.arrays())?;
        map.insert(name.clone(), w);
    }
    Ok(map)
}

/// A random-weight model of preset `name` ([`PRESETS`] or [`MOE_PRESETS`]).
pub fn model(name: &str, kind: RandomWeights, dtype: Dtype, seed: u64) -> Result<Box<dyn LanguageModel>> {
    if MOE_PRESETS.contains(&name) {
        let cfg = moe_preset(name)?;
        let w = draw("qwen3_moe", &cfg.expected_keys(), &Dims::qwen3_moe(&cfg), kind, dtype, seed)?;
        return Ok(Box::new(qwen3_moe::Model::new(cfg, w, dtype)?));
    }
    let cfg = preset(name)?;
    let w = weights(&cfg, kind, dtype, seed)?;
    Ok(Box::new(llama::Model::new(cfg, w, dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_kv::{CacheOptions, KvCache, KvSpec};

    #[test]
    fn presets_have_the_published_shapes() {
        let c = preset("llama3.1-8b").unwrap();
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim()), (4096, 32, 32, 8, 128));
        assert_eq!((c.intermediate_size, c.vocab_size), (14336, 128256));
        let q = preset("qwen2.5-7b").unwrap();
        assert_eq!((q.head_dim(), q.num_attention_heads / q.num_key_value_heads), (128, 7));
        assert!(q.has_qkv_bias());
        assert!(preset("llama-9000").unwrap_err().to_string().starts_with("--random-model"));
        assert!("q3".parse::<RandomWeights>().unwrap_err().to_string().starts_with("--random-weights"));
    }

    #[test]
    fn every_expected_key_has_a_shape() {
        for p in PRESETS {
            let cfg = preset(p).unwrap();
            for k in llama::expected_keys(&cfg) {
                assert!(shape_of(&Dims::llama(&cfg), &k).is_some(), "{p}: {k}");
            }
        }
        for p in MOE_PRESETS {
            let cfg = moe_preset(p).unwrap();
            for k in cfg.expected_keys() {
                assert!(shape_of(&Dims::qwen3_moe(&cfg), &k).is_some(), "{p}: {k}");
            }
        }
    }

    /// Qwen3-30B-A3B's published size: 30.5B parameters, 3.3B of them active per token.
    #[test]
    fn moe_preset_has_the_published_size() {
        let cfg = moe_preset("qwen3-30b-a3b").unwrap();
        let dims = Dims::qwen3_moe(&cfg);
        let count = |k: &String| shape_of(&dims, k).unwrap().iter().product::<usize>();
        let total: usize = cfg.expected_keys().iter().map(count).sum();
        assert!((30.4e9..30.6e9).contains(&(total as f64)), "{total}");
        let per_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size;
        let inactive = cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert;
        assert!((3.2e9..3.4e9).contains(&((total - inactive) as f64)), "{}", total - inactive);
        assert_eq!(vocab_size("qwen3-30b-a3b").unwrap(), 151936);
        assert!(vocab_size("mixtral-9000").unwrap_err().to_string().contains("tiny-moe"));
    }

    /// The tiny preset builds in every weight kind and decodes finite logits through a
    /// quantized cache (the path the GPU speed runs take).
    #[test]
    fn tiny_model_decodes_finite_logits() {
        for (name, kind) in [("tiny", RandomWeights::Float), ("tiny", RandomWeights::Quant(4)), ("tiny-moe", RandomWeights::Quant(4))] {
            let m = model(name, kind, Dtype::Float32, 7).unwrap();
            let mut caches: Vec<KvCache> =
                (0..m.n_layers()).map(|_| KvCache::new(KvSpec::bits(8, 4), m.head_dim(), CacheOptions::default()).unwrap()).collect();
            let ids = Array::from_slice(&[1i32, 2, 3, 4, 5, 6, 7, 8], &[1, 8]);
            let _ = m.forward(&ids, &mut caches, true).unwrap();
            let logits = m.forward(&Array::from_slice(&[9i32], &[1, 1]), &mut caches, true).unwrap();
            assert_eq!(logits.shape(), &[1, 1, 1000]);
            let v = logits.as_dtype(Dtype::Float32).unwrap();
            assert!(v.as_slice::<f32>().iter().all(|x| x.is_finite()), "{name} {kind:?}: non-finite logits");
            assert_eq!(caches[0].len(), 9);
        }
    }
}
