//! Float64 reference attention and error bounds derived from the quantization step.
#![allow(dead_code)]

use mlx_rs::Array;
use rand::{rngs::StdRng, Rng, SeedableRng};

pub struct Host {
    pub data: Vec<f32>,
    pub shape: [usize; 4],
}

impl Host {
    pub fn random(shape: [usize; 4], seed: u64) -> Host {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        Host { data: (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect(), shape }
    }
    pub fn array(&self) -> Array {
        let s: Vec<i32> = self.shape.iter().map(|&x| x as i32).collect();
        Array::from_slice(&self.data, &s)
    }
    pub fn at(&self, b: usize, h: usize, t: usize, d: usize) -> f64 {
        let [_, hh, tt, dd] = self.shape;
        self.data[((b * hh + h) * tt + t) * dd + d] as f64
    }
    pub fn max_abs(&self) -> f64 {
        self.data.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64))
    }
    /// Tokens `[a, z)` as a new host tensor.
    pub fn tokens(&self, a: usize, z: usize) -> Host {
        let [b, h, t, d] = self.shape;
        let mut data = Vec::with_capacity(b * h * (z - a) * d);
        for bi in 0..b {
            for hi in 0..h {
                let base = (bi * h + hi) * t * d;
                data.extend_from_slice(&self.data[base + a * d..base + z * d]);
            }
        }
        Host { data, shape: [b, h, z - a, d] }
    }
}

pub fn to_vec(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(mlx_rs::Dtype::Float32).unwrap().contiguous().unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}

/// Causal attention of the last `L` positions of a `T`-token sequence, in f64. `visible(q_pos,
/// k_pos)` decides masking; GQA maps query head `h` to KV head `h / rep`.
pub fn reference_attention(q: &Host, k: &Host, v: &Host, scale: f64, visible: &dyn Fn(usize, usize) -> bool) -> Vec<f64> {
    reference_attention_capped(q, k, v, scale, None, visible)
}

/// [`reference_attention`] with Gemma 2's soft cap: each visible scaled score `s` becomes
/// `cap * tanh(s / cap)` before the softmax.
pub fn reference_attention_capped(q: &Host, k: &Host, v: &Host, scale: f64, softcap: Option<f64>, visible: &dyn Fn(usize, usize) -> bool) -> Vec<f64> {
    let [b, hq, l, d] = q.shape;
    let [_, hkv, t, _] = k.shape;
    let rep = hq / hkv;
    let mut out = vec![0.0; b * hq * l * d];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / rep;
            for i in 0..l {
                let qpos = t - l + i;
                let s: Vec<f64> = (0..t)
                    .map(|j| {
                        if !visible(qpos, j) {
                            return f64::NEG_INFINITY;
                        }
                        let s = (0..d).map(|x| q.at(bi, h, i, x) * k.at(bi, kh, j, x)).sum::<f64>() * scale;
                        softcap.map_or(s, |c| c * (s / c).tanh())
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for x in 0..d {
                    let o: f64 = (0..t).map(|j| e[j] * v.at(bi, kh, j, x)).sum::<f64>() / z;
                    out[((bi * hq + h) * l + i) * d + x] = o;
                }
            }
        }
    }
    out
}

/// [`reference_attention`] with a learned sink logit per query head (gpt-oss): `sinks[h]` joins
/// each softmax denominator of head `h` as `exp(sinks[h] - m)` and contributes no value, so
/// every output of the row is the sink-free one times `Z / (Z + exp(sinks[h]))`, `Z` being the
/// sum of the row's exponentiated visible scores.
pub fn reference_attention_sinks(q: &Host, k: &Host, v: &Host, scale: f64, sinks: &[f64], visible: &dyn Fn(usize, usize) -> bool) -> Vec<f64> {
    let [b, hq, l, d] = q.shape;
    let [_, hkv, t, _] = k.shape;
    let rep = hq / hkv;
    let mut out = reference_attention(q, k, v, scale, visible);
    for bi in 0..b {
        for (h, sink) in sinks.iter().enumerate().take(hq) {
            for i in 0..l {
                let qpos = t - l + i;
                let z: f64 = (0..t)
                    .filter(|&j| visible(qpos, j))
                    .map(|j| ((0..d).map(|x| q.at(bi, h, i, x) * k.at(bi, h / rep, j, x)).sum::<f64>() * scale).exp())
                    .sum();
                let factor = z / (z + sink.exp());
                let row = ((bi * hq + h) * l + i) * d;
                out[row..row + d].iter_mut().for_each(|o| *o *= factor);
            }
        }
    }
    out
}

/// Worst per-element error of MLX affine `bits` quantization of data bounded by `max_abs`.
///
/// MLX makes the larger-magnitude edge `e` of each group exact: with `n = 2^b - 1` and ideal step
/// `s = range/n`, it uses `s' = e / round(e/s)`. Since `e/s >= n/2`, rounding up shrinks the
/// covered span to at least `range·(n/2)/(n/2+0.5)`, leaving values within `range/(n+1)` of the
/// far edge; rounding down widens the step to at most `s·n/(n-1)`, whose half is smaller than
/// `range/(n+1)` for `n >= 3`. So the bound is `range / 2^b`, plus the f16 rounding of scale
/// and bias (relative 2^-11, over at most `range` and `max_abs`).
pub fn quant_elem_bound(max_abs: f64, bits: u8) -> f64 {
    if bits >= 16 {
        // A dense cache stores 16-bit floats on every backend: one rounding to nearest, relative
        // 2^-12 (half of F16_REL, the spacing), then f32 arithmetic.
        return max_abs * F16_REL / 2.0 + F32_ELEM;
    }
    let range = 2.0 * max_abs;
    range / (1u64 << bits) as f64 + (range + max_abs) * F16_REL
}

pub const F16_REL: f64 = 1.0 / 2048.0;
/// One f32 rounding of a value of magnitude ~1, with headroom for a few accumulated roundings.
pub const F32_ELEM: f64 = 1e-5;

/// Bound on attention output error from quantized K and V. A key error `ek` per element shifts a
/// score by at most `scale·‖q‖₁·ek`; shifting every logit by at most `δ` changes each softmax
/// weight by a factor within `e^{±2δ}`, so the output moves by at most `max|v|·(e^{2δ}−1)`; a
/// value error `ev` per element adds at most `ev`. A float32 accumulation term closes it.
pub fn attention_bound(q_l1_max: f64, scale: f64, k_max: f64, v_max: f64, k_bits: u8, v_bits: u8) -> f64 {
    let delta = scale * q_l1_max * quant_elem_bound(k_max, k_bits);
    v_max * ((2.0 * delta).exp() - 1.0) + quant_elem_bound(v_max, v_bits) + 1e-4
}

pub fn q_l1_max(q: &Host) -> f64 {
    let d = q.shape[3];
    q.data.chunks(d).map(|r| r.iter().map(|x| x.abs() as f64).sum::<f64>()).fold(0.0, f64::max)
}

pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max)
}
