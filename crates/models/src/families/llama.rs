//! The Llama family: Llama 2/3/3.x (with llama3 RoPE scaling), TinyLlama, SmolLM/SmolLM2,
//! Mistral, and Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k norm), which differ from Llama only by
//! the switches in [`Config`].
//!
//! Checkpoint keys are Hugging Face names (`model.layers.N.self_attn.q_proj.weight`); GGUF
//! names are mapped onto these by the [`Family`] impl, which also undoes the Q/K row permutation
//! that llama.cpp's converter applies to `llama`-architecture checkpoints, so every model runs
//! with the standard (non-interleaved) RoPE exactly as its HF checkpoint would. The cache is
//! passed into `forward`; each layer's attention reads its RoPE offset from its cache before
//! updating it.

use crate::decoder::{Activation, Ends, GatedMlp, Mixer, PreNormLayer, forward_stack, forward_stack_batch};
use crate::error::{ModelError, Result};
use crate::families::llamacpp;
use crate::fast::{rms_norm, rope, rope_rows};
use crate::gguf::GgufFile;
use crate::model::{Family, LanguageModel};
use crate::projections::Projections;
use crate::shard::{self, Shard};
use crate::weights::{Linear, Weight, WeightMap};
use mlx_kv::KvCache;
use mlx_rs::{Array, Dtype};
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

impl Family for Config {
    const MODEL_TYPES: &'static [&'static str] = &["llama", "mistral", "qwen2", "qwen3"];
    const GGUF_ARCHITECTURES: &'static [&'static str] = &["llama", "mistral", "qwen2", "qwen3"];

    fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let arch = g.get_str("general.architecture")?.to_string();
        let model_type = match arch.as_str() {
            "llama" | "mistral" | "qwen2" | "qwen3" => arch.clone(),
            other => return Err(ModelError::Unsupported { path: path.into(), reason: format!("GGUF architecture '{other}'") }),
        };
        let u = |k: &str| -> Result<usize> { Ok(g.get_u32(&format!("{arch}.{k}"))? as usize) };
        // llama.cpp writes Mixtral as `llama` with experts; its stacked expert tensors are not
        // mapped yet, and reading it as a dense Llama would fail later with missing keys.
        if let Some(n) = g.optional(&format!("{arch}.expert_count"), |g, k| g.get_u32(k))?.filter(|&n| n > 0) {
            let reason = format!("GGUF architecture '{arch}' with {arch}.expert_count = {n} (Mixtral-style experts) is not supported yet; load its MLX or Hugging Face directory");
            return Err(ModelError::Unsupported { path: path.into(), reason });
        }
        let n_heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let head_dim = g.optional(&format!("{arch}.attention.key_length"), |g, k| g.get_u32(k))?.map(|x| x as usize);
        let vocab = g.tensor("token_embd.weight")?.shape()[0];
        let tie = !g.tensors().iter().any(|t| t.name == "output.weight");
        let theta = g.optional(&format!("{arch}.rope.freq_base"), |g, k| g.get_f32(k))?.unwrap_or(10000.0);
        let eps = g.get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))?;
        if n_heads == 0 || hidden % n_heads != 0 && head_dim.is_none() {
            return Err(llamacpp::cfg_err(path, format!("head count {n_heads} does not divide hidden size {hidden}")));
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

    fn model_type(&self) -> &str {
        &self.model_type
    }

    fn architecture(&self) -> &'static str {
        match self.model_type.as_str() {
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            _ => "LlamaForCausalLM",
        }
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
        llamacpp::tensor_name(gguf)
    }

    fn undo_gguf_tensor(&self, hf: &str, w: Weight, _dtype: Dtype) -> Result<Weight> {
        let permuted = self.model_type == "llama" || self.model_type == "mistral";
        if permuted && (hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight")) {
            let rows = w.shape()[0];
            return take_rows(w, &unpermute_rows(rows, self.head_dim()));
        }
        Ok(w)
    }

    fn build(self, weights: WeightMap, dtype: Dtype) -> Result<Box<dyn LanguageModel>> {
        Ok(Box::new(Model::new(self, weights, dtype)?))
    }

    fn shard(mut self, mut weights: WeightMap, s: &Shard) -> Result<(Self, WeightMap)> {
        let d = self.head_dim();
        let kv = s.part("KV heads (num_key_value_heads)", self.num_key_value_heads)?;
        let q = s.part("attention heads (num_attention_heads)", self.num_attention_heads)?;
        let ff = s.part("MLP units (intermediate_size)", self.intermediate_size)?;
        let x_d = |r: &std::ops::Range<usize>| r.start * d..r.end * d;
        weights.map(|name, w| match name.rsplit('.').nth(1) {
            Some("q_proj") => shard::rows(w, x_d(&q)),
            Some("k_proj" | "v_proj") => shard::rows(w, x_d(&kv)),
            Some("o_proj") => shard::columns(w, x_d(&q), name),
            Some("gate_proj" | "up_proj") => shard::rows(w, ff.clone()),
            Some("down_proj") => shard::columns(w, ff.clone(), name),
            _ => Ok(w),
        })?;
        // The head width was derived from the whole head count when not given.
        self.head_dim = Some(d);
        self.num_attention_heads = q.len();
        self.num_key_value_heads = kv.len();
        self.intermediate_size = ff.len();
        Ok((self, weights))
    }
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
        Weight::Mx { w, scales, format } => Weight::Mx { w: w.take_axis(idx, 0)?, scales: scales.take_axis(idx, 0)?, format },
    })
}

/// Keys a checkpoint of this config must contain, exactly.
pub fn expected_keys(cfg: &Config) -> Vec<String> {
    let mut keys = Ends::keys(cfg.tie_word_embeddings);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        keys.extend(attention_keys(cfg, &p));
        keys.extend(GatedMlp::keys(&p));
        keys.extend(Layer::norm_keys(&p));
    }
    keys
}

/// The attention keys of layer `p` (the MoE families share this attention).
pub(crate) fn attention_keys(cfg: &Config, p: &str) -> Vec<String> {
    let mut keys: Vec<String> = ["q_proj", "k_proj", "v_proj", "o_proj"].iter().map(|n| format!("{p}.self_attn.{n}.weight")).collect();
    if cfg.has_qkv_bias() {
        keys.extend(["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}.self_attn.{n}.bias")));
    }
    if cfg.has_qk_norm() {
        keys.extend(["q_norm", "k_norm"].map(|n| format!("{p}.self_attn.{n}.weight")));
    }
    keys
}

/// Inverse frequencies for llama3-style RoPE scaling, or None for plain RoPE.
fn rope_freqs(cfg: &Config) -> Option<Array> {
    let s = cfg.rope_scaling.as_ref()?;
    if s.rope_type != "llama3" {
        return None;
    }
    let dims = cfg.head_dim();
    let factor = s.factor.unwrap_or(8.0);
    let low = s.low_freq_factor.unwrap_or(1.0);
    let high = s.high_freq_factor.unwrap_or(4.0);
    let old_ctx = s.original_max_position_embeddings.unwrap_or(8192) as f32;
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    let freqs: Vec<f32> = (0..dims / 2)
        .map(|i| {
            // fast::rope takes periods (base^(2i/d)), not inverse frequencies.
            let f = cfg.rope_theta.powf(2.0 * i as f32 / dims as f32);
            let wavelen = 2.0 * std::f32::consts::PI * f;
            if wavelen > low_wavelen {
                f * factor
            } else if wavelen > high_wavelen {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                f / ((1.0 - smooth) / factor + smooth)
            } else {
                f
            }
        })
        .collect();
    Some(Array::from_slice(&freqs, &[(dims / 2) as i32]))
}

pub struct Attention {
    /// q, k and v, in that order.
    qkv: Projections,
    o_proj: Linear,
    q_norm: Option<Array>,
    k_norm: Option<Array>,
    n_heads: i32,
    n_kv_heads: i32,
    head_dim: i32,
    eps: f32,
    theta: f32,
    freqs: Option<Array>,
}

impl Attention {
    pub(crate) fn new(cfg: &Config, w: &mut WeightMap, p: &str, dtype: Dtype) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = w.take_shaped(&format!("{p}.self_attn.{name}.weight"), &[out, inp])?;
            let bias = if bias { Some(w.take_dense(&format!("{p}.self_attn.{name}.bias"), dtype)?) } else { None };
            Ok(Linear { weight, bias })
        };
        let b = cfg.has_qkv_bias();
        let q_proj = lin("q_proj", nq * d, h, b)?;
        let k_proj = lin("k_proj", nkv * d, h, b)?;
        let v_proj = lin("v_proj", nkv * d, h, b)?;
        let o_proj = lin("o_proj", h, nq * d, false)?;
        let (q_norm, k_norm) = if cfg.has_qk_norm() {
            (
                Some(w.take_dense(&format!("{p}.self_attn.q_norm.weight"), dtype)?),
                Some(w.take_dense(&format!("{p}.self_attn.k_norm.weight"), dtype)?),
            )
        } else {
            (None, None)
        };
        Ok(Attention {
            qkv: Projections::new(vec![q_proj, k_proj, v_proj])?,
            o_proj,
            q_norm,
            k_norm,
            n_heads: nq as i32,
            n_kv_heads: nkv as i32,
            head_dim: d as i32,
            eps: cfg.rms_norm_eps,
            theta: cfg.rope_theta,
            freqs: rope_freqs(cfg),
        })
    }

    fn rope(&self, x: &Array, offset: i32) -> Result<Array> {
        Ok(match &self.freqs {
            Some(f) => rope(x, self.head_dim, false, None, 1.0, offset, f)?,
            None => rope(x, self.head_dim, false, self.theta, 1.0, offset, None)?,
        })
    }
}

impl Attention {
    /// Q, K and V `[B, heads, L, head_dim]` of `x` `[B, L, hidden]`, before RoPE.
    fn qkv(&self, x: &Array) -> Result<(Array, Array, Array)> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let heads = |y: Array, n: i32, norm: &Option<Array>| -> Result<Array> {
            let y = y.reshape(&[b, l, n, self.head_dim])?;
            let y = match norm {
                Some(wn) => rms_norm(&y, Some(wn), self.eps)?,
                None => y,
            };
            Ok(y.transpose_axes(&[0, 2, 1, 3])?)
        };
        let [q, k, v]: [Array; 3] = self.qkv.forward(x)?.try_into().expect("three projections give three outputs");
        let q = heads(q, self.n_heads, &self.q_norm)?;
        let k = heads(k, self.n_kv_heads, &self.k_norm)?;
        let v = heads(v, self.n_kv_heads, &None)?;
        Ok((q, k, v))
    }

    /// RoPE at the cache's position, then the cache's write and attention: `[B, heads, L, d]`.
    fn attend(&self, q: &Array, k: &Array, v: &Array, cache: &mut KvCache) -> Result<Array> {
        let offset = cache.offset() as i32;
        let q = self.rope(q, offset)?;
        let k = self.rope(k, offset)?;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        Ok(cache.update_and_attend(&q, &k, v, scale, None)?)
    }

    /// `[B, heads, L, d]` back to `[B, L, hidden]` through the output projection.
    fn output(&self, out: &Array) -> Result<Array> {
        let (b, l) = (out.shape()[0], out.shape()[2]);
        shard::reduce(self.o_proj.forward(&out.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?)?)
    }
}

impl Mixer for Attention {
    fn forward(&self, x: &Array, cache: &mut KvCache) -> Result<Array> {
        let (q, k, v) = self.qkv(x)?;
        self.output(&self.attend(&q, &k, &v, cache)?)
    }

    fn forward_batch(&self, x: &Array, caches: &mut [&mut KvCache]) -> Result<Array> {
        let (q, k, v) = self.qkv(x)?;
        let offsets: Vec<i32> = caches.iter().map(|c| c.offset() as i32).collect();
        let rope = |x: &Array| match &self.freqs {
            Some(f) => rope_rows(x, self.head_dim, false, None, 1.0, &offsets, Some(f)),
            None => rope_rows(x, self.head_dim, false, Some(self.theta), 1.0, &offsets, None),
        };
        let (q, k) = (rope(&q)?, rope(&k)?);
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        self.output(&mlx_kv::batch::update_and_attend(caches, &q, &k, &v, scale)?)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.qkv.arrays();
        v.extend(self.o_proj.arrays());
        v.extend(self.q_norm.iter().chain(self.k_norm.iter()));
        v
    }
}

type Layer = PreNormLayer<Attention, GatedMlp>;

pub struct Model {
    pub cfg: Config,
    pub dtype: Dtype,
    ends: Ends,
    layers: Vec<Layer>,
}

impl Model {
    /// Builds the model from `w`, which must hold exactly [`expected_keys`].
    pub fn new(cfg: Config, mut w: WeightMap, dtype: Dtype) -> Result<Self> {
        w.check(&expected_keys(&cfg))?;
        let ends = Ends::load(&mut w, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings, |w| w.take_dense("model.norm.weight", dtype))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = Attention::new(&cfg, &mut w, &p, dtype)?;
            let mlp = GatedMlp::load(&mut w, &p, cfg.hidden_size, cfg.intermediate_size, Activation::Silu)?;
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
        &self.cfg.model_type
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

    #[test]
    fn unpermute_inverts_the_converter_interleave() {
        // Converter: gguf_row(h, i, j) = hf_row(h, j, i) for head_dim 4 (half 2).
        let idx = unpermute_rows(8, 4);
        let got: Vec<i32> = idx.as_slice::<i32>().to_vec();
        assert_eq!(got, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn gguf_names_are_the_standard_ones() {
        assert_eq!(Config::gguf_tensor_name("blk.1.ffn_up.weight").unwrap(), "model.layers.1.mlp.up_proj.weight");
        assert_eq!(Config::gguf_tensor_name("blk.1.ffn_norm.weight").unwrap(), "model.layers.1.post_attention_layernorm.weight");
    }
}
