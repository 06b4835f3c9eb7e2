//! The model families, in one list. `config.json`'s `model_type` or GGUF's
//! `general.architecture` picks one; everything else about a family lives in its own file.
//!
//! Adding a family: its file (a `Config` implementing [`Family`] and its `Model`) and one line
//! in the `families!` list at the end of this file.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::model::{Family, LanguageModel};
use crate::weights::{Weight, WeightMap};
use mlx_rs::Dtype;

mod gemma;
mod llamacpp;

/// Declares each family's module and the [`ArchConfig`] variant holding its config; every
/// method of [`ArchConfig`] hands on to the variant's [`Family`] impl.
macro_rules! families {
    ($($(#[$doc:meta])* $variant:ident($module:ident),)*) => {
        $(pub mod $module;)*

        /// A model's config by family: which model file builds it. GGUF metadata and
        /// `config.json` both become one of these.
        #[derive(Debug, Clone, PartialEq)]
        pub enum ArchConfig {
            $($(#[$doc])* $variant($module::Config),)*
        }

        impl ArchConfig {
            /// Parses a `config.json` value; an unknown `model_type` is an error naming it.
            pub fn from_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
                let model_type = v.get("model_type").and_then(serde_json::Value::as_str).ok_or("no 'model_type' string")?;
                let err = |e: serde_json::Error| format!("model_type '{model_type}': {e}");
                $(
                    if <$module::Config as Family>::MODEL_TYPES.contains(&model_type) {
                        return Ok(ArchConfig::$variant(serde_json::from_value(v.clone()).map_err(err)?));
                    }
                )*
                $(
                    for (refused, why) in <$module::Config as Family>::REFUSED_MODEL_TYPES {
                        if *refused == model_type {
                            return Err(why.to_string());
                        }
                    }
                )*
                let supported = [$(<$module::Config as Family>::MODEL_TYPES,)*].concat();
                Err(format!("model_type '{model_type}' is not supported (supported: {})", supported.join(", ")))
            }

            /// The config from GGUF metadata alone (no tensor is read).
            pub fn from_gguf(g: &GgufFile) -> Result<Self> {
                let arch = g.get_str("general.architecture")?;
                $(
                    if <$module::Config as Family>::GGUF_ARCHITECTURES.contains(&arch) {
                        return Ok(ArchConfig::$variant(<$module::Config as Family>::from_gguf(g)?));
                    }
                )*
                Err(ModelError::Unsupported { path: g.path().into(), reason: format!("GGUF architecture '{arch}'") })
            }

            /// `config.json` as Hugging Face writes it for this family (`model_type`,
            /// `architectures` and the family's field names).
            pub fn to_json(&self) -> serde_json::Value {
                match self {
                    $(ArchConfig::$variant(c) => json_of(c),)*
                }
            }

            /// Whether a stored `lm_head` is dropped at load ([`Family::drops_stored_head`]).
            pub fn drops_stored_head(&self) -> bool {
                match self {
                    $(ArchConfig::$variant(c) => c.drops_stored_head(),)*
                }
            }

            /// Width of one attention head: what each layer's KV cache stores per head and token.
            pub fn head_dim(&self) -> usize {
                match self {
                    $(ArchConfig::$variant(c) => c.head_dim(),)*
                }
            }

            pub fn num_hidden_layers(&self) -> usize {
                match self {
                    $(ArchConfig::$variant(c) => c.num_hidden_layers(),)*
                }
            }

            /// The HF name of GGUF tensor `gguf` in this family; `None` for unknown names.
            pub fn gguf_tensor_name(&self, gguf: &str) -> Option<String> {
                match self {
                    $(ArchConfig::$variant(_) => <$module::Config as Family>::gguf_tensor_name(gguf),)*
                }
            }

            /// Undoes what llama.cpp's converter did to tensor `hf` of this family.
            pub fn undo_gguf_tensor(&self, hf: &str, w: Weight, dtype: Dtype) -> Result<Weight> {
                match self {
                    $(ArchConfig::$variant(c) => c.undo_gguf_tensor(hf, w, dtype),)*
                }
            }

            /// Builds the family's model from `weights` (strictly: every key used, none missing);
            /// in a tensor-parallel group ([`crate::shard`]), this rank's part of it.
            pub fn build(self, weights: WeightMap, dtype: Dtype) -> Result<Box<dyn LanguageModel>> {
                match self {
                    $(ArchConfig::$variant(c) => match crate::shard::current() {
                        Some(s) => {
                            let (c, weights) = c.shard(weights, s)?;
                            c.build(weights, dtype)
                        }
                        None => c.build(weights, dtype),
                    },)*
                }
            }
        }
    };
}

fn json_of<F: Family>(c: &F) -> serde_json::Value {
    // Structs of numbers, strings and options always serialize to an object.
    let mut obj = match serde_json::to_value(c) {
        Ok(serde_json::Value::Object(m)) => m,
        other => unreachable!("config serialized to {other:?}"),
    };
    obj.insert("model_type".into(), c.model_type().into());
    obj.insert("architectures".into(), serde_json::json!([c.architecture()]));
    c.finish_json(&mut obj);
    serde_json::Value::Object(obj)
}

// In this order unsupported-`model_type` errors list the names.
families! {
    /// `llama`, `mistral`, `qwen2`, `qwen3` (the `model_type` is inside the config).
    Llama(llama),
    /// `gemma2`.
    Gemma2(gemma2),
    /// `gemma3_text`.
    Gemma3(gemma3),
    /// `phi3`.
    Phi3(phi3),
    /// `mixtral`.
    Mixtral(mixtral),
    /// `qwen3_moe`.
    Qwen3Moe(qwen3_moe),
    /// `gpt_oss`.
    GptOss(gpt_oss),
}
