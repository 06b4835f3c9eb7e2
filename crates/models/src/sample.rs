//! Token sampling on the device, so decode can queue the next step before the host reads this
//! token. Greedy when `temp == 0`.

use crate::error::{ModelError, Result};
use mlx_rs::ops::indexing::{argmax_axis, put_along_axis, take_along_axis, topk_axis, IndexOp};
use mlx_rs::nn::log_softmax;
use mlx_rs::ops::{argsort_axis, cumsum, select, softmax_axis};
use mlx_rs::{random, Array};

#[derive(Debug, Clone)]
pub struct SamplerSettings {
    pub temp: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at (mlx-lm's default is 20).
    pub repetition_context_size: usize,
    pub seed: u64,
}

impl Default for SamplerSettings {
    fn default() -> Self {
        SamplerSettings { temp: 0.0, top_p: 1.0, top_k: 0, min_p: 0.0, repetition_penalty: 1.0, repetition_context_size: 20, seed: 0 }
    }
}

impl SamplerSettings {
    /// Rejects values that would silently sample nonsense; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &'static str, message: String| Err(ModelError::Invalid { flag, message });
        if !(self.temp >= 0.0 && self.temp.is_finite()) {
            return bad("--temp", format!("must be a finite number >= 0, got {}", self.temp));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("--top-p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad("--min-p", format!("must be in [0, 1), got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("--repetition-penalty", format!("must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

pub struct Sampler {
    s: SamplerSettings,
    key: Array,
}

const NEG: f32 = -1e30;

impl Sampler {
    pub fn new(s: SamplerSettings) -> Result<Self> {
        s.validate()?;
        let key = random::key(s.seed)?;
        Ok(Sampler { s, key })
    }

    /// Next token (`[1]` uint32) from logits `[1, V]`; `history` feeds the repetition penalty.
    pub fn sample(&mut self, logits: &Array, history: &[u32]) -> Result<Array> {
        let mut logits = logits.as_dtype(mlx_rs::Dtype::Float32)?;
        if self.s.repetition_penalty != 1.0 && !history.is_empty() {
            let recent = &history[history.len().saturating_sub(self.s.repetition_context_size)..];
            let idx = Array::from_slice(recent, &[1, recent.len() as i32]).as_dtype(mlx_rs::Dtype::Int32)?;
            let picked = take_along_axis(&logits, &idx, -1)?;
            let p = Array::from_f32(self.s.repetition_penalty);
            let penalized = select(picked.lt(Array::from_f32(0.0))?, &picked * &p, &picked / &p)?;
            logits = put_along_axis(&logits, &idx, &penalized, -1)?;
        }
        if self.s.temp == 0.0 {
            return Ok(argmax_axis(&logits, -1, None)?.as_dtype(mlx_rs::Dtype::Uint32)?);
        }
        let mut logits = &logits / Array::from_f32(self.s.temp);
        let neg = Array::from_f32(NEG);
        let v = logits.shape()[1] as usize;
        if self.s.top_k > 0 && self.s.top_k < v {
            let kth = topk_axis(&logits, self.s.top_k as i32, -1)?.min_axis(-1, true)?;
            logits = select(logits.lt(&kth)?, &neg, &logits)?;
        }
        if self.s.min_p > 0.0 {
            let lp = log_softmax(&logits, -1)?;
            let thr = lp.max_axis(-1, true)? + Array::from_f32(self.s.min_p.ln());
            logits = select(lp.lt(&thr)?, &neg, &logits)?;
        }
        let (split_key, next) = random::split(&self.key, 2)?;
        self.key = next;
        if self.s.top_p < 1.0 {
            // Sort descending, keep the smallest prefix whose mass reaches top_p.
            let order = argsort_axis(&(-&logits), -1)?;
            let sorted = take_along_axis(&logits, &order, -1)?;
            let probs = softmax_axis(&sorted, -1, None)?;
            let before = cumsum(&probs, -1, None, None)? - &probs;
            let kept = select(before.lt(Array::from_f32(self.s.top_p))?, &sorted, &neg)?;
            let pick = random::categorical(&kept, -1, None, &split_key)?;
            let tok = take_along_axis(&order, &pick.reshape(&[1, 1])?, -1)?;
            return Ok(tok.index((.., 0)).as_dtype(mlx_rs::Dtype::Uint32)?);
        }
        Ok(random::categorical(&logits, -1, None, &split_key)?.as_dtype(mlx_rs::Dtype::Uint32)?)
    }
}
