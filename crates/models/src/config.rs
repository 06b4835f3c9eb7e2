//! Model configuration. Field names are the Hugging Face `config.json` names, so MLX/HF
//! checkpoints deserialize directly; GGUF metadata is mapped onto the same struct.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f32>,
    #[serde(default)]
    pub low_freq_factor: Option<f32>,
    #[serde(default)]
    pub high_freq_factor: Option<f32>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    pub vocab_size: usize,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_theta() -> f32 {
    10000.0
}

fn default_ctx() -> usize {
    4096
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Qwen2 checkpoints omit `attention_bias` but always have q/k/v biases.
    pub fn has_qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    /// Qwen3 normalizes q and k per head before RoPE.
    pub fn has_qk_norm(&self) -> bool {
        self.model_type == "qwen3"
    }
}

/// A model's config by family: which model file builds it. GGUF metadata and `config.json`
/// both become one of these; `config.json`'s `model_type` names the family.
#[derive(Debug, Clone, PartialEq)]
pub enum ArchConfig {
    /// `llama`, `mistral`, `qwen2`, `qwen3` (the `model_type` is inside the config).
    Llama(Config),
    /// `gemma3_text`.
    Gemma3(crate::gemma3::Config),
    /// `phi3`.
    Phi3(crate::phi3::Config),
}

/// `model_type` values of the Llama file.
pub const LLAMA_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

impl ArchConfig {
    /// Parses a `config.json` value; an unknown `model_type` is an error naming it.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let model_type = v.get("model_type").and_then(serde_json::Value::as_str).ok_or("no 'model_type' string")?;
        let err = |e: serde_json::Error| format!("model_type '{model_type}': {e}");
        Ok(match model_type {
            t if LLAMA_TYPES.contains(&t) => ArchConfig::Llama(serde_json::from_value(v.clone()).map_err(err)?),
            "gemma3_text" => ArchConfig::Gemma3(serde_json::from_value(v.clone()).map_err(err)?),
            "phi3" => ArchConfig::Phi3(serde_json::from_value(v.clone()).map_err(err)?),
            // The multimodal wrapper nests the text model under `text_config` and
            // `language_model.` keys; only the text model is supported.
            "gemma3" => return Err("model_type 'gemma3' (the multimodal checkpoint) is not supported; use a gemma3_text checkpoint".into()),
            other => {
                return Err(format!("model_type '{other}' is not supported (supported: {}, gemma3_text, phi3)", LLAMA_TYPES.join(", ")))
            }
        })
    }

    /// `config.json` as Hugging Face writes it for this family (`model_type`, `architectures`
    /// and the family's field names).
    pub fn to_json(&self) -> serde_json::Value {
        let (v, model_type) = match self {
            ArchConfig::Llama(c) => (serde_json::to_value(c), c.model_type.as_str()),
            ArchConfig::Gemma3(c) => (serde_json::to_value(c), "gemma3_text"),
            ArchConfig::Phi3(c) => (serde_json::to_value(c), "phi3"),
        };
        // Structs of numbers, strings and options always serialize to an object.
        let mut obj = match v {
            Ok(serde_json::Value::Object(m)) => m,
            other => unreachable!("config serialized to {other:?}"),
        };
        let arch = match model_type {
            "llama" => "LlamaForCausalLM",
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            "gemma3_text" => "Gemma3ForCausalLM",
            _ => "Phi3ForCausalLM",
        };
        obj.insert("model_type".into(), model_type.into());
        obj.insert("architectures".into(), serde_json::json!([arch]));
        if let ArchConfig::Gemma3(c) = self {
            // Gemma 3 always ties its output head to the embedding.
            obj.insert("tie_word_embeddings".into(), true.into());
            // transformers validates this field as an integer (a float fails mlx-lm's load).
            if c.query_pre_attn_scalar.fract() == 0.0 {
                obj.insert("query_pre_attn_scalar".into(), (c.query_pre_attn_scalar as i64).into());
            }
        }
        serde_json::Value::Object(obj)
    }

    /// Whether the output head is the embedding (a stored `lm_head` is then dropped).
    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            ArchConfig::Llama(c) => c.tie_word_embeddings,
            ArchConfig::Gemma3(_) => true,
            ArchConfig::Phi3(c) => c.tie_word_embeddings,
        }
    }

    /// Width of one attention head: what each layer's KV cache stores per head and token.
    pub fn head_dim(&self) -> usize {
        match self {
            ArchConfig::Llama(c) => c.head_dim(),
            ArchConfig::Gemma3(c) => c.head_dim,
            ArchConfig::Phi3(c) => c.head_dim(),
        }
    }

    pub fn num_hidden_layers(&self) -> usize {
        match self {
            ArchConfig::Llama(c) => c.num_hidden_layers,
            ArchConfig::Gemma3(c) => c.num_hidden_layers,
            ArchConfig::Phi3(c) => c.num_hidden_layers,
        }
    }

    /// Builds the family's model from `weights` (strictly: every key used, none missing).
    pub fn build(
        self,
        weights: crate::weights::WeightMap,
        dtype: mlx_rs::Dtype,
    ) -> crate::error::Result<Box<dyn crate::model::LanguageModel>> {
        Ok(match self {
            ArchConfig::Llama(cfg) => Box::new(crate::llama::Model::new(cfg, weights, dtype)?),
            ArchConfig::Gemma3(cfg) => Box::new(crate::gemma3::Model::new(cfg, weights, dtype)?),
            ArchConfig::Phi3(cfg) => Box::new(crate::phi3::Model::new(cfg, weights, dtype)?),
        })
    }
}
