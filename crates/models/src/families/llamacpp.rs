//! llama.cpp's GGUF conventions that every family shares: its standard tensor names (which
//! families override only module by module) and `{arch}.*` metadata keys.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use std::path::Path;

/// GGUF tensor name → HF name, for the modules every llama.cpp architecture names alike.
pub fn tensor_name(gguf: &str) -> Option<String> {
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

/// The module of a layer tensor: `attn_q` for `blk.3.attn_q.weight`.
pub fn layer_module(gguf: &str) -> Option<&str> {
    let rest = gguf.strip_prefix("blk.").and_then(|r| r.split_once('.')).map(|(_, r)| r);
    rest.and_then(|r| r.rsplit_once('.')).map(|(m, _)| m)
}

/// Layer tensor `gguf` renamed to HF module `hf` of the same layer and kind.
pub fn layer_tensor(gguf: &str, hf: &str) -> Option<String> {
    let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let (_, kind) = rest.rsplit_once('.')?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

pub fn cfg_err(path: &Path, reason: String) -> ModelError {
    ModelError::Config { path: path.to_path_buf(), reason }
}

pub fn arch_u32(g: &GgufFile, arch: &str, key: &str) -> Result<usize> {
    Ok(g.get_u32(&format!("{arch}.{key}"))? as usize)
}

pub fn arch_opt_u32(g: &GgufFile, arch: &str, key: &str) -> Result<Option<usize>> {
    Ok(g.optional(&format!("{arch}.{key}"), |g, k| g.get_u32(k))?.map(|x| x as usize))
}

pub fn arch_opt_f32(g: &GgufFile, arch: &str, key: &str) -> Result<Option<f32>> {
    Ok(g.optional(&format!("{arch}.{key}"), |g, k| g.get_f32(k))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf_keys() {
        assert_eq!(tensor_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(tensor_name("blk.0.ffn_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(tensor_name("output.weight").unwrap(), "lm_head.weight");
        assert!(tensor_name("rope_freqs.weight").is_none());
    }
}
