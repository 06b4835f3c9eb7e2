//! The gpt-oss family (OpenAI gpt-oss-20b, gpt-oss-120b): a pre-norm decoder whose every MLP is
//! a sparse mixture of experts, checked against mlx-lm's `gpt_oss.py`.
//!
//! Against Mixtral: q/k/v/o projections carry biases; each query head has a learned sink logit
//! (`self_attn.sinks`) that joins its softmax denominator and contributes no value (applied by
//! the KV cache, [`mlx_kv::KvCache::update_and_attend`]); layers alternate between a sliding
//! window and full attention (`layer_types`, else even layers slide, as mlx-lm does); RoPE is
//! YaRN-scaled ([`crate::yarn`]); the router and the experts carry biases, and the experts'
//! gate is gpt-oss's clamped SwiGLU ([`GluActivation::ClampedSwiglu`]).
//!
//! Directories hold mlx-lm's stacked experts (`mlp.experts.{gate,up,down}_proj.{weight,bias}`,
//! as mlx-community writes them) or Hugging Face's (`mlp.experts.gate_up_proj` `[E, hidden,
//! 2 inter]` with gate and up interleaved, `down_proj` `[E, inter, hidden]`, `*_bias`), which
//! load splits into the former. OpenAI's MXFP4 experts (`*_blocks`, `*_scales`, with
//! `quantization_config.quant_method: mxfp4`) load as microscaled weights
//! ([`crate::weights::Weight::Mx`]), as do mlx-community's (`"mode": "mxfp4"` per module in
//! `quantization`); MLX's own mxfp4 kernels run them. GGUF (`gpt-oss`) is refused by name.

use crate::decoder::{Ends, Mixer, PreNormLayer, forward_stack, forward_stack_batch};
use crate::error::{ModelError, Result};
use crate::fast::rope;
use crate::gguf::GgufFile;
use crate::model::{Family, LanguageModel};
use crate::moe::{GluActivation, MoeLayout, Routing, SparseMoe};
use crate::projections::Projections;
use crate::weights::{Linear, Weight, WeightMap};
use crate::yarn::YarnScaling;
use mlx_kv::KvCache;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Dtype};
use serde::{Deserialize, Serialize};

/// `config.json` of a gpt-oss model (`model_type: gpt_oss`); defaults are mlx-lm's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    /// Width of each expert's MLP.
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub vocab_size: usize,
    #[serde(default = "default_window")]
    pub sliding_window: usize,
    /// Per-layer `sliding_attention` / `full_attention`; without it even layers slide.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub rope_scaling: Option<YarnScaling>,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// The clamp of the experts' SwiGLU (mlx-lm fixes it at 7).
    #[serde(default = "default_limit")]
    pub swiglu_limit: f32,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_window() -> usize {
    128
}

fn default_ctx() -> usize {
    131_072
}

fn default_limit() -> f32 {
    SWIGLU_LIMIT
}

/// gpt-oss's SwiGLU constants (mlx-lm's `swiglu_oai`).
const SWIGLU_ALPHA: f32 = 1.702;
const SWIGLU_LIMIT: f32 = 7.0;

/// mlx-lm's names after its `sanitize`: router `mlp.router`, experts `mlp.experts`, biased.
pub const LAYOUT: MoeLayout = MoeLayout {
    router: "router",
    experts: "experts",
    bias: true,
    activation: GluActivation::ClampedSwiglu { alpha: SWIGLU_ALPHA, limit: SWIGLU_LIMIT },
};

impl Config {
    /// Whether layer `i` attends over a sliding window.
    pub fn is_sliding(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(t) => t.get(i).is_some_and(|s| s == "sliding_attention"),
            None => i.is_multiple_of(2),
        }
    }

    /// Values the forward pass cannot run, named by their `config.json` key.
    fn check(&self, path: &std::path::Path) -> Result<()> {
        let bad = |reason: String| Err(ModelError::Config { path: path.to_path_buf(), reason: format!("config.json: {reason}") });
        if self.num_local_experts == 0 || self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_local_experts {
            return bad(format!("num_experts_per_tok {} must be 1 to num_local_experts {}", self.num_experts_per_tok, self.num_local_experts));
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!("num_key_value_heads {} does not divide num_attention_heads {}", self.num_key_value_heads, self.num_attention_heads));
        }
        if self.sliding_window == 0 {
            return bad("sliding_window is 0".into());
        }
        if let Some(t) = &self.layer_types {
            if t.len() != self.num_hidden_layers {
                return bad(format!("layer_types has {} entries for num_hidden_layers {}", t.len(), self.num_hidden_layers));
            }
            if let Some(x) = t.iter().find(|x| *x != "sliding_attention" && *x != "full_attention") {
                return bad(format!("layer_types entry '{x}' is neither sliding_attention nor full_attention"));
            }
        }
        if let Some(s) = &self.rope_scaling {
            if s.rope_type != "yarn" {
                return bad(format!("rope_scaling rope_type '{}' is not supported for gpt_oss (yarn only)", s.rope_type));
            }
        }
        if self.swiglu_limit != SWIGLU_LIMIT {
            return bad(format!("swiglu_limit {} differs from the 7.0 mlx-lm and Hugging Face run", self.swiglu_limit));
        }
        if self.tie_word_embeddings {
            return bad("tie_word_embeddings is true; gpt-oss stores its own lm_head".into());
        }
        Ok(())
    }

    /// Keys of a checkpoint with mlx-lm's stacked experts.
    pub fn expected_keys(&self) -> Vec<String> {
        let mut keys = Ends::keys(false);
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                keys.extend(["weight", "bias"].map(|s| format!("{p}.self_attn.{n}.{s}")));
            }
            keys.push(format!("{p}.self_attn.sinks"));
            keys.extend(SparseMoe::keys_of(&format!("{p}.mlp"), &LAYOUT));
            keys.extend(Layer::norm_keys(&p));
        }
        keys
    }
}

impl Family for Config {
    const MODEL_TYPES: &'static [&'static str] = &["gpt_oss"];
    const GGUF_ARCHITECTURES: &'static [&'static str] = &["gpt-oss"];

    fn from_gguf(g: &GgufFile) -> Result<Self> {
        Err(ModelError::Unsupported { path: g.path().into(), reason: "GGUF architecture 'gpt-oss' is not supported yet (load its MLX or Hugging Face directory)".into() })
    }

    fn model_type(&self) -> &str {
        "gpt_oss"
    }

    fn architecture(&self) -> &'static str {
        "GptOssForCausalLM"
    }

    fn num_hidden_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn head_dim(&self) -> usize {
        self.head_dim
    }

    fn drops_stored_head(&self) -> bool {
        false
    }

    fn gguf_tensor_name(_gguf: &str) -> Option<String> {
        None
    }

    fn build(self, weights: WeightMap, dtype: Dtype) -> Result<Box<dyn LanguageModel>> {
        Ok(Box::new(Model::new(self, weights, dtype)?))
    }
}

/// Hugging Face's fused expert tensors of block `p` (`{p}.experts.gate_up_proj`, ...) as
/// mlx-lm's stacked ones; a block already stacked is left alone. Transformers multiplies `x @ W`
/// (`[E, in, out]`) and interleaves gate and up along `out`.
fn split_hf_experts(w: &mut WeightMap, p: &str) -> Result<()> {
    let key = |n: &str| format!("{p}.experts.{n}");
    if w.contains(&key("gate_up_proj_blocks")) {
        return split_hf_mxfp4_experts(w, p);
    }
    if !w.contains(&key("gate_up_proj")) {
        return Ok(());
    }
    let (gate_up, down) = (take_float(w, &key("gate_up_proj"))?, take_float(w, &key("down_proj"))?);
    let s = gate_up.shape().to_vec();
    if s.len() != 3 || s[2] % 2 != 0 {
        return Err(ModelError::Config { path: w.source.clone(), reason: format!("{} has shape {s:?}, expected [experts, hidden, 2 * intermediate]", key("gate_up_proj")) });
    }
    let (e, h, i) = (s[0], s[1], s[2] / 2);
    let pairs = gate_up.reshape(&[e, h, i, 2])?;
    let mut put = |n: &str, weight: Array| w.insert(key(&format!("{n}.weight")), Weight::Dense(weight));
    put("gate_proj", pairs.index((.., .., .., 0)).swap_axes(1, 2)?.contiguous()?);
    put("up_proj", pairs.index((.., .., .., 1)).swap_axes(1, 2)?.contiguous()?);
    put("down_proj", down.swap_axes(1, 2)?.contiguous()?);
    split_hf_biases(w, p)
}

/// A float tensor of Hugging Face's expert layout (a quantized one there is an error naming it).
fn take_float(w: &mut WeightMap, key: &str) -> Result<Array> {
    match w.take(key)? {
        Weight::Dense(a) => Ok(a),
        _ => Err(ModelError::Config { path: w.source.clone(), reason: format!("{key} is quantized in Hugging Face's layout") }),
    }
}

/// Hugging Face's expert biases of block `p` as mlx-lm's: `gate_up_proj_bias` `[E, 2 inter]`
/// (gate and up interleaved, as the weights' outputs are) and `down_proj_bias`, the same in
/// both the float and the MXFP4 layout.
fn split_hf_biases(w: &mut WeightMap, p: &str) -> Result<()> {
    let key = |n: &str| format!("{p}.experts.{n}");
    let (gate_up_bias, down_bias) = (take_float(w, &key("gate_up_proj_bias"))?, take_float(w, &key("down_proj_bias"))?);
    let (e, i) = (gate_up_bias.shape()[0], gate_up_bias.shape()[1] / 2);
    let bias_pairs = gate_up_bias.reshape(&[e, i, 2])?;
    w.insert(key("gate_proj.bias"), Weight::Dense(bias_pairs.index((.., .., 0)).contiguous()?));
    w.insert(key("up_proj.bias"), Weight::Dense(bias_pairs.index((.., .., 1)).contiguous()?));
    w.insert(key("down_proj.bias"), Weight::Dense(down_bias));
    Ok(())
}

/// OpenAI's MXFP4 experts (`{p}.experts.gate_up_proj_blocks` u8 `[E, 2 inter, hidden/32, 16]`
/// with `_scales` u8 `[E, 2 inter, hidden/32]`, `down_proj_blocks` `[E, hidden, inter/32, 16]`)
/// as stacked microscaled weights: the blocks are MLX's mxfp4 codes byte for byte (two e2m1
/// codes a byte, low nibble first), so four bytes read as one little-endian u32; gate and up
/// interleave along the output rows here, as in the float layout.
fn split_hf_mxfp4_experts(w: &mut WeightMap, p: &str) -> Result<()> {
    let key = |n: &str| format!("{p}.experts.{n}");
    let source = w.source.clone();
    let mut bytes = |n: &str, dims: usize| -> Result<Array> {
        match w.take(&key(n))? {
            Weight::Dense(a) if a.dtype() == Dtype::Uint8 && a.ndim() == dims => Ok(a),
            other => Err(ModelError::Config {
                path: source.clone(),
                reason: format!("{} must be a u8 tensor of {dims} axes, got shape {:?}", key(n), other.shape()),
            }),
        }
    };
    let codes = |blocks: Array| -> Result<Array> {
        let s = blocks.shape().to_vec();
        if s[3] != 16 {
            return Err(ModelError::Config { path: source.clone(), reason: format!("MXFP4 blocks of {p} have {} bytes per block, expected 16 (32 codes)", s[3]) });
        }
        Ok(blocks.reshape(&[s[0], s[1], s[2] * 16])?.view_dtype(Dtype::Uint32)?)
    };
    let (gate_up, gate_up_scales) = (bytes("gate_up_proj_blocks", 4)?, bytes("gate_up_proj_scales", 3)?);
    let (down, down_scales) = (bytes("down_proj_blocks", 4)?, bytes("down_proj_scales", 3)?);
    let (gate_up, down) = (codes(gate_up)?, codes(down)?);
    let f = mlx_ext::microscaled::MxFormat::Mxfp4;
    let rows = |a: &Array, first: i32| -> Result<Array> {
        let n = a.shape()[1];
        let idx = Array::from_iter((first..n).step_by(2), &[n / 2]);
        Ok(a.take_axis(&idx, 1)?)
    };
    let mut put = |n: &str, weight: Weight| w.insert(key(&format!("{n}.weight")), weight);
    put("gate_proj", Weight::Mx { w: rows(&gate_up, 0)?, scales: rows(&gate_up_scales, 0)?, format: f });
    put("up_proj", Weight::Mx { w: rows(&gate_up, 1)?, scales: rows(&gate_up_scales, 1)?, format: f });
    put("down_proj", Weight::Mx { w: down, scales: down_scales, format: f });
    split_hf_biases(w, p)
}

pub struct Attention {
    /// q, k and v, in that order.
    qkv: Projections,
    o_proj: Linear,
    /// One logit per query head.
    sinks: Array,
    n_heads: i32,
    n_kv_heads: i32,
    head_dim: i32,
    rope_base: f32,
    /// YaRN's periods and the factor on queries and keys; `None`: plain RoPE.
    yarn: Option<(Array, f32)>,
}

impl Attention {
    fn new(cfg: &Config, w: &mut WeightMap, p: &str, dtype: Dtype) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            let weight = w.take_shaped(&format!("{p}.self_attn.{name}.weight"), &[out, inp])?;
            let bias = w.take_shaped(&format!("{p}.self_attn.{name}.bias"), &[out])?.to_dense(dtype)?;
            Ok(Linear { weight, bias: Some(bias) })
        };
        let qkv = Projections::new(vec![lin("q_proj", nq * d, h)?, lin("k_proj", nkv * d, h)?, lin("v_proj", nkv * d, h)?])?;
        let o_proj = lin("o_proj", h, nq * d)?;
        let sinks = w.take_shaped(&format!("{p}.self_attn.sinks"), &[nq])?.to_dense(dtype)?;
        let yarn = cfg.rope_scaling.as_ref().map(|s| {
            let periods = s.periods(d, cfg.rope_theta);
            (Array::from_slice(&periods, &[periods.len() as i32]), s.mscale())
        });
        Ok(Attention { qkv, o_proj, sinks, n_heads: nq as i32, n_kv_heads: nkv as i32, head_dim: d as i32, rope_base: cfg.rope_theta, yarn })
    }

    fn rope(&self, x: &Array, offset: i32) -> Result<Array> {
        Ok(match &self.yarn {
            Some((periods, mscale)) => {
                let x = if *mscale != 1.0 { x * Array::from_f32(*mscale).as_dtype(x.dtype())? } else { x.clone() };
                rope(&x, self.head_dim, false, None, 1.0, offset, periods)?
            }
            None => rope(x, self.head_dim, false, self.rope_base, 1.0, offset, None)?,
        })
    }
}

impl Mixer for Attention {
    fn forward(&self, x: &Array, cache: &mut KvCache) -> Result<Array> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let heads = |y: Array, n: i32| -> Result<Array> { Ok(y.reshape(&[b, l, n, self.head_dim])?.transpose_axes(&[0, 2, 1, 3])?) };
        let [q, k, v]: [Array; 3] = self.qkv.forward(x)?.try_into().expect("three projections give three outputs");
        let offset = cache.offset() as i32;
        let q = self.rope(&heads(q, self.n_heads)?, offset)?;
        let k = self.rope(&heads(k, self.n_kv_heads)?, offset)?;
        let v = heads(v, self.n_kv_heads)?;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let out = cache.update_and_attend(&q, &k, &v, scale, Some(&self.sinks))?;
        self.o_proj.forward(&out.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.qkv.arrays();
        v.extend(self.o_proj.arrays());
        v.push(&self.sinks);
        v
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
    /// Builds the model from `w` (stacked or Hugging Face experts; nothing else missing or extra).
    pub fn new(cfg: Config, mut w: WeightMap, dtype: Dtype) -> Result<Self> {
        cfg.check(&w.source)?;
        for i in 0..cfg.num_hidden_layers {
            split_hf_experts(&mut w, &format!("model.layers.{i}.mlp"))?;
        }
        w.check(&cfg.expected_keys())?;
        let (h, e, k) = (cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok);
        let ends = Ends::load(&mut w, h, cfg.vocab_size, false, |w| w.take_dense("model.norm.weight", dtype))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = Attention::new(&cfg, &mut w, &p, dtype)?;
            let mlp = SparseMoe::load_as(&mut w, &format!("{p}.mlp"), &LAYOUT, h, cfg.intermediate_size, e, k, Routing::TopKThenSoftmax)?;
            layers.push(Layer::load(&mut w, &p, dtype, cfg.rms_norm_eps, attn, mlp)?);
        }
        Ok(Model { cfg, dtype, ends, layers })
    }
}

impl LanguageModel for Model {
    fn forward(&self, ids: &Array, caches: &mut [KvCache], last_only: bool) -> Result<Array> {
        forward_stack(&self.ends, &self.layers, self.cfg.rms_norm_eps, self.dtype, ids, caches, last_only)
    }

    /// Projections and experts over the batch's rows at once; attention per sequence (the
    /// batched decode step has no sink logits).
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

    fn layer_window(&self, layer: usize) -> Option<usize> {
        self.cfg.is_sliding(layer).then_some(self.cfg.sliding_window)
    }

    fn family(&self) -> &str {
        "gpt_oss"
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
    use crate::families::ArchConfig;

    fn config(extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({"model_type": "gpt_oss", "hidden_size": 64, "num_hidden_layers": 4,
            "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "num_local_experts": 4, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 150000.0,
            "vocab_size": 16, "sliding_window": 8,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "original_max_position_embeddings": 4096, "truncate": false}});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    }

    fn build_error(extra: serde_json::Value) -> String {
        let cfg = ArchConfig::from_json(&config(extra)).unwrap();
        cfg.build(WeightMap::new("ckpt".into()), Dtype::Float32).err().expect("build must fail").to_string()
    }

    #[test]
    fn even_layers_slide_unless_layer_types_say_otherwise() {
        let c: Config = serde_json::from_value(config(serde_json::json!({}))).unwrap();
        assert_eq!((0..4).filter(|&i| c.is_sliding(i)).collect::<Vec<_>>(), [0, 2]);
        let types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"];
        let c: Config = serde_json::from_value(config(serde_json::json!({"layer_types": types}))).unwrap();
        assert_eq!((0..4).filter(|&i| c.is_sliding(i)).collect::<Vec<_>>(), [1, 2]);
        assert!(!c.rope_scaling.unwrap().truncate);
    }

    #[test]
    fn bad_values_and_missing_keys_are_named() {
        let e = build_error(serde_json::json!({"num_experts_per_tok": 5}));
        assert!(e.contains("num_experts_per_tok 5") && e.contains("num_local_experts 4"), "{e}");
        assert!(build_error(serde_json::json!({"layer_types": ["full_attention"]})).contains("layer_types has 1 entries"));
        assert!(build_error(serde_json::json!({"layer_types": ["full_attention", "x", "full_attention", "full_attention"]})).contains("'x'"));
        assert!(build_error(serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})).contains("rope_type 'llama3'"));
        assert!(build_error(serde_json::json!({"tie_word_embeddings": true})).contains("tie_word_embeddings"));
        let e = build_error(serde_json::json!({}));
        for key in ["model.layers.3.self_attn.sinks", "model.layers.0.mlp.experts.gate_proj.bias", "model.layers.1.mlp.router.weight", "lm_head.weight"] {
            assert!(e.contains(key), "{key} not named: {e}");
        }
    }

    /// OpenAI's MXFP4 blocks decode as the OCP e2m1 table (two codes a byte, low nibble first)
    /// times 2^(scale - 127), with gate and up on alternate rows of `gate_up_proj_blocks`.
    #[test]
    fn hf_mxfp4_blocks_split_into_microscaled_experts() {
        const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];
        let (e, i, h) = (2usize, 2usize, 32usize);
        let byte = |ex: usize, row: usize, j: usize| ((ex * 7 + row * 3 + j * 5) % 256) as u8;
        let blocks: Vec<u8> = (0..e * 2 * i * 16).map(|n| byte(n / (2 * i * 16), n / 16 % (2 * i), n % 16)).collect();
        // One scale per expert row: 2^(row - 1) for rows 0..4.
        let scales: Vec<u8> = (0..e * 2 * i).map(|n| (126 + n % (2 * i)) as u8).collect();
        let p = "m";
        let mut w = WeightMap::new("ckpt".into());
        w.insert(format!("{p}.experts.gate_up_proj_blocks"), Weight::Dense(Array::from_slice(&blocks, &[e as i32, 2 * i as i32, 1, 16])));
        w.insert(format!("{p}.experts.gate_up_proj_scales"), Weight::Dense(Array::from_slice(&scales, &[e as i32, 2 * i as i32, 1])));
        w.insert(format!("{p}.experts.down_proj_blocks"), Weight::Dense(Array::zeros::<u8>(&[e as i32, h as i32, 1, 16]).unwrap()));
        w.insert(format!("{p}.experts.down_proj_scales"), Weight::Dense(Array::from_slice(&vec![127u8; e * h], &[e as i32, h as i32, 1])));
        w.insert(format!("{p}.experts.gate_up_proj_bias"), Weight::Dense(Array::zeros::<f32>(&[e as i32, 2 * i as i32]).unwrap()));
        w.insert(format!("{p}.experts.down_proj_bias"), Weight::Dense(Array::zeros::<f32>(&[e as i32, h as i32]).unwrap()));
        split_hf_experts(&mut w, p).unwrap();
        for (name, first) in [("gate_proj", 0), ("up_proj", 1)] {
            let weight = w.take(&format!("{p}.experts.{name}.weight")).unwrap();
            assert!(matches!(weight, Weight::Mx { .. }), "{name} stays packed");
            assert_eq!(weight.shape(), vec![e, i, h]);
            let got = weight.to_dense(Dtype::Float32).unwrap();
            let got = got.as_slice::<f32>();
            for ex in 0..e {
                for j in 0..i {
                    let row = 2 * j + first;
                    let scale = 2f32.powi(row as i32 - 1);
                    for c in 0..h {
                        let b = byte(ex, row, c / 2);
                        let code = if c % 2 == 0 { b & 15 } else { b >> 4 };
                        assert_eq!(got[(ex * i + j) * h + c], E2M1[code as usize] * scale, "{name} expert {ex} row {j} col {c}");
                    }
                }
            }
        }
        assert_eq!(w.take(&format!("{p}.experts.down_proj.weight")).unwrap().shape(), vec![e, h, 32]);
        // Blocks of another width are refused naming the tensor's block.
        let mut w = WeightMap::new("ckpt".into());
        w.insert(format!("{p}.experts.gate_up_proj_blocks"), Weight::Dense(Array::zeros::<u8>(&[e as i32, 4, 1, 8]).unwrap()));
        w.insert(format!("{p}.experts.gate_up_proj_scales"), Weight::Dense(Array::zeros::<u8>(&[e as i32, 4, 1]).unwrap()));
        w.insert(format!("{p}.experts.down_proj_blocks"), Weight::Dense(Array::zeros::<u8>(&[e as i32, 4, 1, 8]).unwrap()));
        w.insert(format!("{p}.experts.down_proj_scales"), Weight::Dense(Array::zeros::<u8>(&[e as i32, 4, 1]).unwrap()));
        let err = split_hf_experts(&mut w, p).unwrap_err().to_string();
        assert!(err.contains("MXFP4 blocks of m have 8 bytes per block"), "{err}");
    }

    /// Hugging Face's `x @ W` layout with gate and up interleaved along the output becomes the
    /// stacked `[E, out, in]` projections: column `2j` of `gate_up_proj` is gate row `j`.
    #[test]
    fn hf_fused_experts_split_into_stacked_projections() {
        let (e, h, i) = (2, 3, 4);
        let gate_up: Vec<f32> = (0..e * h * 2 * i).map(|x| x as f32).collect();
        let bias: Vec<f32> = (0..e * 2 * i).map(|x| x as f32).collect();
        let mut w = WeightMap::new("ckpt".into());
        let p = "m";
        w.insert(format!("{p}.experts.gate_up_proj"), Weight::Dense(Array::from_slice(&gate_up, &[e as i32, h as i32, 2 * i as i32])));
        w.insert(format!("{p}.experts.gate_up_proj_bias"), Weight::Dense(Array::from_slice(&bias, &[e as i32, 2 * i as i32])));
        w.insert(format!("{p}.experts.down_proj"), Weight::Dense(Array::zeros::<f32>(&[e as i32, i as i32, h as i32]).unwrap()));
        w.insert(format!("{p}.experts.down_proj_bias"), Weight::Dense(Array::zeros::<f32>(&[e as i32, h as i32]).unwrap()));
        split_hf_experts(&mut w, p).unwrap();
        let get = |w: &mut WeightMap, n: &str| w.take_dense(&format!("{p}.experts.{n}"), Dtype::Float32).unwrap();
        let (gate, up, gb, ub) = (get(&mut w, "gate_proj.weight"), get(&mut w, "up_proj.weight"), get(&mut w, "gate_proj.bias"), get(&mut w, "up_proj.bias"));
        assert_eq!(gate.shape(), &[e as i32, i as i32, h as i32]);
        assert_eq!(get(&mut w, "down_proj.weight").shape(), &[e as i32, h as i32, i as i32]);
        let at = |ex: usize, row: usize, col: usize| gate_up[(ex * h + row) * 2 * i + col];
        let (gate, up) = (gate.as_slice::<f32>().to_vec(), up.as_slice::<f32>().to_vec());
        for ex in 0..e {
            for j in 0..i {
                for r in 0..h {
                    assert_eq!(gate[(ex * i + j) * h + r], at(ex, r, 2 * j));
                    assert_eq!(up[(ex * i + j) * h + r], at(ex, r, 2 * j + 1));
                }
                assert_eq!(gb.as_slice::<f32>()[ex * i + j], bias[ex * 2 * i + 2 * j]);
                assert_eq!(ub.as_slice::<f32>()[ex * i + j], bias[ex * 2 * i + 2 * j + 1]);
            }
        }
    }

    /// mlx-lm's `swiglu_oai` at points on both sides of each clamp, computed by hand.
    #[test]
    fn the_clamped_swiglu_clamps_gate_above_and_up_both_sides() {
        let gate = Array::from_slice(&[-9.0f32, -1.0, 0.5, 9.0], &[4]);
        let up = Array::from_slice(&[-9.0f32, 2.0, -0.5, 9.0], &[4]);
        let got = LAYOUT.activation.apply(gate, up).unwrap().as_slice::<f32>().to_vec();
        let f = |g: f32, u: f32| {
            let (g, u) = (g.min(7.0), u.clamp(-7.0, 7.0));
            (u + 1.0) * g / (1.0 + (-1.702 * g).exp())
        };
        let want = [f(-9.0, -9.0), f(-1.0, 2.0), f(0.5, -0.5), f(9.0, 9.0)];
        assert_eq!(want[3], 8.0 * 7.0 / (1.0 + (-1.702f32 * 7.0).exp()), "both clamps bite at 9");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn gpt_oss_gguf_files_are_refused_by_name() {
        use crate::gguf::{GgmlType, GgufWriter};
        let path = std::env::temp_dir().join(format!("kvsplit-gpt-oss-{}.gguf", std::process::id()));
        let mut w = GgufWriter::new();
        w.add_string("general.architecture", "gpt-oss").add_u32("gpt-oss.expert_count", 32);
        w.add_tensor("token_embd.weight", &[4, 2], GgmlType::F32);
        w.write(&path, |_, _, out| out.write_all(&[0u8; 32])).unwrap();
        let e = ArchConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(e.contains("'gpt-oss'") && e.contains("not supported"), "{e}");
    }
}
