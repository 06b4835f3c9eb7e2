//! The parts the decoder families share: the gated MLP, the Llama-style pre-norm residual layer
//! and the two ends of the stack (token embedding; final norm and output head).
//!
//! A family keeps what is its own (attention with its projections and RoPE, fused or extra
//! weights, Gemma's four norms per layer) and builds the rest from here, so a fix to the layer
//! or the output path lands once. Field names are checkpoint key names.

use crate::error::Result;
use crate::fast::rms_norm;
use crate::projections::Projections;
use crate::weights::{output_logits, Embedding, Linear, WeightMap};
use mlx_kv::KvCache;
use mlx_rs::nn::{gelu_approximate, silu};
use mlx_rs::ops::concatenate;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Dtype};

/// A layer's attention: reads and extends its cache.
pub trait Mixer {
    fn forward(&self, x: &Array, cache: &mut KvCache) -> Result<Array>;
    /// One decode token for each of `B` sequences: `x` `[B, 1, hidden]`, row `b` attending over
    /// `caches[b]`. A mixer that batches runs its projections over all rows at once and
    /// attention per sequence; this default runs the rows one after another.
    fn forward_batch(&self, x: &Array, caches: &mut [&mut KvCache]) -> Result<Array> {
        let mut rows = Vec::with_capacity(caches.len());
        for (b, cache) in caches.iter_mut().enumerate() {
            let r = b as i32..b as i32 + 1;
            rows.push(self.forward(&x.index((r, ..)), cache)?);
        }
        Ok(concatenate(&rows, 0)?)
    }
    /// Every weight array, for evaluation after loading.
    fn arrays(&self) -> Vec<&Array>;
}

/// A layer's feed-forward block.
pub trait FeedForward {
    fn forward(&self, x: &Array) -> Result<Array>;
    fn arrays(&self) -> Vec<&Array>;
}

/// The gate's activation in a [`GatedMlp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Llama, Qwen, Mistral, Phi.
    Silu,
    /// Gemma (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// `down_proj(act(gate_proj(x)) * up_proj(x))`, keys `{p}.mlp.{gate,up,down}_proj.weight`.
pub struct GatedMlp {
    /// gate, then up.
    gate_up: Projections,
    down_proj: Linear,
    act: Activation,
}

impl GatedMlp {
    pub fn load(w: &mut WeightMap, p: &str, hidden: usize, intermediate: usize, act: Activation) -> Result<Self> {
        let mut lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear { weight: w.take_shaped(&format!("{p}.mlp.{name}.weight"), &[out, inp])?, bias: None })
        };
        let (gate, up) = (lin("gate_proj", intermediate, hidden)?, lin("up_proj", intermediate, hidden)?);
        Ok(GatedMlp {
            gate_up: Projections::new(vec![gate, up])?,
            down_proj: lin("down_proj", hidden, intermediate)?,
            act,
        })
    }

    /// The three keys a checkpoint holds for this block.
    pub fn keys(p: &str) -> impl Iterator<Item = String> + '_ {
        ["gate_proj", "up_proj", "down_proj"].into_iter().map(move |n| format!("{p}.mlp.{n}.weight"))
    }
}

impl FeedForward for GatedMlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        let [g, u]: [Array; 2] = self.gate_up.forward(x)?.try_into().expect("two projections give two outputs");
        let g = match self.act {
            Activation::Silu => silu(g)?,
            Activation::GeluTanh => gelu_approximate(g)?,
        };
        crate::shard::reduce(self.down_proj.forward(&(g * u))?)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.gate_up.arrays();
        v.extend(self.down_proj.arrays());
        v
    }
}

/// `h = x + attn(norm(x)); h + mlp(norm(h))` (Llama, Qwen, Mistral, Phi-3).
pub struct PreNormLayer<A, M> {
    pub self_attn: A,
    pub mlp: M,
    input_layernorm: Array,
    post_attention_layernorm: Array,
    eps: f32,
}

impl<A: Mixer, M: FeedForward> PreNormLayer<A, M> {
    /// Takes the two norms of layer `p` (`{p}.input_layernorm.weight`,
    /// `{p}.post_attention_layernorm.weight`) around the given blocks.
    pub fn load(w: &mut WeightMap, p: &str, dtype: Dtype, eps: f32, self_attn: A, mlp: M) -> Result<Self> {
        Ok(PreNormLayer {
            self_attn,
            mlp,
            input_layernorm: w.take_dense(&format!("{p}.input_layernorm.weight"), dtype)?,
            post_attention_layernorm: w.take_dense(&format!("{p}.post_attention_layernorm.weight"), dtype)?,
            eps,
        })
    }

    /// The two norm keys of layer `p`.
    pub fn norm_keys(p: &str) -> [String; 2] {
        [format!("{p}.input_layernorm.weight"), format!("{p}.post_attention_layernorm.weight")]
    }

    pub fn forward(&self, x: &Array, cache: &mut KvCache) -> Result<Array> {
        let h = x + self.self_attn.forward(&rms_norm(x, Some(&self.input_layernorm), self.eps)?, cache)?;
        let m = self.mlp.forward(&rms_norm(&h, Some(&self.post_attention_layernorm), self.eps)?)?;
        Ok(h + m)
    }

    /// [`Self::forward`] for one decode token of each of `B` sequences ([`Mixer::forward_batch`]).
    pub fn forward_batch(&self, x: &Array, caches: &mut [&mut KvCache]) -> Result<Array> {
        let h = x + self.self_attn.forward_batch(&rms_norm(x, Some(&self.input_layernorm), self.eps)?, caches)?;
        let m = self.mlp.forward(&rms_norm(&h, Some(&self.post_attention_layernorm), self.eps)?)?;
        Ok(h + m)
    }

    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = self.self_attn.arrays();
        v.extend(self.mlp.arrays());
        v.extend([&self.input_layernorm, &self.post_attention_layernorm]);
        v
    }
}

/// A whole pre-norm decoder: embed `ids`, run each layer over its own cache, then the final
/// norm and head (`last_only` keeps the last position).
pub fn forward_stack<A: Mixer, M: FeedForward>(ends: &Ends, layers: &[PreNormLayer<A, M>], eps: f32, dtype: Dtype, ids: &Array, caches: &mut [KvCache], last_only: bool) -> Result<Array> {
    let mut x = ends.embed_tokens.forward(ids, dtype)?;
    for (layer, cache) in layers.iter().zip(caches.iter_mut()) {
        x = layer.forward(&x, cache)?;
        settle_chunk(&x)?;
    }
    ends.logits(x, eps, last_only)
}

/// Prefill chunks of at least this many tokens are queued for the device layer by layer.
pub const SETTLE_TOKENS: i32 = 256;

/// Queues a long prefill chunk's hidden state `x` (`[B, L, hidden]`) for evaluation after each
/// layer, without waiting for it. Left as one lazy graph, a chunk's whole stack runs as one
/// evaluation, and the device frees no layer's temporaries (MLP activations, attention scores,
/// widened cache runs) before the last layer is queued: peak memory grows with the layer count.
/// Decode steps stay one graph (their temporaries are small, and one evaluation is cheapest).
/// `--layer-eval off` leaves chunks whole too.
pub fn settle_chunk(x: &Array) -> Result<()> {
    // The shape first: a decode step (one token) then never reads the options' lock.
    if x.shape().get(1).is_some_and(|&l| l >= SETTLE_TOKENS) && mlx_ext::options::current().layer_eval.on() {
        mlx_rs::transforms::async_eval([x])?;
    }
    Ok(())
}

/// [`forward_stack`] for one decode token of each of `B` sequences; `caches[b]` holds
/// sequence b's layers.
pub fn forward_stack_batch<A: Mixer, M: FeedForward>(ends: &Ends, layers: &[PreNormLayer<A, M>], eps: f32, dtype: Dtype, ids: &Array, caches: &mut [&mut [KvCache]]) -> Result<Array> {
    let mut x = ends.embed_tokens.forward(ids, dtype)?;
    for (i, layer) in layers.iter().enumerate() {
        let mut layer_caches: Vec<&mut KvCache> = caches.iter_mut().map(|c| &mut c[i]).collect();
        x = layer.forward_batch(&x, &mut layer_caches)?;
    }
    ends.logits(x, eps, true)
}

/// The ends of a decoder stack: `model.embed_tokens`, `model.norm` and `lm_head` (absent when
/// the embedding is tied and doubles as the output head).
pub struct Ends {
    pub embed_tokens: Embedding,
    pub norm: Array,
    pub lm_head: Option<Linear>,
}

impl Ends {
    /// Keys of the ends: the head only when untied.
    pub fn keys(tie_word_embeddings: bool) -> Vec<String> {
        let mut keys = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
        if !tie_word_embeddings {
            keys.push("lm_head.weight".into());
        }
        keys
    }

    /// Takes the embedding and head (`[vocab, hidden]`); `norm` is the final norm's weight as
    /// the family prepares it.
    pub fn load(w: &mut WeightMap, hidden: usize, vocab: usize, tie_word_embeddings: bool, norm: impl FnOnce(&mut WeightMap) -> Result<Array>) -> Result<Self> {
        let embed_tokens = Embedding { weight: w.take_shaped("model.embed_tokens.weight", &[vocab, hidden])? };
        let lm_head = if tie_word_embeddings {
            None
        } else {
            Some(Linear { weight: w.take_shaped("lm_head.weight", &[vocab, hidden])?, bias: None })
        };
        Ok(Ends { embed_tokens, norm: norm(w)?, lm_head })
    }

    /// Final norm and head; `last_only` keeps the last position.
    pub fn logits(&self, x: Array, eps: f32, last_only: bool) -> Result<Array> {
        output_logits(x, &self.norm, eps, self.lm_head.as_ref(), &self.embed_tokens, last_only)
    }

    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = self.embed_tokens.weight.arrays();
        v.push(&self.norm);
        if let Some(h) = &self.lm_head {
            v.extend(h.arrays());
        }
        v
    }
}
