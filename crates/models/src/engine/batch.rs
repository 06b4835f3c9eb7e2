//! Many sequences at once: a prompt is fed in chunks a scheduler interleaves with decode steps
//! ([`Sequence::prefill_some`]), and one decode step runs every running sequence's newest token
//! through the model together ([`decode_batch`]): `B` rows through each linear layer, so each
//! weight is read once per step, and attention per sequence over its own cache, length and
//! `KvSpec`.

use super::scores::{Picked, TokenLogprobs};
use super::sequence::Sequence;
use crate::error::{ModelError, Result};
use crate::generate::{check_context, eval_caches};
use mlx_kv::KvCache;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::transforms::{async_eval, eval};
use mlx_rs::{Array, Dtype};

/// A produced token and, when asked, its scores.
pub type Produced = (u32, Option<TokenLogprobs>);

impl<'e> Sequence<'e> {
    /// Appends `prompt` to the tokens waiting to be fed, checking that the conversation plus
    /// `max_tokens` fits the model's context (or the cache's window).
    pub fn queue_prompt(&mut self, prompt: &[u32], max_tokens: usize) -> Result<()> {
        check_context(self.model, &self.settings, self.history.len() + prompt.len() + max_tokens)?;
        self.history.extend_from_slice(prompt);
        Ok(())
    }

    /// For benchmarks that write a cache's contents directly (random keys and values): names
    /// `tokens` as what the cache already holds, so later calls feed from there.
    pub fn assume_cached(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.len() != self.cached_tokens() || !self.history.is_empty() {
            return Err(ModelError::Invalid { flag: "--fill", message: format!("{} tokens named for a cache holding {} (history {})", tokens.len(), self.cached_tokens(), self.history.len()) });
        }
        self.history = tokens.to_vec();
        Ok(())
    }

    /// Tokens in the history not yet in the cache: the queued prompt, or the one token the
    /// last step produced.
    pub fn unfed(&self) -> usize {
        self.history.len().saturating_sub(self.cached_tokens())
    }

    /// Feeds up to `max` waiting tokens as one chunk. When that empties the queue, samples the
    /// next token from the last position, appends it to the history (waiting to be fed by the
    /// next decode step) and returns it; otherwise `None`.
    pub fn prefill_some(&mut self, max: usize, logprobs: Option<usize>) -> Result<Option<Produced>> {
        let waiting = self.unfed();
        if waiting == 0 {
            return Err(ModelError::Invalid { flag: "--prefill-step", message: "prefill_some: no tokens are waiting to be fed".into() });
        }
        let start = self.cached_tokens();
        let n = waiting.min(max.max(1));
        let chunk = &self.history[start..start + n];
        let ids = Array::from_slice(chunk, &[1, n as i32]).as_dtype(Dtype::Int32)?;
        let logits = self.model.forward(&ids, &mut self.caches, true)?;
        if n < waiting {
            eval_caches(&self.caches, &logits)?;
            return Ok(None);
        }
        let v = logits.shape()[2];
        let picked = self.pick(&logits.reshape(&[1, v])?, logprobs)?;
        let mut all = picked.arrays();
        all.extend(self.caches.iter().flat_map(|c| c.arrays()));
        eval(all)?;
        let token: u32 = picked.token.item_cast::<u32>();
        let scores = picked.read()?;
        self.history.push(token);
        Ok(Some((token, scores)))
    }
}

/// One decode step for `seqs`, each with exactly one token waiting (the one it last produced),
/// all over the same model: the tokens go through the model as one `[B, 1]` batch, each row is
/// sampled with its own sequence's sampler (`logprobs[b]` asks for row `b`'s scores), and the
/// new tokens are appended to their histories, waiting for the next step.
pub fn decode_batch(seqs: &mut [&mut Sequence<'_>], logprobs: &[Option<usize>]) -> Result<Vec<Produced>> {
    let step = queue_step(seqs, logprobs, None)?;
    read_step(seqs, step)
}

/// A batched decode step handed to the device and not yet read ([`queue_step`]).
pub struct QueuedStep {
    picked: Vec<Picked>,
}

/// Builds one batched decode step and starts it on the device without waiting (pipelining:
/// the host builds step `n + 1` while the device runs step `n`). Each sequence feeds its one
/// waiting token, or with `after`, the token that queued step sampled for it (still on the
/// device; read it with [`read_step`] after queueing this one). Sequences whose sampler needs
/// the history (repetition penalty) cannot run after an unread step.
pub fn queue_step(seqs: &mut [&mut Sequence<'_>], logprobs: &[Option<usize>], after: Option<&QueuedStep>) -> Result<QueuedStep> {
    let Some(first) = seqs.first() else { return Ok(QueuedStep { picked: Vec::new() }) };
    let model = first.model;
    let bad = |message: String| Err(ModelError::Invalid { flag: "--decode-concurrency", message });
    if logprobs.len() != seqs.len() || after.is_some_and(|a| a.picked.len() != seqs.len()) {
        return bad(format!("{} logprobs settings and {:?} queued rows for {} sequences", logprobs.len(), after.map(|a| a.picked.len()), seqs.len()));
    }
    let waiting = usize::from(after.is_none());
    let mut ids = Vec::with_capacity(seqs.len());
    for (b, s) in seqs.iter().enumerate() {
        if !std::ptr::addr_eq(s.model as *const _, model as *const _) {
            return bad(format!("sequence {b} runs another model than sequence 0"));
        }
        if s.unfed() != waiting {
            return bad(format!("sequence {b} has {} tokens waiting; a decode step feeds exactly one", s.unfed() + 1 - waiting));
        }
        if after.is_some() && !s.pipelined {
            return bad(format!("sequence {b} samples with a repetition penalty, which needs each token read before the next step"));
        }
        check_context(s.model, &s.settings, s.cached_tokens() + 2)?;
        if after.is_none() {
            ids.push(s.history[s.cached_tokens()]);
        }
    }
    let ids = match after {
        None => Array::from_slice(&ids, &[ids.len() as i32, 1]).as_dtype(Dtype::Int32)?,
        Some(a) => {
            let rows: Vec<Array> = a.picked.iter().map(|p| p.token.reshape(&[1, 1])).collect::<std::result::Result<_, _>>()?;
            mlx_rs::ops::concatenate(&rows, 0)?.as_dtype(Dtype::Int32)?
        }
    };
    let logits = {
        let mut caches: Vec<&mut [KvCache]> = seqs.iter_mut().map(|s| s.caches.as_mut_slice()).collect();
        model.forward_batch(&ids, &mut caches)?
    };
    let v = logits.shape()[2];
    let mut picked = Vec::with_capacity(seqs.len());
    for (b, s) in seqs.iter_mut().enumerate() {
        let row = logits.index((b as i32..b as i32 + 1, 0, ..)).reshape(&[1, v])?;
        picked.push(s.pick(&row, logprobs[b])?);
    }
    let mut all: Vec<&Array> = picked.iter().flat_map(|p| p.arrays()).collect();
    all.extend(seqs.iter().flat_map(|s| s.caches.iter().flat_map(|c| c.arrays())));
    async_eval(all)?;
    Ok(QueuedStep { picked })
}

/// `n` decode steps for `seqs`, pipelined ([`queue_step`]: step `k + 1` is queued before step
/// `k`'s tokens are read), each step's tokens handed to `on_step`.
pub fn decode_steps(seqs: &mut [&mut Sequence<'_>], logprobs: &[Option<usize>], n: usize, mut on_step: impl FnMut(&[Produced])) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let mut queued = queue_step(seqs, logprobs, None)?;
    for k in 0..n {
        let next = if k + 1 < n { Some(queue_step(seqs, logprobs, Some(&queued))?) } else { None };
        on_step(&read_step(seqs, queued)?);
        match next {
            Some(q) => queued = q,
            None => break,
        }
    }
    Ok(())
}

/// Waits for a queued step and appends each sequence's token to its history.
pub fn read_step(seqs: &mut [&mut Sequence<'_>], step: QueuedStep) -> Result<Vec<Produced>> {
    eval(step.picked.iter().flat_map(|p| p.arrays()))?;
    let mut out = Vec::with_capacity(seqs.len());
    for (s, p) in seqs.iter_mut().zip(&step.picked) {
        let token: u32 = p.token.item_cast::<u32>();
        s.history.push(token);
        out.push((token, p.read()?));
    }
    Ok(out)
}
