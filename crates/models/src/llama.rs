//! The Llama family: Llama 2/3/3.x (with llama3 RoPE scaling), TinyLlama, SmolLM/SmolLM2,
//! Mistral, and Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k norm), which differ from Llama only by
//! the switches in [`Config`].
//!
//! Checkpoint keys are Hugging Face names (`model.layers.N.self_attn.q_proj.weight`); the GGUF
//! loader maps its names onto these in one place. The cache is passed into `forward`; each
//! layer's attention reads its RoPE offset from its cache before updating it.

use crate::config::Config;
use crate::decoder::{Activation, Ends, GatedMlp, Mixer, PreNormLayer};
use crate::error::Result;
use crate::fast::{rms_norm, rope};
use crate::model::LanguageModel;
use crate::weights::{Linear, WeightMap};
use mlx_kv::KvCache;
use mlx_rs::{Array, Dtype};

/// Keys a checkpoint of this config must contain, exactly.
pub fn expected_keys(cfg: &Config) -> Vec<String> {
    let mut keys = Ends::keys(cfg.tie_word_embeddings);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            keys.push(format!("{p}.self_attn.{name}.weight"));
        }
        if cfg.has_qkv_bias() {
            for name in ["q_proj", "k_proj", "v_proj"] {
                keys.push(format!("{p}.self_attn.{name}.bias"));
            }
        }
        if cfg.has_qk_norm() {
            keys.push(format!("{p}.self_attn.q_norm.weight"));
            keys.push(format!("{p}.self_attn.k_norm.weight"));
        }
        keys.extend(GatedMlp::keys(&p));
        keys.extend(Layer::norm_keys(&p));
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
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
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
    fn new(cfg: &Config, w: &mut WeightMap, p: &str, dtype: Dtype) -> Result<Self> {
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
            q_proj,
            k_proj,
            v_proj,
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

impl Mixer for Attention {
    fn forward(&self, x: &Array, cache: &mut KvCache) -> Result<Array> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let heads = |y: Array, n: i32, norm: &Option<Array>| -> Result<Array> {
            let y = y.reshape(&[b, l, n, self.head_dim])?;
            let y = match norm {
                Some(wn) => rms_norm(&y, Some(wn), self.eps)?,
                None => y,
            };
            Ok(y.transpose_axes(&[0, 2, 1, 3])?)
        };
        let q = heads(self.q_proj.forward(x)?, self.n_heads, &self.q_norm)?;
        let k = heads(self.k_proj.forward(x)?, self.n_kv_heads, &self.k_norm)?;
        let v = heads(self.v_proj.forward(x)?, self.n_kv_heads, &None)?;
        let offset = cache.offset() as i32;
        let q = self.rope(&q, offset)?;
        let k = self.rope(&k, offset)?;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let out = cache.update_and_attend(&q, &k, &v, scale, None)?;
        let out = out.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?;
        self.o_proj.forward(&out)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v: Vec<&Array> = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj].into_iter().flat_map(|l| l.arrays()).collect();
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
        let mut x = self.ends.embed_tokens.forward(ids, self.dtype)?;
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            x = layer.forward(&x, cache)?;
        }
        self.ends.logits(x, self.cfg.rms_norm_eps, last_only)
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
