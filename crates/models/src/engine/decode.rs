//! One sequence's feeding and sampling: prefill, forward, the pipelined `generate`, and the
//! chunked prefill the batched server interleaves with decode steps.

use super::scores::{Picked, TokenLogprobs};
use super::sequence::Sequence;
use crate::error::Result;
use crate::generate::{check_context, eval_caches, prefill, GenerationStats};
use mlx_rs::transforms::{async_eval, eval};
use mlx_rs::{Array, Dtype};
use std::time::Instant;

impl<'e> Sequence<'e> {
    /// Feeds `tokens` through the cache in chunks of the prefill step, evaluating each chunk;
    /// returns the logits of the last position (`[1, V]`).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Array> {
        let logits = prefill(self.model, &mut self.caches, tokens, self.prefill_step)?;
        self.history.extend_from_slice(tokens);
        Ok(logits)
    }

    /// Logits `[1, L, V]` (`[1, 1, V]` with `last_only`) of `tokens` fed as one chunk, left lazy
    /// (the caller evaluates them with [`Sequence::caches`]' arrays).
    pub fn forward(&mut self, tokens: &[u32], last_only: bool) -> Result<Array> {
        let ids = Array::from_slice(tokens, &[1, tokens.len() as i32]).as_dtype(Dtype::Int32)?;
        let out = self.model.forward(&ids, &mut self.caches, last_only)?;
        self.history.extend_from_slice(tokens);
        Ok(out)
    }

    /// One decode step of a token known only as a lazy `[1]` or `[1, 1]` array (pipelined
    /// callers): its logits `[1, 1, V]`, lazy. Not recorded in the history.
    pub fn step(&mut self, token: &Array) -> Result<Array> {
        self.model.forward(&token.reshape(&[1, 1])?.as_dtype(Dtype::Int32)?, &mut self.caches, true)
    }

    /// Evaluates every cache array together with `extra`.
    pub fn eval_with(&self, extra: &Array) -> Result<()> {
        eval_caches(&self.caches, extra)
    }

    /// Feeds `prompt` (after any token the last call produced but did not feed), then samples up
    /// to `max_tokens` tokens, pipelined: step `n + 1` is queued before token `n` is read. Stops
    /// at a token of `stop` or when `on_token` returns false; the tokens stay in the cache for
    /// the next call.
    pub fn generate(&mut self, prompt: &[u32], max_tokens: usize, stop: &[u32], mut on_token: impl FnMut(u32) -> bool) -> Result<GenerationStats> {
        self.generate_scored(prompt, max_tokens, stop, None, |id, _| on_token(id))
    }

    /// As [`Self::generate`], and with `logprobs = Some(k)` each token also comes with its
    /// log-probability and the `k` most likely alternatives ([`TokenLogprobs`]), computed on
    /// the device in the same step as the sample, so pipelining is kept.
    pub fn generate_scored(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        stop: &[u32],
        logprobs: Option<usize>,
        mut on_token: impl FnMut(u32, Option<TokenLogprobs>) -> bool,
    ) -> Result<GenerationStats> {
        let fed = self.cached_tokens().min(self.history.len());
        let feed: Vec<u32> = self.history[fed..].iter().chain(prompt).copied().collect();
        check_context(self.model, &self.settings, fed + feed.len() + max_tokens)?;
        mlx_rs::memory::reset_peak_memory()?;
        let start = Instant::now();
        let logits = prefill(self.model, &mut self.caches, &feed, self.prefill_step)?;
        self.history.extend_from_slice(prompt);
        let mut y = self.pick(&logits, logprobs)?;
        eval(y.arrays())?;
        let prompt_time = start.elapsed();
        let decode_start = Instant::now();
        let mut produced = 0usize;
        let mut last_time = decode_start;
        while produced < max_tokens {
            let more = produced + 1 < max_tokens;
            let next = if more && self.pipelined {
                let n = self.next_after(&y.token, logprobs)?;
                async_eval(n.arrays())?;
                Some(n)
            } else {
                None
            };
            let tok: u32 = y.token.item_cast::<u32>();
            let scores = y.read()?;
            produced += 1;
            last_time = Instant::now();
            self.history.push(tok);
            if stop.contains(&tok) || !on_token(tok, scores) || !more {
                // A step already handed to `async_eval` must finish before its arrays are dropped:
                // leaving it running made the process hang at exit after an early stop (EOS).
                if let Some(n) = &next {
                    eval(n.arrays())?;
                }
                break;
            }
            y = match next {
                Some(n) => n,
                None => self.next_after(&y.token, logprobs)?,
            };
        }
        Ok(GenerationStats {
            prompt_tokens: feed.len(),
            prompt_time,
            generation_tokens: produced,
            generation_time: last_time - decode_start,
            peak_memory: mlx_rs::memory::peak_memory()?,
            kv_bytes: self.kv_bytes(),
        })
    }

    /// Samples from `logits` (`[1, V]`), with the scores `logprobs` asks for (lazy).
    pub(super) fn pick(&mut self, logits: &Array, logprobs: Option<usize>) -> Result<Picked> {
        let token = self.sampler.sample(logits, &self.history)?;
        let scores = match logprobs {
            None => None,
            Some(k) => Some(super::scores::scores(logits, &token, k)?),
        };
        Ok(Picked { token, scores })
    }

    /// Feeds `y` and samples the token after it (lazy).
    fn next_after(&mut self, y: &Array, logprobs: Option<usize>) -> Result<Picked> {
        let logits = self.step(y)?;
        let v = logits.shape()[2];
        self.pick(&logits.reshape(&[1, v])?, logprobs)
    }
}
