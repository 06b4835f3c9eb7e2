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

fn load_tensor(g: &GgufFile, name: &str, dtype: Dtype) -> Result<Weight> {
    let info = g.tensor(name)?;
    let shape: Vec<i32> = info.shape().iter().map(|&d| d as i32).collect();
    if matches!(info.ggml_type, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) && shape.len() == 2 {
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

/// Opens a GGUF model: config plus every tensor under its HF name.
pub fn load(path: &Path, dtype: Dtype) -> Result<(Config, WeightMap, GgufFile)> {
    let g = GgufFile::open(path)?;
    let cfg = config(&g)?;
    let mut map = WeightMap::new(path.to_path_buf());
    let permuted = cfg.model_type == "llama" || cfg.model_type == "mistral";
    for info in g.tensors() {
        let Some(hf) = hf_name(&info.name) else {
            // Kept under its GGUF name so the strict key check reports it as unexpected.
            map.insert(info.name.clone(), load_tensor(&g, &info.name, dtype)?);
            continue;
        };
        let mut w = load_tensor(&g, &info.name, dtype)?;
        if permuted && (hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight")) {
            let rows = info.shape()[0];
            w = take_rows(w, &unpermute_rows(rows, cfg.head_dim()))?;
        }
        map.insert(hf, w);
    }
    Ok((cfg, map, g))
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
    fn unpermute_inverts_the_converter_interleave() {
        // Converter: gguf_row(h, i, j) = hf_row(h, j, i) for head_dim 4 (half 2).
        let idx = unpermute_rows(8, 4);
        let got: Vec<i32> = idx.as_slice::<i32>().to_vec();
        assert_eq!(got, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }
}
