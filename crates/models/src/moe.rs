//! The mixture-of-experts feed-forward block of Mixtral, Qwen3-MoE and gpt-oss: a router scores
//! the layer's experts per token, the `top_k` best run their gated MLPs, and their outputs are
//! summed with the router's weights. What differs between families is a [`MoeLayout`]: the
//! names, whether router and experts carry biases, and the gate's activation.
//!
//! Experts are stacked as mlx-lm's `SwitchGLU` holds them: `{experts}.{gate,up,down}_proj`
//! with a leading experts axis, dense or quantized (mlx-community checkpoints). Hugging Face
//! checkpoints store one tensor per expert; [`stack_experts`] joins those at load, as mlx-lm's
//! `sanitize` does, so the model sees one layout.
//!
//! Where the work goes: on the CPU, each selected expert runs as an ordinary linear layer
//! (quantized: our packed matvec, or dequantize + BLAS for many rows) after the router's
//! choice is read on the host; elsewhere MLX's `gather_qmm` / `gather_mm` pick the experts on
//! the device.

use crate::decoder::FeedForward;
use crate::error::{ModelError, Result};
use crate::weights::{Linear, Weight, WeightMap};
use mlx_ext::microscaled;
use mlx_rs::nn::silu;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{argpartition_axis, argsort_axis, concatenate, gather_mm, gather_qmm, maximum, minimum, sigmoid, softmax_axis, stack};
use mlx_rs::{Array, Dtype};

/// The gate's activation inside each expert, `down(act(gate, up))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GluActivation {
    /// `silu(gate) * up` (Mixtral, Qwen3-MoE).
    Silu,
    /// gpt-oss: the gate clamped above and `up` on both sides at `limit`, then
    /// `(up + 1) * gate * sigmoid(alpha * gate)` (mlx-lm's `swiglu_oai`).
    ClampedSwiglu { alpha: f32, limit: f32 },
}

impl GluActivation {
    pub(crate) fn apply(self, gate: Array, up: Array) -> Result<Array> {
        Ok(match self {
            GluActivation::Silu => silu(gate)? * up,
            GluActivation::ClampedSwiglu { alpha, limit } => {
                let c = |x: f32| Array::from_f32(x).as_dtype(gate.dtype());
                let g = minimum(&gate, c(limit)?)?;
                let u = minimum(maximum(&up, c(-limit)?)?, c(limit)?)?;
                (u + c(1.0)?) * (&g * sigmoid(&g * c(alpha)?)?)
            }
        })
    }
}

/// Where a block's tensors live under its prefix and what they carry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeLayout {
    /// The router linear layer's name (`{p}.{router}.weight`).
    pub router: &'static str,
    /// The stacked experts' container (`{p}.{experts}.gate_proj.weight`, ...).
    pub experts: &'static str,
    /// Router and experts carry biases (`.bias`, `[experts, out]` for the experts).
    pub bias: bool,
    pub activation: GluActivation,
}

/// mlx-lm's `SwitchGLU` under `switch_mlp`, router `gate`, no biases (Mixtral, Qwen3-MoE).
pub const SWITCH_MLP: MoeLayout = MoeLayout { router: "gate", experts: "switch_mlp", bias: false, activation: GluActivation::Silu };

/// How router logits become expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Mixtral: the `top_k` largest logits, then a softmax over those alone.
    TopKThenSoftmax,
    /// Qwen3-MoE: a softmax over every expert, then the `top_k` largest probabilities,
    /// divided by their sum when `renormalize` (`norm_topk_prob`).
    SoftmaxThenTopK { renormalize: bool },
}

/// How the selected experts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertPath {
    /// Per expert on the CPU, gathered elsewhere ([`SwitchGlu::on_host_route`] says why).
    Auto,
    /// MLX's `gather_qmm` / `gather_mm` over the stacked experts.
    Gathered,
    /// Router choice read on the host, then each selected expert as a plain linear layer.
    PerExpert,
}

/// Token-expert pairs from which mlx-lm sorts the tokens by expert before `gather_qmm`, so
/// each expert's weights are read in one run; below it sorting costs more than it saves.
const SORT_FROM_PAIRS: usize = 64;

/// One stacked projection: `[experts, out, in]`, and its biases `[experts, out]`.
struct Experts {
    weight: Weight,
    bias: Option<Array>,
}

impl Experts {
    /// `x` `[..., 1, in]` through the experts `idx` picks, per MLX's gather semantics.
    fn gather(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array> {
        let y = match &self.weight {
            Weight::Dense(w) => gather_mm(x, w.swap_axes(-1, -2)?, None, idx, sorted)?,
            Weight::Quant { w, scales, biases, bits, group } => {
                gather_qmm(x, w, scales, biases, None, idx, true, *group, *bits, sorted)?
            }
            Weight::Mx { w, scales, format } => microscaled::gather_qmm(x, w, scales, idx, *format, true, sorted)?,
        };
        Ok(match &self.bias {
            Some(b) => y + b.take_axis(idx, 0)?.expand_dims(-2)?,
            None => y,
        })
    }

    /// Expert `e` as an ordinary linear layer (views into the stacked arrays).
    fn expert(&self, e: i32) -> Linear {
        let weight = match &self.weight {
            Weight::Dense(w) => Weight::Dense(w.index(e)),
            Weight::Quant { w, scales, biases, bits, group } => Weight::Quant {
                w: w.index(e),
                scales: scales.index(e),
                biases: biases.index(e),
                bits: *bits,
                group: *group,
            },
            Weight::Mx { w, scales, format } => Weight::Mx { w: w.index(e), scales: scales.index(e), format: *format },
        };
        Linear { weight, bias: self.bias.as_ref().map(|b| b.index(e)) }
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.weight.arrays();
        v.extend(self.bias.iter());
        v
    }
}

/// The experts' gated MLPs, `down(act(gate(x), up(x)))` each.
struct SwitchGlu {
    gate_proj: Experts,
    up_proj: Experts,
    down_proj: Experts,
    path: ExpertPath,
    activation: GluActivation,
}

impl SwitchGlu {
    /// `x` `[B, L, H]` through the experts of `inds` `[B, L, k]`: `[B, L, k, H]`.
    fn forward(&self, x: &Array, inds: &Array) -> Result<Array> {
        if self.on_host_route() {
            self.forward_per_expert(x, inds)
        } else {
            self.forward_gathered(x, inds)
        }
    }

    /// MLX's gather products, the token-expert pairs sorted by expert when there are many.
    fn forward_gathered(&self, x: &Array, inds: &Array) -> Result<Array> {
        let (b, l, k) = (inds.shape()[0], inds.shape()[1], inds.shape()[2]);
        let x = x.expand_dims_axes(&[-2, -3])?;
        let pairs = inds.size();
        if pairs < SORT_FROM_PAIRS {
            let y = self.glu(&x, inds, false)?;
            return Ok(y.squeeze_axes(&[-2])?);
        }
        let flat = inds.flatten(None, None)?;
        let order = argsort_axis(&flat, 0)?;
        let unsort = argsort_axis(&order, 0)?;
        let tokens = order.floor_divide(Array::from_int(k))?;
        let xs = x.flatten(0, -3)?.take_axis(&tokens, 0)?;
        let y = self.glu(&xs, &flat.take_axis(&order, 0)?, true)?;
        let h = *y.shape().last().expect("expert output has a feature axis");
        Ok(y.take_axis(&unsort, 0)?.reshape(&[b, l, k, h])?)
    }

    fn glu(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array> {
        let h = self.activation.apply(self.gate_proj.gather(x, idx, sorted)?, self.up_proj.gather(x, idx, sorted)?)?;
        self.down_proj.gather(&h, idx, sorted)
    }

    /// Whether this block runs expert by expert with host-read routing: on the CPU, always.
    /// MLX 0.32.2's CPU `gather_qmm` is scalar code: one decode token through a 4-bit
    /// Qwen3-30B-A3B block (8 of 128 experts) took 2068 ms there against 16 ms expert by expert
    /// on our packed matvec, a Mixtral 8x7B block 14.7 s against 161 ms (2-core EPYC,
    /// `cargo run --release -p models --example moe_cpu_decode 5`). Its CPU `gather_mm` takes
    /// float32 only (the conformance suite's f16 rows), while per expert any dtype runs BLAS.
    fn on_host_route(&self) -> bool {
        match self.path {
            ExpertPath::Auto => mlx_kv::Backend::current() == mlx_kv::Backend::Cpu,
            ExpertPath::Gathered => false,
            ExpertPath::PerExpert => true,
        }
    }

    /// The same result as [`Self::forward`], grouping the token rows by expert on the host so
    /// each selected expert is one ordinary (packed) linear layer over its rows.
    fn forward_per_expert(&self, x: &Array, inds: &Array) -> Result<Array> {
        let (b, l, k) = (inds.shape()[0], inds.shape()[1], inds.shape()[2]);
        let h = x.shape()[2];
        let rows = x.reshape(&[b * l, h])?;
        let picked = inds.as_dtype(Dtype::Int32)?.flatten(None, None)?;
        picked.eval()?;
        let picked: &[i32] = picked.as_slice();
        let experts = self.gate_proj.weight.shape()[0];
        let mut by_expert: Vec<Vec<i32>> = vec![Vec::new(); experts];
        for (pair, &e) in picked.iter().enumerate() {
            by_expert[e as usize].push(pair as i32);
        }
        let (mut outs, mut order) = (Vec::new(), Vec::with_capacity(picked.len()));
        for (e, pairs) in by_expert.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
            let tokens: Vec<i32> = pairs.iter().map(|p| p / k).collect();
            let xe = rows.take_axis(Array::from_slice(&tokens, &[tokens.len() as i32]), 0)?;
            let e = e as i32;
            let h = self.activation.apply(self.gate_proj.expert(e).forward(&xe)?, self.up_proj.expert(e).forward(&xe)?)?;
            outs.push(self.down_proj.expert(e).forward(&h)?);
            order.extend_from_slice(pairs);
        }
        // Rows are in expert order; `unsort[pair]` is where each pair's row landed.
        let mut unsort = vec![0i32; order.len()];
        for (row, &pair) in order.iter().enumerate() {
            unsort[pair as usize] = row as i32;
        }
        let y = concatenate(&outs, 0)?.take_axis(Array::from_slice(&unsort, &[unsort.len() as i32]), 0)?;
        Ok(y.as_dtype(x.dtype())?.reshape(&[b, l, k, h])?)
    }
}

/// A sparse MoE feed-forward block under prefix `p` (router and experts named by its
/// [`MoeLayout`]).
pub struct SparseMoe {
    gate: Linear,
    switch_mlp: SwitchGlu,
    top_k: i32,
    routing: Routing,
}

impl SparseMoe {
    /// The four stacked keys of a [`SWITCH_MLP`] block.
    pub fn keys(p: &str) -> Vec<String> {
        Self::keys_of(p, &SWITCH_MLP)
    }

    /// The keys of a block laid out as `layout` says.
    pub fn keys_of(p: &str, layout: &MoeLayout) -> Vec<String> {
        let (r, e) = (layout.router, layout.experts);
        let suffixes: &[&str] = if layout.bias { &["weight", "bias"] } else { &["weight"] };
        let mut keys = Vec::new();
        for s in suffixes {
            keys.push(format!("{p}.{r}.{s}"));
            keys.extend(["gate_proj", "up_proj", "down_proj"].map(|n| format!("{p}.{e}.{n}.{s}")));
        }
        keys
    }

    /// [`Self::load_as`] a [`SWITCH_MLP`] block.
    pub fn load(w: &mut WeightMap, p: &str, hidden: usize, inter: usize, experts: usize, top_k: usize, routing: Routing) -> Result<Self> {
        Self::load_as(w, p, &SWITCH_MLP, hidden, inter, experts, top_k, routing)
    }

    /// Takes the router `[experts, hidden]` and the stacked experts `[experts, inter, hidden]`
    /// (down: `[experts, hidden, inter]`), with their biases where `layout` has them.
    #[allow(clippy::too_many_arguments)]
    pub fn load_as(w: &mut WeightMap, p: &str, layout: &MoeLayout, hidden: usize, inter: usize, experts: usize, top_k: usize, routing: Routing) -> Result<Self> {
        // Biases stay as loaded (the loader casts float tensors to the compute dtype).
        let mut bias = |name: String, shape: &[usize]| -> Result<Option<Array>> {
            if !layout.bias {
                return Ok(None);
            }
            match w.take_shaped(&name, shape)? {
                Weight::Dense(b) => Ok(Some(b)),
                _ => Err(ModelError::Config { path: w.source.clone(), reason: format!("{name} is quantized; a bias must be a float tensor") }),
            }
        };
        let e = layout.experts;
        let biases = [
            bias(format!("{p}.{e}.gate_proj.bias"), &[experts, inter])?,
            bias(format!("{p}.{e}.up_proj.bias"), &[experts, inter])?,
            bias(format!("{p}.{e}.down_proj.bias"), &[experts, hidden])?,
            bias(format!("{p}.{}.bias", layout.router), &[experts])?,
        ];
        let [gate_b, up_b, down_b, router_b] = biases;
        let mut stacked = |name: &str, out: usize, inp: usize, bias: Option<Array>| -> Result<Experts> {
            Ok(Experts { weight: w.take_shaped(&format!("{p}.{e}.{name}.weight"), &[experts, out, inp])?, bias })
        };
        let switch_mlp = SwitchGlu {
            gate_proj: stacked("gate_proj", inter, hidden, gate_b)?,
            up_proj: stacked("up_proj", inter, hidden, up_b)?,
            down_proj: stacked("down_proj", hidden, inter, down_b)?,
            path: ExpertPath::Auto,
            activation: layout.activation,
        };
        let gate = Linear { weight: w.take_shaped(&format!("{p}.{}.weight", layout.router), &[experts, hidden])?, bias: router_b };
        Ok(SparseMoe { gate, switch_mlp, top_k: top_k as i32, routing })
    }

    /// The same block with its experts run as `path` says (for timing the paths).
    pub fn with_expert_path(mut self, path: ExpertPath) -> Self {
        self.switch_mlp.path = path;
        self
    }

    /// Expert indices and their weights, each `[B, L, k]`, from router logits `[B, L, E]`.
    fn route(&self, logits: &Array) -> Result<(Array, Array)> {
        let (k, n) = (self.top_k, logits.shape()[2]);
        Ok(match self.routing {
            Routing::TopKThenSoftmax => {
                let inds = argpartition_axis(logits.negative()?, k - 1, -1)?.index((.., .., ..k));
                let scores = logits.take_along_axis(&inds, -1)?;
                (inds, softmax_axis(&scores, -1, true)?)
            }
            Routing::SoftmaxThenTopK { renormalize } => {
                let probs = softmax_axis(logits, -1, true)?;
                let inds = argpartition_axis(&probs, n - k, -1)?.index((.., .., n - k..));
                let scores = probs.take_along_axis(&inds, -1)?;
                let scores = if renormalize { &scores / scores.sum_axis(-1, true)? } else { scores };
                (inds, scores)
            }
        })
    }
}

impl FeedForward for SparseMoe {
    fn forward(&self, x: &Array) -> Result<Array> {
        let (inds, scores) = self.route(&self.gate.forward(x)?)?;
        let y = self.switch_mlp.forward(x, &inds)?;
        Ok((y * scores.expand_dims(-1)?).sum_axis(-2, false)?.as_dtype(x.dtype())?)
    }

    fn arrays(&self) -> Vec<&Array> {
        let s = &self.switch_mlp;
        let mut v = self.gate.arrays();
        v.extend([&s.gate_proj, &s.up_proj, &s.down_proj].into_iter().flat_map(|e| e.arrays()));
        v
    }
}

/// Joins Hugging Face's per-expert tensors `{p}.experts.{e}.{from}.weight` (e < `experts`)
/// into stacked `{p}.switch_mlp.{to}.weight`, for each `(from, to)` of `names`. A block already
/// stacked (no expert 0 key) is left alone; a block with some experts missing is an error
/// naming them. Quantized experts are stacked triplet by triplet.
pub fn stack_experts(w: &mut WeightMap, p: &str, experts: usize, names: &[(&str, &str)]) -> Result<()> {
    for (from, to) in names {
        let key = |e: usize| format!("{p}.experts.{e}.{from}.weight");
        if !w.contains(&key(0)) {
            continue;
        }
        let missing: Vec<String> = (0..experts).map(key).filter(|k| !w.contains(k)).collect();
        if !missing.is_empty() {
            return Err(ModelError::Keys { path: w.source.clone(), missing, unexpected: vec![] });
        }
        let parts = (0..experts).map(|e| w.take(&key(e))).collect::<Result<Vec<_>>>()?;
        let joined = stack_weights(parts).map_err(|reason| ModelError::Config { path: w.source.clone(), reason: format!("{}: {reason}", key(0)) })?;
        w.insert(format!("{p}.switch_mlp.{to}.weight"), joined);
    }
    Ok(())
}

fn stack_weights(parts: Vec<Weight>) -> std::result::Result<Weight, String> {
    if parts.iter().any(|p| matches!(p, Weight::Mx { .. })) {
        return Err("per-expert tensors in a microscaled mode cannot be stacked (only stacked checkpoints carry them)".into());
    }
    let quant = |w: &Weight| match w {
        Weight::Quant { bits, group, .. } => Some((*bits, *group)),
        _ => None,
    };
    let first = quant(&parts[0]);
    if let Some(bad) = parts.iter().position(|p| quant(p) != first || p.shape() != parts[0].shape()) {
        return Err(format!("expert {bad} differs from expert 0 in shape or quantization"));
    }
    let pick = |f: &dyn Fn(&Weight) -> Array| -> std::result::Result<Array, String> {
        stack(&parts.iter().map(f).collect::<Vec<_>>(), 0).map_err(|e| e.to_string())
    };
    Ok(match first {
        None => Weight::Dense(pick(&|p| match p {
            Weight::Dense(a) => a.clone(),
            _ => unreachable!("checked dense above"),
        })?),
        Some((bits, group)) => {
            let part = |i: usize| {
                move |p: &Weight| match p {
                    Weight::Quant { w, scales, biases, .. } => [w, scales, biases][i].clone(),
                    _ => unreachable!("checked quantized above"),
                }
            };
            Weight::Quant { w: pick(&part(0))?, scales: pick(&part(1))?, biases: pick(&part(2))?, bits, group }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::ops::{matmul, quantize};
    use mlx_rs::random;

    fn normal(shape: &[i32], key: u64) -> Array {
        random::normal::<f32>(shape, None, None, &random::key(key).unwrap()).unwrap()
    }

    fn experts(shape: &[i32], key: u64, quantized: bool, biased: bool) -> Experts {
        let w = normal(shape, key) * 0.1;
        let weight = if quantized {
            let (w, scales, biases) = quantize(&w, 64, 4).unwrap();
            Weight::Quant { w, scales, biases, bits: 4, group: 64 }
        } else {
            Weight::Dense(w)
        };
        let out = shape[shape.len() - 2];
        let bias = biased.then(|| normal(&[shape[0], out], key + 100) * 0.5);
        Experts { weight, bias }
    }

    /// Each pair's expert as a plain f32 product of the dequantized weights, plus its bias.
    fn reference(glu: &SwitchGlu, x: &Array, picked: &[i32], k: usize) -> Vec<f32> {
        let lin = |p: &Experts, i: i32, x: &Array| {
            let y = matmul(x, p.weight.to_dense(Dtype::Float32).unwrap().index(i).t()).unwrap();
            match &p.bias {
                Some(b) => y + b.index(i),
                None => y,
            }
        };
        let h = x.shape()[2];
        let rows = x.reshape(&[-1, h]).unwrap();
        let mut out = Vec::new();
        for (pair, &e) in picked.iter().enumerate() {
            let xr = rows.index((pair / k) as i32).reshape(&[1, h]).unwrap();
            let act = glu.activation.apply(lin(&glu.gate_proj, e, &xr), lin(&glu.up_proj, e, &xr)).unwrap();
            out.extend_from_slice(lin(&glu.down_proj, e, &act).as_slice::<f32>());
        }
        out
    }

    /// Every path against the reference: unsorted gather (few pairs), sorted gather (64 or
    /// more), and expert by expert, quantized and dense; Mixtral's experts and gpt-oss's
    /// (biases, and the clamped SwiGLU at a limit of 1, which these pre-activations of about
    /// unit size cross often).
    #[test]
    fn gathered_sorted_and_per_expert_paths_agree_with_a_plain_product() {
        let (e, h, inter, k) = (4, 128, 64, 2usize);
        let clamped = GluActivation::ClampedSwiglu { alpha: 1.702, limit: 1.0 };
        for (quantized, activation, biased) in [(true, GluActivation::Silu, false), (false, GluActivation::Silu, false), (true, clamped, true), (false, clamped, true)] {
            let glu = SwitchGlu {
                gate_proj: experts(&[e, inter, h], 1, quantized, biased),
                up_proj: experts(&[e, inter, h], 2, quantized, biased),
                down_proj: experts(&[e, h, inter], 3, quantized, biased),
                path: ExpertPath::Auto,
                activation,
            };
            for tokens in [3, 40] {
                let x = normal(&[1, tokens, h], 4);
                // Two distinct experts per token (the step 1 + t % 3 is never a multiple of 4).
                let picked: Vec<i32> = (0..tokens).flat_map(|t| [t % e, (t + 1 + t % 3) % e]).collect();
                let inds = Array::from_slice(&picked, &[1, tokens, k as i32]);
                let want = reference(&glu, &x, &picked, k);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let mut paths = vec![("gathered", glu.forward_gathered(&x, &inds).unwrap())];
                if quantized {
                    paths.push(("per expert", glu.forward_per_expert(&x, &inds).unwrap()));
                }
                for (name, got) in paths {
                    assert_eq!(got.shape(), &[1, tokens, k as i32, h], "{name}");
                    let got = got.as_dtype(Dtype::Float32).unwrap();
                    let worst = got.as_slice::<f32>().iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    // f32 sums of at most 128 terms: far below 1e-4 of the largest output.
                    assert!(worst <= 1e-4 * scale, "{name} quantized={quantized} {activation:?} tokens={tokens}: {worst} of {scale}");
                }
            }
        }
    }

    #[test]
    fn missing_experts_are_named_and_partial_layouts_refused() {
        let mut w = WeightMap::new("ckpt".into());
        for e in [0, 2] {
            w.insert(format!("m.experts.{e}.w1.weight"), Weight::Dense(normal(&[8, 4], 5)));
        }
        let err = stack_experts(&mut w, "m", 3, &[("w1", "gate_proj")]).unwrap_err().to_string();
        assert!(err.contains("m.experts.1.w1.weight") && err.contains("ckpt"), "{err}");
        let mut w = WeightMap::new("ckpt".into());
        w.insert("m.experts.0.w1.weight".into(), Weight::Dense(normal(&[8, 4], 5)));
        w.insert("m.experts.1.w1.weight".into(), Weight::Dense(normal(&[8, 8], 6)));
        let err = stack_experts(&mut w, "m", 2, &[("w1", "gate_proj")]).unwrap_err().to_string();
        assert!(err.contains("expert 1 differs"), "{err}");
    }
}
