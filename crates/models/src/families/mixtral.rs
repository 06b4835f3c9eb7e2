//! The Mixtral family (Mixtral 8x7B, 8x22B): Mistral's attention and layer, with every MLP
//! replaced by a sparse mixture of experts (`block_sparse_moe`): the router's `top_k` logits,
//! softmaxed over those alone, weight the chosen experts' outputs ([`Routing::TopKThenSoftmax`]).
//!
//! Directories hold either Hugging Face's per-expert tensors (`experts.N.w1/w2/w3`, joined at
//! load) or mlx-community's stacked `switch_mlp.{gate,up,down}_proj`, dense or quantized. GGUF
//! stores Mixtral as architecture `llama` with `llama.expert_count`; the Llama family refuses
//! those files by name (not supported yet).

use crate::decoder::{Ends, PreNormLayer, forward_stack, forward_stack_batch};
use crate::error::{ModelError, Result};
use crate::families::llama::{self, attention_keys, Attention};
use crate::gguf::GgufFile;
use crate::model::{Family, LanguageModel};
use crate::moe::{stack_experts, Routing, SparseMoe};
use crate::weights::WeightMap;
use mlx_kv::KvCache;
use mlx_rs::{Array, Dtype};
use serde::{Deserialize, Serialize};

/// `config.json` of a Mixtral model (`model_type: mixtral`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    /// Width of each expert's MLP.
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    pub vocab_size: usize,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Refused when set: mlx-lm's Mixtral ignores it, Hugging Face's applies it.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_theta() -> f32 {
    1_000_000.0
}

fn default_ctx() -> usize {
    32_768
}

fn default_act() -> String {
    "silu".into()
}

/// Names of HF's per-expert MLP tensors and the stacked projections they become.
const EXPERT_NAMES: [(&str, &str); 3] = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")];

impl Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Values the forward pass cannot run, named by their `config.json` key.
    fn check(&self, path: &std::path::Path) -> Result<()> {
        let bad = |reason: String| Err(ModelError::Config { path: path.to_path_buf(), reason });
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_local_experts {
            return bad(format!("config.json: num_experts_per_tok {} must be 1 to num_local_experts {}", self.num_experts_per_tok, self.num_local_experts));
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!("config.json: num_key_value_heads {} does not divide num_attention_heads {}", self.num_key_value_heads, self.num_attention_heads));
        }
        if self.hidden_act != "silu" {
            return bad(format!("config.json: hidden_act '{}' is not supported (silu only)", self.hidden_act));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return bad("config.json: rope_scaling is not supported for mixtral".into());
        }
        Ok(())
    }

    /// Mistral's attention, as the Llama family builds it.
    fn attention_config(&self) -> llama::Config {
        llama::Config {
            model_type: "mistral".into(),
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: Some(self.head_dim()),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: false,
            rope_scaling: None,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    fn moe_prefix(layer: usize) -> String {
        format!("model.layers.{layer}.block_sparse_moe")
    }

    /// Keys of a checkpoint after its experts are stacked.
    pub fn expected_keys(&self) -> Vec<String> {
        let attn = self.attention_config();
        let mut keys = Ends::keys(self.tie_word_embeddings);
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            keys.extend(attention_keys(&attn, &p));
            keys.extend(SparseMoe::keys(&Self::moe_prefix(i)));
            keys.extend(Layer::norm_keys(&p));
        }
        keys
    }
}

impl Family for Config {
    const MODEL_TYPES: &'static [&'static str] = &["mixtral"];
    // llama.cpp writes Mixtral as `llama`; the Llama family refuses those files.
    const GGUF_ARCHITECTURES: &'static [&'static str] = &[];

    fn from_gguf(g: &GgufFile) -> Result<Self> {
        Err(ModelError::Unsupported { path: g.path().into(), reason: "Mixtral GGUF (architecture 'llama' with experts) is not supported yet".into() })
    }

    fn model_type(&self) -> &str {
        "mixtral"
    }

    fn architecture(&self) -> &'static str {
        "MixtralForCausalLM"
    }

    fn num_hidden_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn head_dim(&self) -> usize {
        Config::head_dim(self)
    }

    fn drops_stored_head(&self) -> bool {
        self.tie_word_embeddings
    }

    fn gguf_tensor_name(_gguf: &str) -> Option<String> {
        None
    }

    fn build(self, weights: WeightMap, dtype: Dtype) -> Result<Box<dyn LanguageModel>> {
        Ok(Box::new(Model::new(self, weights, dtype)?))
    }
}

type Layer = PreNormLayer<Attention, SparseMoe>;

pub struct Model {
    pub cfg: Config,
    pub dtype: Dtype,
    ends: Ends,
    layers: Vec<Layer>,
}

impl Model {
    /// Builds the model from `w` (per-expert or stacked experts; nothing else missing or extra).
    pub fn new(cfg: Config, mut w: WeightMap, dtype: Dtype) -> Result<Self> {
        cfg.check(&w.source)?;
        for i in 0..cfg.num_hidden_layers {
            stack_experts(&mut w, &Config::moe_prefix(i), cfg.num_local_experts, &EXPERT_NAMES)?;
        }
        w.check(&cfg.expected_keys())?;
        let attn_cfg = cfg.attention_config();
        let ends = Ends::load(&mut w, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings, |w| w.take_dense("model.norm.weight", dtype))?;
        let routing = Routing::TopKThenSoftmax;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = Attention::new(&attn_cfg, &mut w, &p, dtype)?;
            let (e, k) = (cfg.num_local_experts, cfg.num_experts_per_tok);
            let moe = SparseMoe::load(&mut w, &Config::moe_prefix(i), cfg.hidden_size, cfg.intermediate_size, e, k, routing)?;
            layers.push(Layer::load(&mut w, &p, dtype, cfg.rms_norm_eps, attn, moe)?);
        }
        Ok(Model { cfg, dtype, ends, layers })
    }
}

impl LanguageModel for Model {
    fn forward(&self, ids: &Array, caches: &mut [KvCache], last_only: bool) -> Result<Array> {
        forward_stack(&self.ends, &self.layers, self.cfg.rms_norm_eps, self.dtype, ids, caches, last_only)
    }

    fn forward_batch(&self, ids: &Array, caches: &mut [&mut [KvCache]]) -> Result<Array> {
        forward_stack_batch(&self.ends, &self.layers, self.cfg.rms_norm_eps, self.dtype, ids, caches)
    }

    fn n_layers(&self) -> usize {
        self.layers.len()
    }

    fn head_dim(&self) -> usize {
        self.cfg.head_dim()
    }

    fn n_kv_heads(&self) -> usize {
        self.cfg.num_key_value_heads
    }

    fn max_context(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn family(&self) -> &str {
        "mixtral"
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.ends.arrays();
        v.extend(self.layers.iter().flat_map(|l| l.arrays()));
        v
    }
}

#[cfg(test)]
mod tests {
    use crate::families::ArchConfig;
    use crate::weights::WeightMap;
    use mlx_rs::Dtype;

    fn config(extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 1,
            "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 2,
            "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "vocab_size": 16});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    }

    fn build_error(extra: serde_json::Value) -> String {
        let cfg = ArchConfig::from_json(&config(extra)).unwrap();
        cfg.build(WeightMap::new("ckpt".into()), Dtype::Float32).err().expect("build must fail").to_string()
    }

    #[test]
    fn bad_expert_counts_and_missing_keys_are_named() {
        let e = build_error(serde_json::json!({"num_experts_per_tok": 3}));
        assert!(e.contains("num_experts_per_tok 3") && e.contains("num_local_experts 2"), "{e}");
        let e = build_error(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}));
        assert!(e.contains("rope_scaling"), "{e}");
        // A valid config with no tensors: every missing key listed, the stacked names included.
        let e = build_error(serde_json::json!({}));
        assert!(e.contains("model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight"), "{e}");
        let mut v = config(serde_json::json!({}));
        v.as_object_mut().unwrap().remove("num_local_experts");
        let e = ArchConfig::from_json(&v).unwrap_err();
        assert!(e.contains("num_local_experts"), "{e}");
    }

    /// Metadata alone decides: Mixtral as llama.cpp writes it, and Qwen3-MoE.
    #[test]
    fn moe_gguf_files_are_refused_naming_the_architecture() {
        use crate::gguf::{GgmlType, GgufFile, GgufWriter};
        let dir = std::env::temp_dir().join(format!("kvsplit-moe-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (arch, expect) in [("llama", "llama.expert_count = 8"), ("qwen3moe", "'qwen3moe'")] {
            let path = dir.join(format!("{arch}.gguf"));
            let mut w = GgufWriter::new();
            w.add_string("general.architecture", arch).add_u32(&format!("{arch}.expert_count"), 8);
            w.add_tensor("token_embd.weight", &[4, 2], GgmlType::F32);
            w.write(&path, |_, _, out| out.write_all(&[0u8; 32])).unwrap();
            let e = ArchConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err().to_string();
            assert!(e.contains(expect) && e.contains("not supported"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
