//! What Gemma 2 and Gemma 3 share: RMSNorm weights used as `1 + weight` (folded once at load),
//! a layer normalized before and after both of its sub-blocks (four norms), llama.cpp's names
//! for those norms and its stored `1 + weight`, and soft-capping (`cap * tanh(x / cap)`) of
//! the final logits. Each family keeps its own attention.

use crate::decoder::{Activation, FeedForward, GatedMlp, Mixer};
use crate::error::{ModelError, Result};
use crate::families::llamacpp;
use crate::fast::rms_norm;
use crate::weights::{Weight, WeightMap};
use mlx_kv::KvCache;
use mlx_rs::{Array, Dtype};

/// Gemma's RMSNorm scales by `1 + weight`; folded once at load time.
pub(crate) fn norm_weight(w: &mut WeightMap, name: &str, dtype: Dtype) -> Result<Array> {
    Ok(w.take_dense(name, dtype)? + Array::from_f32(1.0).as_dtype(dtype)?)
}

const NORMS: [&str; 4] = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"];

/// `h = x + norm(attn(norm(x))); h + norm(mlp(norm(h)))`, the MLP GELU-tanh gated.
pub(crate) struct SandwichLayer<A> {
    pub self_attn: A,
    mlp: GatedMlp,
    norms: [Array; 4],
    eps: f32,
}

impl<A: Mixer> SandwichLayer<A> {
    /// Takes layer `p`'s MLP and four norms around `self_attn`.
    pub fn load(w: &mut WeightMap, p: &str, hidden: usize, intermediate: usize, eps: f32, dtype: Dtype, self_attn: A) -> Result<Self> {
        let mut norm = |name: &str| norm_weight(w, &format!("{p}.{name}.weight"), dtype);
        let norms = [norm(NORMS[0])?, norm(NORMS[1])?, norm(NORMS[2])?, norm(NORMS[3])?];
        let mlp = GatedMlp::load(w, p, hidden, intermediate, Activation::GeluTanh)?;
        Ok(SandwichLayer { self_attn, mlp, norms, eps })
    }

    /// The MLP's and the four norms' keys of layer `p` (attention keys are the family's).
    pub fn keys(p: &str) -> impl Iterator<Item = String> + '_ {
        GatedMlp::keys(p).chain(NORMS.into_iter().map(move |n| format!("{p}.{n}.weight")))
    }

    pub fn forward(&self, x: &Array, cache: &mut KvCache) -> Result<Array> {
        let norm = |y: &Array, i: usize| rms_norm(y, Some(&self.norms[i]), self.eps);
        let r = self.self_attn.forward(&norm(x, 0)?, cache)?;
        let h = x + norm(&r, 1)?;
        let r = self.mlp.forward(&norm(&h, 2)?)?;
        Ok(h + norm(&r, 3)?)
    }

    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = self.self_attn.arrays();
        v.extend(self.mlp.arrays());
        v.extend(self.norms.iter());
        v
    }
}

/// llama.cpp's Gemma names: `post_attention_norm` is the post-attention norm and `ffn_norm` the
/// pre-MLP one (Llama's `ffn_norm` is HF's `post_attention_layernorm`).
pub(crate) fn gguf_tensor_name(gguf: &str) -> Option<String> {
    let hf = match llamacpp::layer_module(gguf) {
        Some("post_attention_norm") => "post_attention_layernorm",
        Some("ffn_norm") => "pre_feedforward_layernorm",
        Some("post_ffw_norm") => "post_feedforward_layernorm",
        _ => return llamacpp::tensor_name(gguf),
    };
    llamacpp::layer_tensor(gguf, hf)
}

/// llama.cpp's Gemma converters store RMSNorm weights as `1 + w`; keep HF's `w`.
pub(crate) fn undo_gguf_tensor(hf: &str, w: Weight, dtype: Dtype) -> Result<Weight> {
    if hf.ends_with("norm.weight") {
        if let Weight::Dense(a) = w {
            return Ok(Weight::Dense(a - Array::from_f32(1.0).as_dtype(dtype)?));
        }
    }
    Ok(w)
}

/// Soft caps from `config.json` must be positive and finite (null: none).
pub(crate) fn check_caps(source: &std::path::Path, attn: Option<f32>, last: Option<f32>) -> Result<()> {
    for (key, cap) in [("attn_logit_softcapping", attn), ("final_logit_softcapping", last)] {
        if let Some(c) = cap.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(ModelError::Config { path: source.into(), reason: format!("{key} is {c}; a soft cap must be positive (null: none)") });
        }
    }
    Ok(())
}

/// `cap * tanh(logits / cap)`, or the logits as they are without a cap.
pub(crate) fn soft_cap(logits: Array, cap: Option<f32>) -> Result<Array> {
    Ok(match cap {
        Some(cap) if cap > 0.0 => {
            let cap = Array::from_f32(cap).as_dtype(logits.dtype())?;
            mlx_rs::ops::tanh(&(logits / &cap))? * cap
        }
        _ => logits,
    })
}
