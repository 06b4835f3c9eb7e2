//! The Qwen3-MoE family (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B): Qwen3's attention
//! (q/k norms, no biases) and layer, whose MLP is a sparse mixture of experts on every
//! `decoder_sparse_step`-th layer not listed in `mlp_only_layers`, and a dense gated MLP on the
//! others. The router softmaxes over all experts, keeps the `top_k` best and, with
//! `norm_topk_prob`, rescales them to sum to one ([`Routing::SoftmaxThenTopK`]).
//!
//! Directories hold either Hugging Face's per-expert tensors (`mlp.experts.N.*_proj`, joined
//! at load) or mlx-community's stacked `mlp.switch_mlp.*_proj`, dense or quantized (mlx-lm
//! keeps the router `mlp.gate` at 8 bits there). GGUF (`qwen3moe`) is refused by name: not
//! supported yet.

use crate::decoder::{Activation, Ends, FeedForward, GatedMlp, PreNormLayer, forward_stack, forward_stack_batch};
use crate::error::{ModelError, Result};
use crate::families::llama::{self, attention_keys, Attention};
use crate::gguf::GgufFile;
use crate::model::{Family, LanguageModel};
use crate::moe::{stack_experts, Routing, SparseMoe};
use crate::weights::WeightMap;
use mlx_kv::KvCache;
use mlx_rs::{Array, Dtype};
use serde::{Deserialize, Serialize};

/// `config.json` of a Qwen3-MoE model (`model_type: qwen3_moe`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    /// Width of the dense MLP of non-sparse layers.
    pub intermediate_size: usize,
    /// Width of each expert's MLP.
    pub moe_intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub norm_topk_prob: bool,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Refused when set (YaRN long-context configs): mlx-lm's Qwen3-MoE ignores it.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_act() -> String {
    "silu".into()
}

/// HF's per-expert MLP tensors keep the stacked projections' names.
const EXPERT_NAMES: [(&str, &str); 3] = [("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")];

impl Config {
    /// Whether layer `i` has the sparse MoE block (mlx-lm's and Hugging Face's rule).
    pub fn is_sparse(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i) && self.num_experts > 0 && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// Values the forward pass cannot run, named by their `config.json` key.
    fn check(&self, path: &std::path::Path) -> Result<()> {
        let bad = |reason: String| Err(ModelError::Config { path: path.to_path_buf(), reason: format!("config.json: {reason}") });
        if self.decoder_sparse_step == 0 {
            return bad("decoder_sparse_step must be at least 1".into());
        }
        if self.num_experts > 0 && (self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts) {
            return bad(format!("num_experts_per_tok {} must be 1 to num_experts {}", self.num_experts_per_tok, self.num_experts));
        }
        if let Some(l) = self.mlp_only_layers.iter().find(|&&l| l >= self.num_hidden_layers) {
            return bad(format!("mlp_only_layers names layer {l}, beyond num_hidden_layers {}", self.num_hidden_layers));
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!("num_key_value_heads {} does not divide num_attention_heads {}", self.num_key_value_heads, self.num_attention_heads));
        }
        if self.hidden_act != "silu" {
            return bad(format!("hidden_act '{}' is not supported (silu only)", self.hidden_act));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return bad("rope_scaling is not supported for qwen3_moe".into());
        }
        Ok(())
    }

    /// Qwen3's attention, as the Llama family builds it.
    fn attention_config(&self) -> llama::Config {
        llama::Config {
            model_type: "qwen3".into(),
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: Some(self.head_dim),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias,
            rope_scaling: None,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// Keys of a checkpoint after its experts are stacked.
    pub fn expected_keys(&self) -> Vec<String> {
        let attn = self.attention_config();
        let mut keys = Ends::keys(self.tie_word_embeddings);
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            keys.extend(attention_keys(&attn, &p));
            if self.is_sparse(i) {
                keys.extend(SparseMoe::keys(&format!("{p}.mlp")));
            } else {
                keys.extend(GatedMlp::keys(&p));
            }
            keys.extend(Layer::norm_keys(&p));
        }
        keys
    }
}

impl Family for Config {
    const MODEL_TYPES: &'static [&'static str] = &["qwen3_moe"];
    const GGUF_ARCHITECTURES: &'static [&'static str] = &["qwen3moe"];

    fn from_gguf(g: &GgufFile) -> Result<Self> {
        Err(ModelError::Unsupported { path: g.path().into(), reason: "GGUF architecture 'qwen3moe' is not supported yet (load its MLX or Hugging Face directory)".into() })
    }

    fn model_type(&self) -> &str {
        "qwen3_moe"
    }

    fn architecture(&self) -> &'static str {
        "Qwen3MoeForCausalLM"
    }

    fn num_hidden_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn head_dim(&self) -> usize {
        self.head_dim
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

/// A layer's MLP: dense or sparse by [`Config::is_sparse`].
pub enum Mlp {
    Dense(GatedMlp),
    Sparse(SparseMoe),
}

impl FeedForward for Mlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        match self {
            Mlp::Dense(m) => m.forward(x),
            Mlp::Sparse(m) => m.forward(x),
        }
    }

    fn arrays(&self) -> Vec<&Array> {
        match self {
            Mlp::Dense(m) => m.arrays(),
            Mlp::Sparse(m) => m.arrays(),
        }
    }
}

type Layer = PreNormLayer<Attention, Mlp>;

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
        for i in (0..cfg.num_hidden_layers).filter(|&i| cfg.is_sparse(i)) {
            stack_experts(&mut w, &format!("model.layers.{i}.mlp"), cfg.num_experts, &EXPERT_NAMES)?;
        }
        w.check(&cfg.expected_keys())?;
        let attn_cfg = cfg.attention_config();
        let ends = Ends::load(&mut w, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings, |w| w.take_dense("model.norm.weight", dtype))?;
        let routing = Routing::SoftmaxThenTopK { renormalize: cfg.norm_topk_prob };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = Attention::new(&attn_cfg, &mut w, &p, dtype)?;
            let mlp = if cfg.is_sparse(i) {
                let (h, m, e, k) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok);
                Mlp::Sparse(SparseMoe::load(&mut w, &format!("{p}.mlp"), h, m, e, k, routing)?)
            } else {
                Mlp::Dense(GatedMlp::load(&mut w, &p, cfg.hidden_size, cfg.intermediate_size, Activation::Silu)?)
            };
            layers.push(Layer::load(&mut w, &p, dtype, cfg.rms_norm_eps, attn, mlp)?);
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
        self.cfg.head_dim
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
        "qwen3_moe"
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.ends.arrays();
        v.extend(self.layers.iter().flat_map(|l| l.arrays()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::Config;
    use crate::families::ArchConfig;
    use crate::weights::WeightMap;
    use mlx_rs::Dtype;

    fn config(extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 3,
            "intermediate_size": 64, "moe_intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 2, "mlp_only_layers": [],
            "norm_topk_prob": true, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 16,
            "max_position_embeddings": 64});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    }

    fn build_error(extra: serde_json::Value) -> String {
        let cfg = ArchConfig::from_json(&config(extra)).unwrap();
        cfg.build(WeightMap::new("ckpt".into()), Dtype::Float32).err().expect("build must fail").to_string()
    }

    #[test]
    fn sparse_layers_follow_the_step_and_the_dense_list() {
        let c: Config = serde_json::from_value(config(serde_json::json!({"decoder_sparse_step": 1, "mlp_only_layers": [1]}))).unwrap();
        assert_eq!((0..3).map(|i| c.is_sparse(i)).collect::<Vec<_>>(), [true, false, true]);
        let c: Config = serde_json::from_value(config(serde_json::json!({}))).unwrap();
        assert_eq!((0..3).map(|i| c.is_sparse(i)).collect::<Vec<_>>(), [false, true, false]);
    }

    #[test]
    fn bad_values_and_missing_keys_are_named() {
        assert!(build_error(serde_json::json!({"decoder_sparse_step": 0})).contains("decoder_sparse_step"));
        let e = build_error(serde_json::json!({"num_experts_per_tok": 5}));
        assert!(e.contains("num_experts_per_tok 5") && e.contains("num_experts 4"), "{e}");
        assert!(build_error(serde_json::json!({"mlp_only_layers": [7]})).contains("mlp_only_layers"));
        let e = build_error(serde_json::json!({}));
        assert!(e.contains("model.layers.1.mlp.switch_mlp.gate_proj.weight") && e.contains("model.layers.0.mlp.gate_proj.weight"), "{e}");
    }
}
