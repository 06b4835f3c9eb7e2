//! Token log-probabilities, computed on the device beside each sample.

use crate::error::Result;
use mlx_rs::nn::log_softmax;
use mlx_rs::ops::argpartition_axis;
use mlx_rs::ops::indexing::{take_along_axis, IndexOp};
use mlx_rs::{Array, Dtype};

/// A produced token's log-probability under the model (log-softmax of the raw logits, before
/// repetition penalty, temperature and truncation, as OpenAI and vLLM report them) and the most
/// likely alternatives, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A sampled token (`[1]` uint32) and, when asked, its scores: its log-probability `[1, 1]`
/// and, for `k > 0`, the top `k` ids and log-probabilities `[1, k]`.
pub(super) struct Picked {
    pub(super) token: Array,
    pub(super) scores: Option<(Array, Option<(Array, Array)>)>,
}

impl Picked {
    pub(super) fn arrays(&self) -> Vec<&Array> {
        let mut all = vec![&self.token];
        if let Some((lp, top)) = &self.scores {
            all.push(lp);
            if let Some((ids, vals)) = top {
                all.extend([ids, vals]);
            }
        }
        all
    }

    /// The scores on the host (the arrays are evaluated by then).
    pub(super) fn read(&self) -> Result<Option<TokenLogprobs>> {
        let Some((lp, alternatives)) = &self.scores else { return Ok(None) };
        let mut top: Vec<(u32, f32)> = match alternatives {
            Some((ids, vals)) => ids.as_slice::<u32>().iter().copied().zip(vals.as_slice::<f32>().iter().copied()).collect(),
            None => Vec::new(),
        };
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(Some(TokenLogprobs { logprob: lp.item_cast::<f32>(), top }))
    }
}

/// Log-probabilities of `token` and the `k` most likely tokens, from logits `[1, V]`.
pub(super) fn scores(logits: &Array, token: &Array, k: usize) -> Result<(Array, Option<(Array, Array)>)> {
    let lp = log_softmax(&logits.as_dtype(Dtype::Float32)?, -1)?;
    let chosen = take_along_axis(&lp, &token.reshape(&[1, 1])?.as_dtype(Dtype::Int32)?, -1)?;
    let v = lp.shape()[1] as usize;
    let k = k.min(v);
    if k == 0 {
        return Ok((chosen, None));
    }
    // argpartition puts the k largest (of -lp, the k smallest) first, in no order; the host sorts.
    let ids = argpartition_axis(&(-&lp), (k - 1) as i32, -1)?.index((.., ..k as i32));
    let vals = take_along_axis(&lp, &ids, -1)?;
    Ok((chosen, Some((ids.as_dtype(Dtype::Uint32)?, vals))))
}
