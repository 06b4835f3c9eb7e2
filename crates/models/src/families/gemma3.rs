//! The Gemma 3 family (text decoder: 270M, 1B, 4B, 12B, 27B).
//!
//! Differences from Llama, all visible in the forward pass below: the embedding is scaled by
//! sqrt(hidden); RMSNorm multiplies by `1 + weight`; q and k are normalized per head; every
//! sub-block is normalized both before and after (four norms per layer); the MLP is GELU-tanh
//! gated; the query is scaled by `query_pre_attn_scalar^-1/2`; and most layers attend only to a
//! sliding window, with their own RoPE base (local layers 10 000, global layers `rope_theta`).
//! A config's `attn_logit_softcapping` (null in Google's) soft-caps scores in the KV cache.
//! Embeddings are tied unless the checkpoint stores its own `lm_head` (as mlx-lm decides).
//!
//! Checkpoint keys and norm semantics are Hugging Face's (`weight`, not `1 + weight`); reading
//! GGUF undoes llama.cpp's converter, which stores `1 + weight`.

use crate::decoder::{Ends, Mixer};
use crate::error::{ModelError, Result};
use crate::families::gemma::{self, norm_weight, SandwichLayer};
use crate::families::llamacpp::{arch_opt_f32, arch_opt_u32, arch_u32, cfg_err};
use crate::fast::{rms_norm, rope};
use crate::gguf::GgufFile;
use crate::model::{Family, LanguageModel};
use crate::projections::Projections;
use crate::weights::{Linear, Weight, WeightMap};
use mlx_kv::{KvCache, Scoring};
use mlx_rs::{Array, Dtype};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f32,
}

/// `config.json` of a Gemma 3 text model (`model_type: gemma3_text`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub vocab_size: usize,
    /// RoPE base of the global (full-attention) layers.
    pub rope_theta: f32,
    /// RoPE base of the sliding-window layers.
    #[serde(default = "default_local_base")]
    pub rope_local_base_freq: f32,
    pub query_pre_attn_scalar: f32,
    /// `None`: every layer is global.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Every `sliding_window_pattern`-th layer is global (older configs).
    #[serde(default = "default_pattern")]
    pub sliding_window_pattern: usize,
    /// Per-layer `sliding_attention` / `full_attention` (newer configs); wins over the pattern.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Applies to global layers only, as in the reference implementation.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f32>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f32>,
}

fn default_local_base() -> f32 {
    10_000.0
}

fn default_pattern() -> usize {
    6
}

fn default_ctx() -> usize {
    32_768
}

impl Config {
    pub fn is_sliding(&self, layer: usize) -> bool {
        if self.sliding_window.is_none() {
            return false;
        }
        match &self.layer_types {
            Some(t) => t.get(layer).is_some_and(|s| s == "sliding_attention"),
            None => self.sliding_window_pattern == 0 || layer % self.sliding_window_pattern < self.sliding_window_pattern - 1,
        }
    }
}

impl Family for Config {
    const MODEL_TYPES: &'static [&'static str] = &["gemma3_text"];
    // The multimodal wrapper nests the text model under `text_config` and `language_model.`
    // keys; only the text model is supported.
    const REFUSED_MODEL_TYPES: &'static [(&'static str, &'static str)] =
        &[("gemma3", "model_type 'gemma3' (the multimodal checkpoint) is not supported; use a gemma3_text checkpoint")];
    const GGUF_ARCHITECTURES: &'static [&'static str] = &["gemma3"];

    /// With llama.cpp's defaults where keys are absent: every 6th layer global, local RoPE
    /// base 10 000.
    fn from_gguf(g: &GgufFile) -> Result<Self> {
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
            Some("linear") => Some(RopeScaling {
                rope_type: "linear".into(),
                factor: arch_opt_f32(g, a, "rope.scaling.factor")?.unwrap_or(1.0),
            }),
            Some(other) => return Err(ModelError::Unsupported { path: g.path().into(), reason: format!("gemma3 rope scaling '{other}'") }),
        };
        Ok(Config {
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

    fn model_type(&self) -> &str {
        "gemma3_text"
    }

    fn architecture(&self) -> &'static str {
        "Gemma3ForCausalLM"
    }

    fn finish_json(&self, obj: &mut serde_json::Map<String, serde_json::Value>) {
        // Gemma 3 always ties its output head to the embedding.
        obj.insert("tie_word_embeddings".into(), true.into());
        // transformers validates this field as an integer (a float fails mlx-lm's load).
        if self.query_pre_attn_scalar.fract() == 0.0 {
            obj.insert("query_pre_attn_scalar".into(), (self.query_pre_attn_scalar as i64).into());
        }
    }

    fn num_hidden_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// mlx-lm's Gemma 3 decides by presence, not by the config: a stored `lm_head` is the
    /// head (a fine-tune may carry one), none means tied (every Google checkpoint).
    fn drops_stored_head(&self) -> bool {
        false
    }

    /// Gemma 3 normalizes before and after both sub-blocks; `ffn_norm` is the pre-MLP one.
    fn gguf_tensor_name(gguf: &str) -> Option<String> {
        gemma::gguf_tensor_name(gguf)
    }

    fn undo_gguf_tensor(&self, hf: &str, w: Weight, dtype: Dtype) -> Result<Weight> {
        gemma::undo_gguf_tensor(hf, w, dtype)
    }

    fn build(self, weights: WeightMap, dtype: Dtype) -> Result<Box<dyn LanguageModel>> {
        Ok(Box::new(Model::new(self, weights, dtype)?))
    }
}

/// Keys a checkpoint of this config must contain, exactly; `head`: it stores its own `lm_head`.
pub fn expected_keys(cfg: &Config, head: bool) -> Vec<String> {
    let mut keys = Ends::keys(!head);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for name in ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"] {
            keys.push(format!("{p}.self_attn.{name}.weight"));
        }
        keys.extend(SandwichLayer::<Attention>::keys(&p));
    }
    keys
}

pub struct Attention {
    /// q, k and v, in that order.
    qkv: Projections,
    o_proj: Linear,
    q_norm: Array,
    k_norm: Array,
    n_heads: i32,
    n_kv_heads: i32,
    head_dim: i32,
    eps: f32,
    scoring: Scoring,
    rope_base: f32,
    rope_scale: f32,
}

impl Attention {
    fn new(cfg: &Config, w: &mut WeightMap, p: &str, layer: usize, dtype: Dtype) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear { weight: w.take_shaped(&format!("{p}.self_attn.{name}.weight"), &[out, inp])?, bias: None })
        };
        let q_proj = lin("q_proj", nq * d, h)?;
        let k_proj = lin("k_proj", nkv * d, h)?;
        let v_proj = lin("v_proj", nkv * d, h)?;
        let o_proj = lin("o_proj", h, nq * d)?;
        let sliding = cfg.is_sliding(layer);
        let (rope_base, rope_scale) = match (&cfg.rope_scaling, sliding) {
            (_, true) => (cfg.rope_local_base_freq, 1.0),
            (Some(s), false) => (cfg.rope_theta, 1.0 / s.factor),
            (None, false) => (cfg.rope_theta, 1.0),
        };
        Ok(Attention {
            qkv: Projections::new(vec![q_proj, k_proj, v_proj])?,
            o_proj,
            q_norm: norm_weight(w, &format!("{p}.self_attn.q_norm.weight"), dtype)?,
            k_norm: norm_weight(w, &format!("{p}.self_attn.k_norm.weight"), dtype)?,
            n_heads: nq as i32,
            n_kv_heads: nkv as i32,
            head_dim: d as i32,
            eps: cfg.rms_norm_eps,
            scoring: Scoring { scale: cfg.query_pre_attn_scalar.powf(-0.5), softcap: cfg.attn_logit_softcapping },
            rope_base,
            rope_scale,
        })
    }

}

impl Mixer for Attention {
    fn forward(&self, x: &Array, cache: &mut KvCache) -> Result<Array> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let heads = |y: Array, n: i32, norm: Option<&Array>| -> Result<Array> {
            let y = y.reshape(&[b, l, n, self.head_dim])?;
            let y = match norm {
                Some(wn) => rms_norm(&y, Some(wn), self.eps)?,
                None => y,
            };
            Ok(y.transpose_axes(&[0, 2, 1, 3])?)
        };
        let [q, k, v]: [Array; 3] = self.qkv.forward(x)?.try_into().expect("three projections give three outputs");
        let q = heads(q, self.n_heads, Some(&self.q_norm))?;
        let k = heads(k, self.n_kv_heads, Some(&self.k_norm))?;
        let v = heads(v, self.n_kv_heads, None)?;
        let offset = cache.offset() as i32;
        let q = rope(&q, self.head_dim, false, self.rope_base, self.rope_scale, offset, None)?;
        let k = rope(&k, self.head_dim, false, self.rope_base, self.rope_scale, offset, None)?;
        let out = cache.update_and_attend(&q, &k, &v, self.scoring, None)?;
        let out = out.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?;
        self.o_proj.forward(&out)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.qkv.arrays();
        v.extend(self.o_proj.arrays());
        v.extend([&self.q_norm, &self.k_norm]);
        v
    }
}

pub struct Model {
    pub cfg: Config,
    pub dtype: Dtype,
    ends: Ends,
    embed_scale: f32,
    layers: Vec<SandwichLayer<Attention>>,
}

impl Model {
    /// Builds the model from `w`, which must hold exactly [`expected_keys`].
    pub fn new(cfg: Config, mut w: WeightMap, dtype: Dtype) -> Result<Self> {
        gemma::check_caps(&w.source, cfg.attn_logit_softcapping, cfg.final_logit_softcapping)?;
        let head = w.contains("lm_head.weight");
        w.check(&expected_keys(&cfg, head))?;
        let h = cfg.hidden_size;
        let ends = Ends::load(&mut w, h, cfg.vocab_size, !head, |w| norm_weight(w, "model.norm.weight", dtype))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = Attention::new(&cfg, &mut w, &p, i, dtype)?;
            layers.push(SandwichLayer::load(&mut w, &p, h, cfg.intermediate_size, cfg.rms_norm_eps, dtype, attn)?);
        }
        // f32 sqrt as llama.cpp does; HF and mlx-lm round it to the weight dtype (bf16: 25.25
        // instead of 25.30 for the 270M), a 0.2% difference that later norms mostly absorb.
        let embed_scale = (h as f32).sqrt();
        Ok(Model { cfg, dtype, ends, embed_scale, layers })
    }
}

impl LanguageModel for Model {
    fn forward(&self, ids: &Array, caches: &mut [KvCache], last_only: bool) -> Result<Array> {
        let mut x = self.ends.embed_tokens.forward(ids, self.dtype)? * Array::from_f32(self.embed_scale).as_dtype(self.dtype)?;
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            x = layer.forward(&x, cache)?;
            crate::decoder::settle_chunk(&x)?;
        }
        let logits = self.ends.logits(x, self.cfg.rms_norm_eps, last_only)?;
        gemma::soft_cap(logits, self.cfg.final_logit_softcapping)
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

    fn layer_window(&self, layer: usize) -> Option<usize> {
        self.cfg.sliding_window.filter(|_| self.cfg.is_sliding(layer))
    }

    fn family(&self) -> &str {
        "gemma3"
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.ends.arrays();
        for l in &self.layers {
            v.extend(l.arrays());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(layer_types: Option<Vec<String>>) -> Config {
        Config {
            hidden_size: 8,
            num_hidden_layers: 12,
            intermediate_size: 16,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-6,
            vocab_size: 10,
            rope_theta: 1e6,
            rope_local_base_freq: 1e4,
            query_pre_attn_scalar: 4.0,
            sliding_window: Some(4),
            sliding_window_pattern: 6,
            layer_types,
            max_position_embeddings: 64,
            rope_scaling: None,
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
        }
    }

    #[test]
    fn every_sixth_layer_is_global() {
        let c = cfg(None);
        let global: Vec<usize> = (0..12).filter(|&i| !c.is_sliding(i)).collect();
        assert_eq!(global, vec![5, 11]);
    }

    #[test]
    fn layer_types_win_over_the_pattern() {
        let types = (0..12).map(|i| if i == 0 { "full_attention" } else { "sliding_attention" }.to_string()).collect();
        let c = cfg(Some(types));
        assert!(!c.is_sliding(0) && c.is_sliding(5) && c.is_sliding(11));
        let no_window = Config { sliding_window: None, ..cfg(None) };
        assert!((0..12).all(|i| !no_window.is_sliding(i)));
    }

    #[test]
    fn gguf_names_override_only_the_norms() {
        let name = |n: &str| <Config as Family>::gguf_tensor_name(n).unwrap();
        assert_eq!(name("blk.2.ffn_norm.weight"), "model.layers.2.pre_feedforward_layernorm.weight");
        assert_eq!(name("blk.2.post_ffw_norm.weight"), "model.layers.2.post_feedforward_layernorm.weight");
        assert_eq!(name("blk.0.post_attention_norm.weight"), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(name("blk.0.attn_q_norm.weight"), "model.layers.0.self_attn.q_norm.weight");
    }
}
