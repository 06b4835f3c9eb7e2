//! The Gemma 2 family (2B, 9B, 27B).
//!
//! Against Llama: the embedding is scaled by sqrt(hidden); RMSNorm multiplies by `1 + weight`;
//! both sub-blocks are normalized before and after (four norms per layer, shared with Gemma 3
//! in [`super::gemma`]); the MLP is GELU-tanh gated; the query is scaled by
//! `query_pre_attn_scalar^-1/2`; attention scores are soft-capped (`attn_logit_softcapping`,
//! applied by the KV cache, [`mlx_kv::Scoring`]) and so are the final logits
//! (`final_logit_softcapping`). Layers alternate between a sliding window (even layers, as in
//! Hugging Face's and llama.cpp's Gemma 2) and global attention, all with one RoPE base. Unlike
//! Gemma 3 there are no q/k norms.
//!
//! Checkpoint keys and norm semantics are Hugging Face's; reading GGUF undoes llama.cpp's
//! converter, which stores `1 + weight`.

use crate::decoder::{Ends, Mixer};
use crate::error::{ModelError, Result};
use crate::families::gemma::{self, SandwichLayer};
use crate::families::llamacpp::{arch_opt_f32, arch_opt_u32, arch_u32, cfg_err};
use crate::fast::rope;
use crate::gguf::GgufFile;
use crate::model::{Family, LanguageModel};
use crate::projections::Projections;
use crate::weights::{Linear, Weight, WeightMap};
use mlx_kv::{KvCache, Scoring};
use mlx_rs::{Array, Dtype};
use serde::{Deserialize, Serialize};

/// `config.json` of a Gemma 2 model (`model_type: gemma2`). Absent soft caps take Hugging
/// Face's defaults (50 and 30); `null` turns one off.
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
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    pub query_pre_attn_scalar: f32,
    /// `None`: every layer is global.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Per-layer `sliding_attention` / `full_attention` (newer configs); without it even layers
    /// slide.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_attn_cap")]
    pub attn_logit_softcapping: Option<f32>,
    #[serde(default = "default_final_cap")]
    pub final_logit_softcapping: Option<f32>,
    #[serde(default = "default_tied")]
    pub tie_word_embeddings: bool,
}

fn default_rope_theta() -> f32 {
    10_000.0
}

fn default_ctx() -> usize {
    8192
}

fn default_attn_cap() -> Option<f32> {
    Some(50.0)
}

fn default_final_cap() -> Option<f32> {
    Some(30.0)
}

fn default_tied() -> bool {
    true
}

impl Config {
    pub fn is_sliding(&self, layer: usize) -> bool {
        if self.sliding_window.is_none() {
            return false;
        }
        match &self.layer_types {
            Some(t) => t.get(layer).is_some_and(|s| s == "sliding_attention"),
            None => layer.is_multiple_of(2),
        }
    }
}

impl Family for Config {
    const MODEL_TYPES: &'static [&'static str] = &["gemma2"];
    const GGUF_ARCHITECTURES: &'static [&'static str] = &["gemma2"];

    /// llama.cpp writes no layer pattern for Gemma 2 (even layers slide) and no query scalar:
    /// like its graph, 27B (46 layers) scales by hidden/heads, the others by head_dim.
    fn from_gguf(g: &GgufFile) -> Result<Self> {
        let a = "gemma2";
        let (hidden, n_heads, n_layers) = (arch_u32(g, a, "embedding_length")?, arch_u32(g, a, "attention.head_count")?, arch_u32(g, a, "block_count")?);
        if n_heads == 0 {
            return Err(cfg_err(g.path(), "gemma2.attention.head_count is 0".into()));
        }
        let head_dim = arch_opt_u32(g, a, "attention.key_length")?.unwrap_or(hidden / n_heads);
        let cap = |key: &str| -> Result<Option<f32>> { Ok(arch_opt_f32(g, a, key)?.filter(|&c| c > 0.0)) };
        Ok(Config {
            hidden_size: hidden,
            num_hidden_layers: n_layers,
            intermediate_size: arch_u32(g, a, "feed_forward_length")?,
            num_attention_heads: n_heads,
            num_key_value_heads: arch_opt_u32(g, a, "attention.head_count_kv")?.unwrap_or(n_heads),
            head_dim,
            rms_norm_eps: g.get_f32(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
            vocab_size: g.tensor("token_embd.weight")?.shape()[0],
            rope_theta: arch_opt_f32(g, a, "rope.freq_base")?.unwrap_or(10_000.0),
            query_pre_attn_scalar: if n_layers == 46 { (hidden / n_heads) as f32 } else { head_dim as f32 },
            sliding_window: arch_opt_u32(g, a, "attention.sliding_window")?.filter(|&w| w > 0),
            layer_types: None,
            max_position_embeddings: arch_u32(g, a, "context_length")?,
            attn_logit_softcapping: cap("attn_logit_softcapping")?,
            final_logit_softcapping: cap("final_logit_softcapping")?,
            tie_word_embeddings: !g.tensors().iter().any(|t| t.name == "output.weight"),
        })
    }

    fn model_type(&self) -> &str {
        "gemma2"
    }

    fn architecture(&self) -> &'static str {
        "Gemma2ForCausalLM"
    }

    fn finish_json(&self, obj: &mut serde_json::Map<String, serde_json::Value>) {
        obj.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
        // transformers validates this field as an integer.
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

    /// A tied model's head is the embedding, as Hugging Face ties it.
    fn drops_stored_head(&self) -> bool {
        self.tie_word_embeddings
    }

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

/// Keys a checkpoint of this config must contain, exactly.
pub fn expected_keys(cfg: &Config) -> Vec<String> {
    let mut keys = Ends::keys(cfg.tie_word_embeddings);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"] {
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
    n_heads: i32,
    n_kv_heads: i32,
    head_dim: i32,
    scoring: Scoring,
    rope_base: f32,
}

impl Attention {
    fn new(cfg: &Config, w: &mut WeightMap, p: &str) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear { weight: w.take_shaped(&format!("{p}.self_attn.{name}.weight"), &[out, inp])?, bias: None })
        };
        Ok(Attention {
            qkv: Projections::new(vec![lin("q_proj", nq * d, h)?, lin("k_proj", nkv * d, h)?, lin("v_proj", nkv * d, h)?])?,
            o_proj: lin("o_proj", h, nq * d)?,
            n_heads: nq as i32,
            n_kv_heads: nkv as i32,
            head_dim: d as i32,
            scoring: Scoring { scale: cfg.query_pre_attn_scalar.powf(-0.5), softcap: cfg.attn_logit_softcapping },
            rope_base: cfg.rope_theta,
        })
    }
}

impl Mixer for Attention {
    fn forward(&self, x: &Array, cache: &mut KvCache) -> Result<Array> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let heads = |y: Array, n: i32| -> Result<Array> { Ok(y.reshape(&[b, l, n, self.head_dim])?.transpose_axes(&[0, 2, 1, 3])?) };
        let [q, k, v]: [Array; 3] = self.qkv.forward(x)?.try_into().expect("three projections give three outputs");
        let q = heads(q, self.n_heads)?;
        let k = heads(k, self.n_kv_heads)?;
        let v = heads(v, self.n_kv_heads)?;
        let offset = cache.offset() as i32;
        let q = rope(&q, self.head_dim, false, self.rope_base, 1.0, offset, None)?;
        let k = rope(&k, self.head_dim, false, self.rope_base, 1.0, offset, None)?;
        let out = cache.update_and_attend(&q, &k, &v, self.scoring, None)?;
        self.o_proj.forward(&out.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.qkv.arrays();
        v.extend(self.o_proj.arrays());
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
        if cfg.sliding_window == Some(0) {
            return Err(ModelError::Config { path: w.source.clone(), reason: "sliding_window is 0; use null for global attention".into() });
        }
        w.check(&expected_keys(&cfg))?;
        let h = cfg.hidden_size;
        let ends = Ends::load(&mut w, h, cfg.vocab_size, cfg.tie_word_embeddings, |w| gemma::norm_weight(w, "model.norm.weight", dtype))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = Attention::new(&cfg, &mut w, &p)?;
            layers.push(SandwichLayer::load(&mut w, &p, h, cfg.intermediate_size, cfg.rms_norm_eps, dtype, attn)?);
        }
        // As Gemma 3: f32 sqrt, rounded to the weight dtype with the product.
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
        "gemma2"
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

    fn json(extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({
            "model_type": "gemma2", "hidden_size": 8, "num_hidden_layers": 4, "intermediate_size": 16,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "rms_norm_eps": 1e-6,
            "vocab_size": 10, "query_pre_attn_scalar": 4, "sliding_window": 4
        });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    }

    fn parse(extra: serde_json::Value) -> Config {
        serde_json::from_value(json(extra)).unwrap()
    }

    #[test]
    fn even_layers_slide_unless_layer_types_say_otherwise() {
        let c = parse(serde_json::json!({}));
        assert_eq!((0..4).filter(|&i| c.is_sliding(i)).collect::<Vec<_>>(), vec![0, 2]);
        let c = parse(serde_json::json!({"layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]}));
        assert_eq!((0..4).filter(|&i| c.is_sliding(i)).collect::<Vec<_>>(), vec![1]);
        let c = parse(serde_json::json!({"sliding_window": null}));
        assert!((0..4).all(|i| !c.is_sliding(i)));
    }

    #[test]
    fn absent_caps_take_the_hf_defaults_and_null_turns_them_off() {
        let c = parse(serde_json::json!({}));
        assert_eq!((c.attn_logit_softcapping, c.final_logit_softcapping), (Some(50.0), Some(30.0)));
        let c = parse(serde_json::json!({"attn_logit_softcapping": null, "final_logit_softcapping": 5.0}));
        assert_eq!((c.attn_logit_softcapping, c.final_logit_softcapping), (None, Some(5.0)));
    }

    #[test]
    fn a_non_positive_cap_is_an_error_naming_the_key() {
        let c = parse(serde_json::json!({"attn_logit_softcapping": -1.0}));
        let err = Model::new(c, WeightMap::new("m/config.json".into()), Dtype::Float32).err().unwrap().to_string();
        assert!(err.contains("attn_logit_softcapping is -1"), "{err}");
    }

    /// llama.cpp's gemma2 metadata (as its converter writes it for a 9B-like shape) becomes
    /// the HF config, and that config survives `convert`'s config.json.
    #[test]
    fn gguf_metadata_becomes_the_config_and_its_json_reads_back() {
        use crate::families::ArchConfig;
        use crate::gguf::{GgmlType, GgufWriter};
        let mut w = GgufWriter::new();
        w.add_string("general.architecture", "gemma2");
        for (k, v) in [("context_length", 8192), ("embedding_length", 8), ("block_count", 4), ("feed_forward_length", 16)] {
            w.add_u32(&format!("gemma2.{k}"), v);
        }
        for (k, v) in [("head_count", 2), ("head_count_kv", 1), ("key_length", 4), ("value_length", 4), ("sliding_window", 4096)] {
            w.add_u32(&format!("gemma2.attention.{k}"), v);
        }
        w.add_f32("gemma2.attention.layer_norm_rms_epsilon", 1e-6).add_f32("gemma2.attn_logit_softcapping", 50.0).add_f32("gemma2.final_logit_softcapping", 30.0);
        w.add_tensor("token_embd.weight", &[8, 10], GgmlType::F32);
        let path = std::env::temp_dir().join(format!("kvsplit-gemma2-meta-{}.gguf", std::process::id()));
        w.write(&path, |_, spec, out| out.write_all(&vec![0u8; spec.n_bytes() as usize])).unwrap();
        let g = GgufFile::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let ArchConfig::Gemma2(c) = ArchConfig::from_gguf(&g).unwrap() else { panic!("not gemma2") };
        assert_eq!((c.vocab_size, c.head_dim, c.query_pre_attn_scalar, c.rope_theta), (10, 4, 4.0, 10_000.0));
        assert_eq!((c.sliding_window, c.attn_logit_softcapping, c.final_logit_softcapping), (Some(4096), Some(50.0), Some(30.0)));
        assert!(c.tie_word_embeddings && c.is_sliding(0) && !c.is_sliding(1));
        let json = ArchConfig::Gemma2(c.clone()).to_json();
        assert_eq!((json["model_type"].as_str(), json["query_pre_attn_scalar"].as_i64()), (Some("gemma2"), Some(4)));
        assert_eq!(ArchConfig::from_json(&json).unwrap(), ArchConfig::Gemma2(c));
    }

    #[test]
    fn gguf_names_map_the_four_norms_and_no_qk_norms_are_expected() {
        let name = |n: &str| <Config as Family>::gguf_tensor_name(n).unwrap();
        assert_eq!(name("blk.1.ffn_norm.weight"), "model.layers.1.pre_feedforward_layernorm.weight");
        assert_eq!(name("blk.1.post_attention_norm.weight"), "model.layers.1.post_attention_layernorm.weight");
        let keys = expected_keys(&parse(serde_json::json!({})));
        assert!(keys.iter().all(|k| !k.contains("q_norm")) && !keys.contains(&"lm_head.weight".to_string()));
        assert_eq!(keys.len(), 2 + 4 * 11);
    }
}
