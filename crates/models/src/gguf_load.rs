//! GGUF → [`Config`] + [`WeightMap`] with Hugging Face key names.
//!
//! This is the one place that remaps GGUF names (`blk.N.attn_q.weight`) to checkpoint names
//! (`model.layers.N.self_attn.q_proj.weight`) and undoes the Q/K row permutation that llama.cpp's
//! converter applies to `llama`-architecture checkpoints, so every family runs with the standard
//! (non-interleaved) RoPE exactly as its HF checkpoint would.
//!
//! Q4_0, Q4_1 and Q8_0 become MLX affine triplets (group 32) without loss; every other type is
//! dequantized to the compute dtype.

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::gguf::{GgmlType, GgufFile};
use crate::weights::{Weight, WeightMap};
use mlx_rs::{Array, Dtype};
use std::path::Path;

/// GGUF tensor name → HF name, for the Llama family.
pub fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// GGUF tensor name → HF name for `arch`; families differ from Llama only in a few modules.
pub fn hf_name_for(arch: &str, gguf: &str) -> Option<String> {
    let module = |hf: &str| -> Option<String> {
        let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
        let (_, kind) = rest.rsplit_once('.')?;
        Some(format!("model.layers.{layer}.{hf}.{kind}"))
    };
    let rest = gguf.strip_prefix("blk.").and_then(|r| r.split_once('.')).map(|(_, r)| r);
    let name = rest.and_then(|r| r.rsplit_once('.')).map(|(m, _)| m);
    match (arch, name) {
        // Gemma 3 normalizes before and after both sub-blocks; `ffn_norm` is the pre-MLP one.
        ("gemma3", Some("post_attention_norm")) => module("post_attention_layernorm"),
        ("gemma3", Some("ffn_norm")) => module("pre_feedforward_layernorm"),
        ("gemma3", Some("post_ffw_norm")) => module("post_feedforward_layernorm"),
        ("phi3", Some("attn_qkv")) => module("self_attn.qkv_proj"),
        // Phi-3's fused [gate; up] projection is stored as `ffn_up` with 2 * n_ff rows.
        ("phi3", Some("ffn_up")) => module("mlp.gate_up_proj"),
        _ => hf_name(gguf),
    }
}

fn cfg_err(path: &Path, reason: String) -> ModelError {
    ModelError::Config { path: path.to_path_buf(), reason }
}

/// Reads the model config from GGUF metadata.
pub fn config(g: &GgufFile) -> Result<Config> {
    let path = g.path();
    let arch = g.get_str("general.architecture")?.to_string();
    let model_type = match arch.as_str() {
        "llama" | "mistral" | "qwen2" | "qwen3" => arch.clone(),
        other => return Err(ModelError::Unsupported { path: path.into(), reason: format!("GGUF architecture '{other}'") }),
    };
    let u = |k: &str| -> Result<usize> { Ok(g.get_u32(&format!("{arch}.{k}"))? as usize) };
    let n_heads = u("attention.head_count")?;
    let hidden = u("embedding_length")?;
    let head_dim = g.optional(&format!("{arch}.attention.key_length"), |g, k| g.get_u32(k))?.map(|x| x as usize);
    let vocab = g.tensor("token_embd.weight")?.shape()[0];
    let tie = !g.tensors().iter().any(|t| t.name == "output.weight");
    let theta = g.optional(&format!("{arch}.rope.freq_base"), |g, k| g.get_f32(k))?.unwrap_or(10000.0);
    let eps = g.get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))?;
    if n_heads == 0 || hidden % n_heads != 0 && head_dim.is_none() {
        return Err(cfg_err(path, format!("head count {n_heads} does not divide hidden size {hidden}")));
    }
    Ok(Config {
        model_type,
        hidden_size: hidden,
        num_hidden_layers: u("block_count")?,
        intermediate_size: u("feed_forward_length")?,
        num_attention_heads: n_heads,
        num_key_value_heads: g
            .optional(&format!("{arch}.attention.head_count_kv"), |g, k| g.get_u32(k))?
            .map_or(n_heads, |x| x as usize),
        head_dim,
        rms_norm_eps: eps,
        rope_theta: theta,
        vocab_size: vocab,
        max_position_embeddings: u("context_length")?,
        tie_word_embeddings: tie,
        attention_bias: g.tensors().iter().any(|t| t.name == "blk.0.attn_q.bias"),
        rope_scaling: None,
        bos_token_id: g.optional("tokenizer.ggml.bos_token_id", |g, k| g.get_u32(k))?,
        eos_token_id: g.optional("tokenizer.ggml.eos_token_id", |g, k| g.get_u32(k))?.map(|x| x.into()),
    })
}

/// Row order that undoes llama.cpp's per-head (half, pair) interleave of Q/K rows.
fn unpermute_rows(rows: usize, head_dim: usize) -> Array {
    let half = head_dim / 2;
    let idx: Vec<i32> = (0..rows)
        .map(|r| {
            let (h, within) = (r / head_dim, r % head_dim);
            let (j, i) = (within / half, within % half);
            (h * head_dim + 2 * i + j) as i32
        })
        .collect();
    Array::from_slice(&idx, &[rows as i32])
}

fn take_rows(w: Weight, idx: &Array) -> Result<Weight> {
    Ok(match w {
        Weight::Dense(a) => Weight::Dense(a.take_axis(idx, 0)?),
        Weight::Quant { w, scales, biases, bits, group } => Weight::Quant {
            w: w.take_axis(idx, 0)?,
            scales: scales.take_axis(idx, 0)?,
            biases: biases.take_axis(idx, 0)?,
            bits,
            group,
        },
    })
}

/// `dense` dequantizes Q4_0/Q4_1/Q8_0 instead of keeping them as MLX triplets.
fn load_tensor(g: &GgufFile, name: &str, dtype: Dtype, dense: bool) -> Result<Weight> {
    let info = g.tensor(name)?;
    let shape: Vec<i32> = info.shape().iter().map(|&d| d as i32).collect();
    let affine = matches!(info.ggml_type, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) && shape.len() == 2;
    if affine && !dense {
        let a = g.to_mlx_affine(name)?;
        let (rows, cols) = (a.rows as i32, a.cols as i32);
        let w = Array::from_slice(&a.weight, &[rows, cols * a.bits as i32 / 32]);
        let groups = cols / crate::gguf::MLX_GROUP_SIZE as i32;
        let scales = Array::from_slice(&a.scales, &[rows, groups]).as_dtype(dtype)?;
        let biases = Array::from_slice(&a.biases, &[rows, groups]).as_dtype(dtype)?;
        return Ok(Weight::Quant { w, scales, biases, bits: a.bits as i32, group: crate::gguf::MLX_GROUP_SIZE as i32 });
    }
    let data = g.dequantize(name)?;
    Ok(Weight::Dense(Array::from_slice(&data, &shape).as_dtype(dtype)?))
}

/// Opens a GGUF model of the Llama family: config plus every tensor under its HF name, with
/// Q4_0/Q4_1/Q8_0 kept as lossless MLX triplets whatever the backend (`convert` relies on it).
pub fn load(path: &Path, dtype: Dtype) -> Result<(Config, WeightMap, GgufFile)> {
    load_llama(GgufFile::open(path)?, dtype, false)
}

fn load_llama(g: GgufFile, dtype: Dtype, dense: bool) -> Result<(Config, WeightMap, GgufFile)> {
    let cfg = config(&g)?;
    let mut map = WeightMap::new(g.path().to_path_buf());
    let permuted = cfg.model_type == "llama" || cfg.model_type == "mistral";
    for info in g.tensors() {
        let Some(hf) = hf_name(&info.name) else {
            // Kept under its GGUF name so the strict key check reports it as unexpected.
            map.insert(info.name.clone(), load_tensor(&g, &info.name, dtype, dense)?);
            continue;
        };
        let mut w = load_tensor(&g, &info.name, dtype, dense)?;
        if permuted && (hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight")) {
            let rows = info.shape()[0];
            w = take_rows(w, &unpermute_rows(rows, cfg.head_dim()))?;
        }
        map.insert(hf, w);
    }
    Ok((cfg, map, g))
}

pub use crate::config::ArchConfig;

/// Opens a GGUF model of any supported family for inference: quantized weights follow
/// [`crate::weights::dense_weights_preferred`] (quantized unless `KVSPLIT_WEIGHTS=dense`).
pub fn load_any(path: &Path, dtype: Dtype) -> Result<(ArchConfig, WeightMap, GgufFile)> {
    load_any_with(path, dtype, crate::weights::dense_weights_preferred())
}

/// Opens a GGUF model of any supported family with Q4_0/Q4_1/Q8_0 kept as lossless MLX
/// triplets whatever the backend (for `convert`).
pub fn load_any_lossless(path: &Path, dtype: Dtype) -> Result<(ArchConfig, WeightMap, GgufFile)> {
    load_any_with(path, dtype, false)
}

/// The config of any supported family from GGUF metadata alone (no tensor is read).
pub fn arch_config(g: &GgufFile) -> Result<ArchConfig> {
    Ok(match g.get_str("general.architecture")? {
        "gemma3" => ArchConfig::Gemma3(gemma3_config(g)?),
        "phi3" => ArchConfig::Phi3(phi3_config(g)?),
        _ => ArchConfig::Llama(config(g)?),
    })
}

/// `dense` dequantizes Q4_0/Q4_1/Q8_0 instead of keeping them as MLX triplets.
fn load_any_with(path: &Path, dtype: Dtype, dense: bool) -> Result<(ArchConfig, WeightMap, GgufFile)> {
    let g = GgufFile::open(path)?;
    let cfg = arch_config(&g)?;
    if let ArchConfig::Llama(_) = cfg {
        let (cfg, map, g) = load_llama(g, dtype, dense)?;
        return Ok((ArchConfig::Llama(cfg), map, g));
    }
    let arch = g.get_str("general.architecture")?.to_string();
    let mut map = WeightMap::new(path.to_path_buf());
    for info in g.tensors() {
        let hf = hf_name_for(&arch, &info.name);
        let mut w = load_tensor(&g, &info.name, dtype, dense)?;
        // llama.cpp's Gemma converter stores RMSNorm weights as `1 + w`; keep HF's `w`.
        if arch == "gemma3" && hf.as_deref().is_some_and(|n| n.ends_with("norm.weight")) {
            if let Weight::Dense(a) = w {
                w = Weight::Dense(a - Array::from_f32(1.0).as_dtype(dtype)?);
            }
        }
        // Unmapped tensors keep their GGUF name so the strict key check reports them.
        map.insert(hf.unwrap_or_else(|| info.name.clone()), w);
    }
    Ok((cfg, map, g))
}

fn arch_u32(g: &GgufFile, arch: &str, key: &str) -> Result<usize> {
    Ok(g.get_u32(&format!("{arch}.{key}"))? as usize)
}

fn arch_opt_u32(g: &GgufFile, arch: &str, key: &str) -> Result<Option<usize>> {
    Ok(g.optional(&format!("{arch}.{key}"), |g, k| g.get_u32(k))?.map(|x| x as usize))
}

fn arch_opt_f32(g: &GgufFile, arch: &str, key: &str) -> Result<Option<f32>> {
    Ok(g.optional(&format!("{arch}.{key}"), |g, k| g.get_f32(k))?)
}

/// Gemma 3 config from GGUF metadata, with llama.cpp's defaults where keys are absent:
/// every 6th layer global, local RoPE base 10 000.
pub fn gemma3_config(g: &GgufFile) -> Result<crate::gemma3::Config> {
    use crate::gguf::{MetaArray, MetaValue};
    let a = "gemma3";
    let (hidden, n_heads, n_layers) = (arch_u32(g, a, "embedding_length")?, arch_u32(g, a, "attention.head_count")?, arch_u32(g, a, "block_count")?);
    if n_heads == 0 {
        return Err(cfg_err(g.path(), "gemma3.attention.head_count is 0".into()));
    }
    let head_dim = arch_opt_u32(g, a, "attention.key_length")?.unwrap_or(hidden / n_heads);
    let sliding_window = arch_opt_u32(g, a, "attention.sliding_window")?.filter(|&w| w > 0);
    let pattern_key = format!("{a}.attention.sliding_window_pattern");
    let (pattern, layer_types) = match g.get(&pattern_key) {
        None => (6, None),
        Some(MetaValue::Array(MetaArray::Bool(v))) if v.len() == n_layers => {
            let types = v.iter().map(|&swa| if swa { "sliding_attention" } else { "full_attention" }.to_string()).collect();
            (6, Some(types))
        }
        Some(v) => match v.as_i128() {
            Some(n) if n >= 0 => (n as usize, None),
            _ => return Err(cfg_err(g.path(), format!("{pattern_key}: expected a count or {n_layers} booleans, got {}", v.type_name()))),
        },
    };
    let rope_scaling = match g.optional(&format!("{a}.rope.scaling.type"), |g, k| g.get_str(k))? {
        None | Some("none") => None,
        Some("linear") => Some(crate::gemma3::RopeScaling {
            rope_type: "linear".into(),
            factor: arch_opt_f32(g, a, "rope.scaling.factor")?.unwrap_or(1.0),
        }),
        Some(other) => return Err(ModelError::Unsupported { path: g.path().into(), reason: format!("gemma3 rope scaling '{other}'") }),
    };
    Ok(crate::gemma3::Config {
        hidden_size: hidden,
        num_hidden_layers: n_layers,
        intermediate_size: arch_u32(g, a, "feed_forward_length")?,
        num_attention_heads: n_heads,
        num_key_value_heads: arch_opt_u32(g, a, "attention.head_count_kv")?.unwrap_or(n_heads),
        head_dim,
        rms_norm_eps: g.get_f32(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
        vocab_size: g.tensor("token_embd.weight")?.shape()[0],
        rope_theta: arch_opt_f32(g, a, "rope.freq_base")?.unwrap_or(1_000_000.0),
        rope_local_base_freq: arch_opt_f32(g, a, "rope.freq_base_swa")?.unwrap_or(10_000.0),
        // As llama.cpp (after gemma_pytorch): 27B scales by hidden/heads, the others by head_dim.
        query_pre_attn_scalar: if n_layers == 62 { (hidden / n_heads) as f32 } else { head_dim as f32 },
        sliding_window,
        sliding_window_pattern: pattern,
        layer_types,
        max_position_embeddings: arch_u32(g, a, "context_length")?,
        rope_scaling,
        final_logit_softcapping: arch_opt_f32(g, a, "final_logit_softcapping")?.filter(|&c| c > 0.0),
        attn_logit_softcapping: arch_opt_f32(g, a, "attn_logit_softcapping")?.filter(|&c| c > 0.0),
    })
}

/// Phi-3 config from GGUF metadata; LongRoPE factor tensors become a `rope_scaling` entry so
/// the model refuses them by name.
pub fn phi3_config(g: &GgufFile) -> Result<crate::phi3::Config> {
    let a = "phi3";
    let (hidden, n_heads) = (arch_u32(g, a, "embedding_length")?, arch_u32(g, a, "attention.head_count")?);
    if n_heads == 0 || hidden % n_heads != 0 {
        return Err(cfg_err(g.path(), format!("head count {n_heads} does not divide hidden size {hidden}")));
    }
    let head_dim = hidden / n_heads;
    let rope_dims = arch_opt_u32(g, a, "rope.dimension_count")?.unwrap_or(head_dim);
    let has = |name: &str| g.tensors().iter().any(|t| t.name == name);
    Ok(crate::phi3::Config {
        hidden_size: hidden,
        num_hidden_layers: arch_u32(g, a, "block_count")?,
        intermediate_size: arch_u32(g, a, "feed_forward_length")?,
        num_attention_heads: n_heads,
        num_key_value_heads: arch_opt_u32(g, a, "attention.head_count_kv")?.unwrap_or(n_heads),
        rms_norm_eps: g.get_f32(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
        rope_theta: arch_opt_f32(g, a, "rope.freq_base")?.unwrap_or(10_000.0),
        vocab_size: g.tensor("token_embd.weight")?.shape()[0],
        max_position_embeddings: arch_u32(g, a, "context_length")?,
        tie_word_embeddings: !has("output.weight"),
        partial_rotary_factor: rope_dims as f32 / head_dim as f32,
        rope_scaling: has("rope_factors_long.weight").then(|| serde_json::json!({"type": "longrope"})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf_keys() {
        assert_eq!(hf_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.ffn_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn family_names_override_only_their_modules() {
        assert_eq!(hf_name_for("gemma3", "blk.2.ffn_norm.weight").unwrap(), "model.layers.2.pre_feedforward_layernorm.weight");
        assert_eq!(hf_name_for("gemma3", "blk.2.post_ffw_norm.weight").unwrap(), "model.layers.2.post_feedforward_layernorm.weight");
        assert_eq!(hf_name_for("gemma3", "blk.0.post_attention_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(hf_name_for("gemma3", "blk.0.attn_q_norm.weight").unwrap(), "model.layers.0.self_attn.q_norm.weight");
        assert_eq!(hf_name_for("phi3", "blk.1.attn_qkv.weight").unwrap(), "model.layers.1.self_attn.qkv_proj.weight");
        assert_eq!(hf_name_for("phi3", "blk.1.ffn_up.weight").unwrap(), "model.layers.1.mlp.gate_up_proj.weight");
        assert_eq!(hf_name_for("llama", "blk.1.ffn_up.weight").unwrap(), "model.layers.1.mlp.up_proj.weight");
        assert_eq!(hf_name_for("llama", "blk.1.ffn_norm.weight").unwrap(), "model.layers.1.post_attention_layernorm.weight");
    }

    #[test]
    fn unpermute_inverts_the_converter_interleave() {
        // Converter: gguf_row(h, i, j) = hf_row(h, j, i) for head_dim 4 (half 2).
        let idx = unpermute_rows(8, 4);
        let got: Vec<i32> = idx.as_slice::<i32>().to_vec();
        assert_eq!(got, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }
}
