//! The HTTP side: routes, request parsing, and turning the worker's events into OpenAI
//! responses (JSON, or SSE ending with `data: [DONE]`).

use crate::api::{chat_logprobs, completion_logprobs, logprobs_asked, parse_request, ApiError, TokenScore};
use crate::metrics::Metrics;
use crate::job::{Event, Finish, Job};
use crate::worker::Handle;
use crate::ServeConfig;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State as AxState;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

/// The chat page (no external resources: nothing outside the machine may be reachable).
const PAGE: &str = include_str!("page.html");

#[derive(Clone)]
pub struct State {
    pub worker: Handle,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ServeConfig>,
}

pub fn router(state: State) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError::not_found(None, "no such endpoint (see /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics)") })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            let mut e = ApiError::bad_request(None, format!("{method} is not allowed on {}", uri.path()));
            e.status = axum::http::StatusCode::METHOD_NOT_ALLOWED;
            e
        })
        .with_state(state)
}

async fn models(AxState(s): AxState<State>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": s.config.model_name, "object": "model", "created": 0, "owned_by": "kvsplit-mlx"}]}))
}

async fn metrics(AxState(s): AxState<State>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

async fn chat(state: AxState<State>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(state, body, true).await
}

async fn completions(state: AxState<State>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(state, body, false).await
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(chat: bool) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{:x}{:04x}", if chat { "chatcmpl" } else { "cmpl" }, now(), N.fetch_add(1, Relaxed) & 0xffff)
}

/// The shape every response and chunk shares.
struct Meta {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    /// Whether the request asked for `logprobs` (else every choice says `null`).
    logprobs: bool,
    /// Completions' `text_offset` of the next token.
    offset: usize,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, true) => "chat.completion.chunk",
            (true, false) => "chat.completion",
            (false, _) => "text_completion",
        }
    }

    fn chunk(&self, choice: Value) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]})
    }

    fn logprobs(&mut self, scores: &[TokenScore]) -> Value {
        match (self.logprobs && !scores.is_empty(), self.chat) {
            (false, _) => Value::Null,
            (true, true) => chat_logprobs(scores),
            (true, false) => completion_logprobs(scores, &mut self.offset),
        }
    }

    fn text_choice(&mut self, text: &str, scores: &[TokenScore], finish: Option<&str>) -> Value {
        let logprobs = self.logprobs(scores);
        if self.chat {
            json!({"index": 0, "delta": {"content": text}, "finish_reason": finish, "logprobs": logprobs})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs})
        }
    }

    fn usage_chunk(&self, f: &Finish) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [],
               "usage": f.usage, "kv_cache": f.kv_cache, "timings": f.timings})
    }

    fn whole(&mut self, text: String, scores: &[TokenScore], f: &Finish) -> Value {
        let logprobs = self.logprobs(scores);
        let choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": f.finish_reason, "logprobs": logprobs})
        } else {
            json!({"index": 0, "text": text, "finish_reason": f.finish_reason, "logprobs": logprobs})
        };
        json!({"id": self.id, "object": self.object(false), "created": self.created, "model": self.model, "choices": [choice],
               "usage": f.usage, "kv_cache": f.kv_cache, "timings": f.timings})
    }
}

async fn handle(AxState(s): AxState<State>, body: Result<Bytes, BytesRejection>, chat: bool) -> Response {
    s.metrics.requests.fetch_add(1, Relaxed);
    let fail = |e: ApiError| {
        s.metrics.requests_failed.fetch_add(1, Relaxed);
        e.into_response()
    };
    let body = match body {
        Ok(b) => b,
        // Too large (413) or unreadable: an error object with axum's status and reason.
        Err(r) => {
            let mut e = ApiError::bad_request(None, format!("the request body could not be read: {}", r.body_text()));
            e.status = r.status();
            return fail(e);
        }
    };
    let req = match parse_request(&body) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let stream = req.stream.unwrap_or(false);
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    // A bad logprobs field is answered by the worker; here it only shapes the response.
    let logprobs = logprobs_asked(&req, chat).ok().flatten().is_some();
    let (tx, mut rx) = unbounded_channel();
    if let Err(e) = s.worker.submit(Job { req, chat, events: tx }) {
        return fail(e);
    }
    // The first event decides the status: an error before any text is an HTTP error.
    let first = match rx.recv().await {
        None => return ApiError::internal("the engine dropped the request").into_response(),
        Some(Event::Error(e)) => return e.into_response(),
        Some(ev) => ev,
    };
    let mut meta = Meta { id: request_id(chat), created: now(), model: s.config.model_name.clone(), chat, logprobs, offset: 0 };
    if stream {
        return sse(meta, first, rx, include_usage).into_response();
    }
    let mut text = String::new();
    let mut scores = Vec::new();
    let mut next = Some(first);
    loop {
        match next.take() {
            Some(Event::Text(t, s)) => {
                text.push_str(&t);
                scores.extend(s);
            }
            Some(Event::Done(f)) => return Json(meta.whole(text, &scores, &f)).into_response(),
            Some(Event::Error(e)) => return e.into_response(),
            None => return ApiError::internal("the engine dropped the request").into_response(),
        }
        next = rx.recv().await;
    }
}

/// Forwards the worker's events as SSE. When the client goes away the stream is dropped, the
/// forwarding task's send fails, it drops the worker's receiver, and the worker stops at the
/// next token.
fn sse(mut meta: Meta, first: Event, mut rx: UnboundedReceiver<Event>, include_usage: bool) -> Sse<ReceiverStream<Result<SseEvent, Infallible>>> {
    let (out, out_rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
        if meta.chat && out.send(data(meta.chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null})))).await.is_err() {
            return;
        }
        let mut next = Some(first);
        loop {
            let msg = match next.take() {
                Some(Event::Text(t, s)) => {
                    let choice = meta.text_choice(&t, &s, None);
                    data(meta.chunk(choice))
                }
                Some(Event::Done(f)) => {
                    let end = if meta.chat {
                        json!({"index": 0, "delta": {}, "finish_reason": f.finish_reason, "logprobs": null})
                    } else {
                        meta.text_choice("", &[], Some(f.finish_reason))
                    };
                    if out.send(data(meta.chunk(end))).await.is_err() {
                        return;
                    }
                    if include_usage && out.send(data(meta.usage_chunk(&f))).await.is_err() {
                        return;
                    }
                    break;
                }
                Some(Event::Error(e)) => {
                    let _ = out.send(data(e.body())).await;
                    break;
                }
                None => break,
            };
            if out.send(msg).await.is_err() {
                return;
            }
            next = rx.recv().await;
        }
        let _ = out.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(out_rx))
}
