//! The Phi-3 family (Phi-3/3.5-mini, Phi-4-mini): a Llama-shaped decoder whose checkpoints fuse
//! the q/k/v projections into one `qkv_proj` and the gate/up projections into one
//! `gate_up_proj` (gate rows first), and which may rotate only part of each head
//! (`partial_rotary_factor`).
//!
//! LongRoPE (`rope_scaling` of type `longrope`/`su`, the 128k variants) is refused at load time
//! rather than run with the wrong positions. Phi-3's `sliding_window` is ignored, as llama.cpp
//! does: the released models were trained with it wider than their 4k context.

use crate::decoder::{Ends, FeedForward, Mixer, PreNormLayer, forward_stack};
use crate::error::{ModelError, Result};
use crate::families::llamacpp::{self, arch_opt_f32, arch_opt_u32, arch_u32, cfg_err};
use crate::fast::rope;
use crate::gguf::GgufFile;
use crate::model::{Family, LanguageModel};
use crate::weights::{Linear, WeightMap};
use mlx_kv::KvCache;
use mlx_rs::nn::silu;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Dtype};
use serde::{Deserialize, Serialize};

/// `config.json` of a Phi-3 model (`model_type: phi3`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    pub vocab_size: usize,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_partial")]
    pub partial_rotary_factor: f32,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_theta() -> f32 {
    10_000.0
}

fn default_ctx() -> usize {
    4096
}

fn default_partial() -> f32 {
    1.0
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Leading dimensions of each head that RoPE rotates.
    pub fn rope_dims(&self) -> usize {
        (self.head_dim() as f32 * self.partial_rotary_factor) as usize
    }
}

impl Family for Config {
    const MODEL_TYPES: &'static [&'static str] = &["phi3"];
    const GGUF_ARCHITECTURES: &'static [&'static str] = &["phi3"];

    /// LongRoPE factor tensors become a `rope_scaling` entry so the model refuses them by name.
    fn from_gguf(g: &GgufFile) -> Result<Self> {
        let a = "phi3";
        let (hidden, n_heads) = (arch_u32(g, a, "embedding_length")?, arch_u32(g, a, "attention.head_count")?);
        if n_heads == 0 || hidden % n_heads != 0 {
            return Err(cfg_err(g.path(), format!("head count {n_heads} does not divide hidden size {hidden}")));
        }
        let head_dim = hidden / n_heads;
        let rope_dims = arch_opt_u32(g, a, "rope.dimension_count")?.unwrap_or(head_dim);
        let has = |name: &str| g.tensors().iter().any(|t| t.name == name);
        Ok(Config {
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

    fn model_type(&self) -> &str {
        "phi3"
    }

    fn architecture(&self) -> &'static str {
        "Phi3ForCausalLM"
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

    fn gguf_tensor_name(gguf: &str) -> Option<String> {
        match llamacpp::layer_module(gguf) {
            Some("attn_qkv") => llamacpp::layer_tensor(gguf, "self_attn.qkv_proj"),
            // Phi-3's fused [gate; up] projection is stored as `ffn_up` with 2 * n_ff rows.
            Some("ffn_up") => llamacpp::layer_tensor(gguf, "mlp.gate_up_proj"),
            _ => llamacpp::tensor_name(gguf),
        }
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
        keys.push(format!("{p}.self_attn.qkv_proj.weight"));
        keys.push(format!("{p}.self_attn.o_proj.weight"));
        keys.push(format!("{p}.mlp.gate_up_proj.weight"));
        keys.push(format!("{p}.mlp.down_proj.weight"));
        keys.extend(Layer::norm_keys(&p));
    }
    keys
}

pub struct Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    n_heads: i32,
    n_kv_heads: i32,
    head_dim: i32,
    rope_dims: i32,
    theta: f32,
}

impl Attention {
    fn new(cfg: &Config, w: &mut WeightMap, p: &str) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let qkv = w.take_shaped(&format!("{p}.self_attn.qkv_proj.weight"), &[(nq + 2 * nkv) * d, h])?;
        let o = w.take_shaped(&format!("{p}.self_attn.o_proj.weight"), &[h, nq * d])?;
        Ok(Attention {
            qkv_proj: Linear { weight: qkv, bias: None },
            o_proj: Linear { weight: o, bias: None },
            n_heads: nq as i32,
            n_kv_heads: nkv as i32,
            head_dim: d as i32,
            rope_dims: cfg.rope_dims() as i32,
            theta: cfg.rope_theta,
        })
    }
}

impl Mixer for Attention {
    fn forward(&self, x: &Array, cache: &mut KvCache) -> Result<Array> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let qkv = self.qkv_proj.forward(x)?;
        let (nq, nkv, d) = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.head_dim);
        let heads = |y: Array, n: i32| -> Result<Array> { Ok(y.reshape(&[b, l, n, d])?.transpose_axes(&[0, 2, 1, 3])?) };
        let q = heads(qkv.index((.., .., 0..nq)), self.n_heads)?;
        let k = heads(qkv.index((.., .., nq..nq + nkv)), self.n_kv_heads)?;
        let v = heads(qkv.index((.., .., nq + nkv..)), self.n_kv_heads)?;
        let offset = cache.offset() as i32;
        // fast::rope rotates the first `rope_dims` features and passes the rest through.
        let q = rope(&q, self.rope_dims, false, self.theta, 1.0, offset, None)?;
        let k = rope(&k, self.rope_dims, false, self.theta, 1.0, offset, None)?;
        let scale = 1.0 / (d as f32).sqrt();
        let out = cache.update_and_attend(&q, &k, &v, scale, None)?;
        let out = out.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?;
        self.o_proj.forward(&out)
    }

    fn arrays(&self) -> Vec<&Array> {
        [&self.qkv_proj, &self.o_proj].into_iter().flat_map(|l| l.arrays()).collect()
    }
}

pub struct Mlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    ff: i32,
}

impl Mlp {
    fn new(cfg: &Config, w: &mut WeightMap, p: &str) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let gate_up = w.take_shaped(&format!("{p}.mlp.gate_up_proj.weight"), &[2 * f, h])?;
        let down = w.take_shaped(&format!("{p}.mlp.down_proj.weight"), &[h, f])?;
        Ok(Mlp { gate_up_proj: Linear { weight: gate_up, bias: None }, down_proj: Linear { weight: down, bias: None }, ff: f as i32 })
    }
}

impl FeedForward for Mlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        let gu = self.gate_up_proj.forward(x)?;
        let gate = silu(gu.index((.., .., 0..self.ff)))?;
        self.down_proj.forward(&(gate * gu.index((.., .., self.ff..))))
    }

    fn arrays(&self) -> Vec<&Array> {
        [&self.gate_up_proj, &self.down_proj].into_iter().flat_map(|l| l.arrays()).collect()
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
    /// Builds the model from `w`, which must hold exactly [`expected_keys`].
    pub fn new(cfg: Config, mut w: WeightMap, dtype: Dtype) -> Result<Self> {
        if let Some(s) = &cfg.rope_scaling {
            return Err(ModelError::Unsupported {
                path: w.source.clone(),
                reason: format!("Phi-3 rope_scaling {s} (LongRoPE) is not implemented"),
            });
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) || !cfg.rope_dims().is_multiple_of(2) {
            return Err(ModelError::Config {
                path: w.source.clone(),
                reason: format!(
                    "hidden size {} with {} heads and partial rotary factor {} gives no valid head/RoPE size",
                    cfg.hidden_size, cfg.num_attention_heads, cfg.partial_rotary_factor
                ),
            });
        }
        w.check(&expected_keys(&cfg))?;
        let ends = Ends::load(&mut w, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings, |w| w.take_dense("model.norm.weight", dtype))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let (attn, mlp) = (Attention::new(&cfg, &mut w, &p)?, Mlp::new(&cfg, &mut w, &p)?);
            layers.push(Layer::load(&mut w, &p, dtype, cfg.rms_norm_eps, attn, mlp)?);
        }
        Ok(Model { cfg, dtype, ends, layers })
    }
}

impl LanguageModel for Model {
    fn forward(&self, ids: &Array, caches: &mut [KvCache], last_only: bool) -> Result<Array> {
        forward_stack(&self.ends, &self.layers, self.cfg.rms_norm_eps, self.dtype, ids, caches, last_only)
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
        "phi3"
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.ends.arrays();
        v.extend(self.layers.iter().flat_map(|l| l.arrays()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Weight;
    use mlx_kv::{CacheOptions, KvSpec};
    use std::path::PathBuf;

    fn tiny(partial: f32) -> Config {
        Config {
            hidden_size: 32,
            num_hidden_layers: 2,
            intermediate_size: 48,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            vocab_size: 50,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            partial_rotary_factor: partial,
            rope_scaling: None,
        }
    }

    /// Random weights of the right shapes (norm weights near 1, so activations stay O(1)).
    fn random_weights(cfg: &Config, seed: u64) -> WeightMap {
        let d = cfg.head_dim();
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d;
        let mut key = mlx_rs::random::key(seed).unwrap();
        let mut w = WeightMap::new(PathBuf::from("<random phi3>"));
        for name in expected_keys(cfg) {
            let shape: Vec<usize> = match name.rsplit('.').nth(1).unwrap() {
                "embed_tokens" | "lm_head" => vec![cfg.vocab_size, h],
                "qkv_proj" => vec![qkv, h],
                "o_proj" => vec![h, cfg.num_attention_heads * d],
                "gate_up_proj" => vec![2 * f, h],
                "down_proj" => vec![h, f],
                _ => vec![h],
            };
            let (k1, k2) = mlx_rs::random::split(&key, 2).unwrap();
            key = k1;
            let dims: Vec<i32> = shape.iter().map(|&x| x as i32).collect();
            let (loc, scale) = if shape.len() == 1 { (1.0, 0.1) } else { (0.0, (shape[1] as f32).powf(-0.5)) };
            let a = mlx_rs::random::normal::<f32>(&dims[..], loc, scale, &k2).unwrap();
            w.insert(name, Weight::Dense(a));
        }
        w
    }

    fn caches(model: &Model) -> Vec<KvCache> {
        (0..model.n_layers())
            .map(|_| KvCache::new(KvSpec::dense(), model.head_dim(), CacheOptions::default()).unwrap())
            .collect()
    }

    fn logits(model: &Model, ids: &[i32], chunk: usize) -> Vec<f32> {
        let mut c = caches(model);
        let mut all = Vec::new();
        for part in ids.chunks(chunk) {
            let x = Array::from_slice(part, &[1, part.len() as i32]);
            let y = model.forward(&x, &mut c, false).unwrap();
            y.eval().unwrap();
            all.extend_from_slice(y.as_slice::<f32>());
        }
        all
    }

    /// f32 sums over a few dozen terms, compared across two evaluation orders.
    const F32_REORDER_TOL: f32 = 1e-4;

    #[test]
    fn one_pass_and_token_by_token_decode_agree() {
        for partial in [1.0, 0.5] {
            let cfg = tiny(partial);
            let model = Model::new(cfg.clone(), random_weights(&cfg, 7), Dtype::Float32).unwrap();
            let ids: Vec<i32> = (0..12).map(|i| (i * 7 + 3) % cfg.vocab_size as i32).collect();
            let full = logits(&model, &ids, ids.len());
            assert_eq!(full.len(), ids.len() * cfg.vocab_size);
            for chunk in [1, 5] {
                let stepped = logits(&model, &ids, chunk);
                let d = full.iter().zip(&stepped).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(d < F32_REORDER_TOL, "partial {partial}, chunk {chunk}: max |Δlogit| {d}");
            }
            // Causality: the first position's logits do not depend on later tokens.
            let first = logits(&model, &ids[..1], 1);
            let d = first.iter().zip(&full[..cfg.vocab_size]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d < F32_REORDER_TOL, "partial {partial}: first position differs by {d}");
        }
    }

    #[test]
    fn partial_rotary_leaves_the_tail_of_each_head_unrotated() {
        let cfg = tiny(0.5);
        assert_eq!((cfg.head_dim(), cfg.rope_dims()), (8, 4));
        let x = mlx_rs::random::normal::<f32>(&[1, 1, 3, 8], None, None, &mlx_rs::random::key(1).unwrap()).unwrap();
        let y = rope(&x, cfg.rope_dims() as i32, false, cfg.rope_theta, 1.0, 5, None).unwrap();
        let max_diff = |a: Array, b: Array| (a - b).abs().unwrap().max(None).unwrap().item_exact::<f32>();
        let tail = max_diff(x.index((.., .., .., 4..)), y.index((.., .., .., 4..)));
        let head = max_diff(x.index((.., .., .., ..4)), y.index((.., .., .., ..4)));
        assert_eq!(tail, 0.0, "the unrotated tail changed");
        assert!(head > 1e-3, "the rotated head did not change ({head})");
    }

    #[test]
    fn longrope_is_refused_with_the_file_named() {
        let mut cfg = tiny(1.0);
        cfg.rope_scaling = Some(serde_json::json!({"type": "longrope"}));
        let err = Model::new(cfg.clone(), random_weights(&cfg, 1), Dtype::Float32).err().unwrap().to_string();
        assert!(err.contains("<random phi3>") && err.contains("LongRoPE"), "{err}");
    }

    #[test]
    fn gguf_names_rename_the_fused_modules() {
        let name = |n: &str| <Config as Family>::gguf_tensor_name(n).unwrap();
        assert_eq!(name("blk.1.attn_qkv.weight"), "model.layers.1.self_attn.qkv_proj.weight");
        assert_eq!(name("blk.1.ffn_up.weight"), "model.layers.1.mlp.gate_up_proj.weight");
        assert_eq!(name("blk.1.ffn_down.weight"), "model.layers.1.mlp.down_proj.weight");
    }
}
