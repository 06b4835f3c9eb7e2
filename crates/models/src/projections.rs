//! Projections of one input run as one product: a layer's q/k/v, or its MLP's gate/up.
//!
//! A decode step's cost on a small model is mostly launches and graph nodes, not bytes (session
//! 20's profile of SmolLM2 on an H100: 488 kernels per step, MLX's matvec 42% of device time).
//! Joining q, k and v turns three matvecs into one, and gate and up two into one, with the same
//! bytes read. Parts join only when their storage agrees (dense of one dtype, or quantized with
//! one bit width, group and scale dtype, and biases on all or none); GGUF files that mix types
//! per tensor keep those parts separate, with the same results either way.

use crate::error::Result;
use crate::weights::{Linear, Weight};
use mlx_rs::ops::concatenate;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::transforms::eval;
use mlx_rs::Array;

/// Several linear maps of the same input: one joined matrix, or the parts as loaded.
pub enum Projections {
    /// Rows of every part stacked; `widths` are the parts' output widths in order.
    Joined { linear: Linear, widths: Vec<i32> },
    Separate(Vec<Linear>),
}

impl Projections {
    /// Joins `parts` when `--fuse-projections` is on and their storage agrees. The joined
    /// arrays are evaluated here, so that the parts' memory goes back one layer at a time
    /// instead of the whole model holding both copies until load ends.
    pub fn new(parts: Vec<Linear>) -> Result<Self> {
        if parts.len() < 2 || !mlx_ext::options::current().fuse_projections.on() || !joinable(&parts) {
            return Ok(Projections::Separate(parts));
        }
        let widths: Vec<i32> = parts.iter().map(|p| p.weight.shape()[0] as i32).collect();
        let cat = |f: &dyn Fn(&Linear) -> &Array| -> Result<Array> {
            let arrays: Vec<&Array> = parts.iter().map(f).collect();
            Ok(concatenate(&arrays, 0)?)
        };
        let weight = match &parts[0].weight {
            Weight::Dense(_) => Weight::Dense(cat(&|p| dense(&p.weight))?),
            Weight::Quant { bits, group, .. } => Weight::Quant {
                w: cat(&|p| quant(&p.weight).0)?,
                scales: cat(&|p| quant(&p.weight).1)?,
                biases: cat(&|p| quant(&p.weight).2)?,
                bits: *bits,
                group: *group,
            },
            Weight::Mx { .. } => unreachable!("microscaled parts are never joined"),
        };
        let bias = match parts[0].bias {
            Some(_) => Some(cat(&|p| p.bias.as_ref().expect("joinable parts all have biases"))?),
            None => None,
        };
        let linear = Linear { weight, bias };
        eval(linear.arrays())?;
        Ok(Projections::Joined { linear, widths })
    }

    /// One output per part, in order, each `[..., width]`.
    pub fn forward(&self, x: &Array) -> Result<Vec<Array>> {
        match self {
            Projections::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Projections::Joined { linear, widths } if splits_on_cpu(linear, x) => {
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = rows_of(linear, start, w);
                        start += w;
                        part.forward(x)
                    })
                    .collect()
            }
            Projections::Joined { linear, widths } => {
                let y = linear.forward(x)?;
                let mut start = 0;
                Ok(widths
                    .iter()
                    .map(|&w| {
                        let part = y.index((.., .., start..start + w));
                        start += w;
                        part
                    })
                    .collect())
            }
        }
    }

    pub fn is_joined(&self) -> bool {
        matches!(self, Projections::Joined { .. })
    }

    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Projections::Separate(parts) => parts.iter().flat_map(|p| p.arrays()).collect(),
            Projections::Joined { linear, .. } => linear.arrays(),
        }
    }
}

/// Whether a joined product runs part by part: on the CPU, products of more rows than the
/// packed matvec takes dequantize into BLAS, whose summation order depends on the matrix's
/// width (a joined SmolLM2 moved `ppl`'s baseline 22.5061 -> 22.5066), so there each part
/// keeps its own product and prefill results stay those of separate weights. The matvec
/// computes every output row alone, so decode joins with identical results.
fn splits_on_cpu(linear: &Linear, x: &Array) -> bool {
    if mlx_kv::Backend::current() != mlx_kv::Backend::Cpu {
        return false;
    }
    let k = *x.shape().last().expect("projection input has a feature axis");
    let rows = x.size() as i32 / k.max(1);
    matches!(linear.weight, Weight::Dense(_)) || rows > mlx_ext::options::current().cpu_matvec_rows as i32
}

/// Output rows `start..start + width` of a joined projection: one part's own weight (row
/// slices of packed codes, scales and biases are exact).
fn rows_of(linear: &Linear, start: i32, width: i32) -> Linear {
    let r = start..start + width;
    let weight = match &linear.weight {
        Weight::Dense(a) => Weight::Dense(a.index(r.clone())),
        Weight::Quant { w, scales, biases, bits, group } => Weight::Quant {
            w: w.index(r.clone()),
            scales: scales.index(r.clone()),
            biases: biases.index(r.clone()),
            bits: *bits,
            group: *group,
        },
        Weight::Mx { w, scales, format } => Weight::Mx { w: w.index(r.clone()), scales: scales.index(r.clone()), format: *format },
    };
    Linear { weight, bias: linear.bias.as_ref().map(|b| b.index(r)) }
}

fn dense(w: &Weight) -> &Array {
    match w {
        Weight::Dense(a) => a,
        _ => unreachable!("joinable parts share one storage kind"),
    }
}

fn quant(w: &Weight) -> (&Array, &Array, &Array) {
    match w {
        Weight::Quant { w, scales, biases, .. } => (w, scales, biases),
        _ => unreachable!("joinable parts share one storage kind"),
    }
}

/// Whether every part stores its matrix the same way, takes the same input width, and has a
/// bias exactly when the first does.
fn joinable(parts: &[Linear]) -> bool {
    let first = &parts[0];
    let inputs = first.weight.shape()[1];
    parts.iter().all(|p| {
        let same_storage = match (&first.weight, &p.weight) {
            (Weight::Dense(a), Weight::Dense(b)) => a.dtype() == b.dtype() && a.ndim() == 2 && b.ndim() == 2,
            (Weight::Quant { w: wa, scales: sa, biases: ba, bits: b1, group: g1 }, Weight::Quant { w: wb, scales: sb, biases: bb, bits: b2, group: g2 }) => {
                b1 == b2 && g1 == g2 && sa.dtype() == sb.dtype() && ba.dtype() == bb.dtype() && wa.ndim() == 2 && wb.ndim() == 2
            }
            _ => false,
        };
        let same_bias = match (&first.bias, &p.bias) {
            (Some(a), Some(b)) => a.dtype() == b.dtype(),
            (None, None) => true,
            _ => false,
        };
        same_storage && same_bias && p.weight.shape().len() == 2 && p.weight.shape()[1] == inputs
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::ops::quantize;
    use mlx_rs::{random, Dtype};

    fn dense_linear(out: i32, inp: i32, seed: u64, bias: bool) -> Linear {
        let key = random::key(seed).unwrap();
        let w = random::normal::<f32>(&[out, inp], None, None, &key).unwrap();
        let b = bias.then(|| random::normal::<f32>(&[out], None, None, &random::key(seed + 100).unwrap()).unwrap());
        Linear { weight: Weight::Dense(w), bias: b }
    }

    fn quant_linear(out: i32, inp: i32, seed: u64, bits: i32) -> Linear {
        let Linear { weight, bias } = dense_linear(out, inp, seed, false);
        let w = match weight {
            Weight::Dense(w) => w,
            _ => unreachable!(),
        };
        let (q, s, b) = quantize(&w, 64, bits).unwrap();
        Linear { weight: Weight::Quant { w: q, scales: s, biases: b, bits, group: 64 }, bias }
    }

    fn max_abs_diff(a: &Array, b: &Array) -> f32 {
        let d = (a - b).abs().unwrap().max(None).unwrap();
        d.item_cast::<f32>()
    }

    /// The joined product of each part equals the part's own product: the same rows of the
    /// same matrix, summed in the same order, so equal to f32 rounding of one dot product.
    fn check(parts: Vec<Linear>, rows: i32, want_joined: bool) {
        let inp = parts[0].weight.shape()[1] as i32;
        let x = random::normal::<f32>(&[1, rows, inp], None, None, &random::key(7).unwrap()).unwrap();
        let want: Vec<Array> = parts.iter().map(|p| p.forward(&x).unwrap()).collect();
        let joined = Projections::new(parts).unwrap();
        assert_eq!(joined.is_joined(), want_joined);
        let got = joined.forward(&x).unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.shape(), w.shape());
            let scale = w.abs().unwrap().max(None).unwrap().item_cast::<f32>();
            // 2^-20 of the largest output: a few ulps of f32 accumulation over `inp` terms.
            assert!(max_abs_diff(g, w) <= scale * 2f32.powi(-20) * inp as f32, "joined part differs");
        }
    }

    #[test]
    fn dense_parts_with_biases_join_and_match() {
        check(vec![dense_linear(64, 128, 1, true), dense_linear(32, 128, 2, true), dense_linear(32, 128, 3, true)], 3, true);
    }

    #[test]
    fn quantized_parts_join_and_match_one_row_and_many() {
        for rows in [1, 12] {
            check(vec![quant_linear(128, 128, 4, 4), quant_linear(64, 128, 5, 4), quant_linear(64, 128, 6, 4)], rows, true);
        }
    }

    #[test]
    fn mixed_storage_stays_separate_and_matches() {
        check(vec![quant_linear(128, 128, 4, 4), quant_linear(64, 128, 5, 8)], 2, false);
        check(vec![dense_linear(64, 128, 1, true), dense_linear(64, 128, 2, false)], 2, false);
        let f16 = Linear { weight: Weight::Dense(dense(&dense_linear(64, 128, 9, false).weight).as_dtype(Dtype::Float16).unwrap()), bias: None };
        check(vec![dense_linear(64, 128, 1, false), f16], 2, false);
    }
}
