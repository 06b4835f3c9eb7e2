//! What the HTTP side and the engine thread exchange: a job in, events out.

use crate::api::{ApiError, CompletionRequest, KvCacheReport, Timings, TokenScore, Usage};
use tokio::sync::mpsc::UnboundedSender;

/// What a job sends back.
#[derive(Debug)]
pub enum Event {
    /// A piece of text and the scores of the tokens it completes (empty without `logprobs`).
    Text(String, Vec<TokenScore>),
    Done(Box<Finish>),
    Error(ApiError),
}

#[derive(Debug, Clone)]
pub struct Finish {
    /// `stop` (end of generation or a stop string), `length`, or `cancelled` (shutdown).
    pub finish_reason: &'static str,
    pub usage: Usage,
    pub kv_cache: KvCacheReport,
    pub timings: Timings,
}

pub struct Job {
    pub req: CompletionRequest,
    /// `/v1/chat/completions` (messages through the chat template) or `/v1/completions`.
    pub chat: bool,
    pub events: UnboundedSender<Event>,
}
