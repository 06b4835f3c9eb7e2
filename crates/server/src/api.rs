//! Request and response bodies in OpenAI's shapes, our extensions (`kv` in requests, `kv_cache`
//! and `timings` in responses), and OpenAI-style error objects.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, a list of content parts (only `text` parts here), or null (an assistant turn
    /// that only called tools).
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl ChatMessage {
    /// The message's text: text parts joined; any other part is refused by name.
    pub fn text(&self, index: usize) -> Result<String, ApiError> {
        match &self.content {
            None if self.role == "assistant" => Ok(String::new()),
            None => {
                let param = format!("messages[{index}].content");
                Err(ApiError::bad_request(Some(&param), format!("{param} is required for a '{}' message", self.role)))
            }
            Some(Content::Text(t)) => Ok(t.clone()),
            Some(Content::Parts(parts)) => {
                let mut out = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (kind, _) => {
                            let param = format!("messages[{index}].content[{j}]");
                            return Err(ApiError::bad_request(Some(&param), format!("{param}: only text content parts are supported, got type '{kind}'")));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// `prompt` of a completion: a string, a list holding one string, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stream_options` of a streaming request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn list(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// The fields `/v1/chat/completions` and `/v1/completions` share; `messages` or `prompt` says
/// which. Unknown fields are ignored, as OpenAI's server does.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    /// `null` is false, as OpenAI takes it.
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    /// Chat: a bool; completions: a number of top alternatives.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u32>,
    /// Our extension: this request's K/V setting ([`crate::kv_field`]).
    pub kv: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Our extension: what the request's cache costs and whether a kept conversation served it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct KvCacheReport {
    /// The K/V setting that ran (`k8v4+recipe`, `k8v4-rotkv`, `fp16`, ...).
    pub setting: String,
    /// Which choice it is: `recipe:<name>` (the model's calibrated recipe), `general` (same
    /// bits, rotated), `plain` (uniform, as asked) or `custom` (flags beyond a preset).
    pub source: String,
    /// Resident bytes of this conversation's cache after the request.
    pub resident_bytes: u64,
    /// What a 16-bit cache of the same allocation (whole 256-token steps) takes.
    pub fp16_bytes: u64,
    pub prompt_cache_hit: bool,
    /// Prompt tokens reused from a kept conversation (not prefilled again).
    pub cached_tokens: usize,
    /// Tokens this conversation's cache holds after the request.
    pub tokens: usize,
}

/// One produced token's log-probability and its most likely alternatives (`logprobs`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    pub token: Alternative,
    pub top: Vec<Alternative>,
}

/// A token as OpenAI reports it: its text (lossy where it is part of a UTF-8 character), its
/// bytes, and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

impl Alternative {
    fn json(&self) -> Value {
        serde_json::json!({"token": self.text, "logprob": self.logprob, "bytes": self.bytes})
    }
}

/// Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`.
pub fn chat_logprobs(scores: &[TokenScore]) -> Value {
    let content: Vec<Value> = scores
        .iter()
        .map(|s| {
            let mut v = s.token.json();
            v["top_logprobs"] = Value::Array(s.top.iter().map(Alternative::json).collect());
            v
        })
        .collect();
    serde_json::json!({ "content": content })
}

/// Completions' `logprobs` object: parallel lists `tokens`, `token_logprobs`, `top_logprobs`
/// (one `{token: logprob}` map per token) and `text_offset` (each token's start in the
/// completion text, counted from `offset`; advanced past these tokens).
pub fn completion_logprobs(scores: &[TokenScore], offset: &mut usize) -> Value {
    let mut text_offset = Vec::with_capacity(scores.len());
    for s in scores {
        text_offset.push(*offset);
        *offset += s.token.text.len();
    }
    let top: Vec<Value> = scores.iter().map(|s| Value::Object(s.top.iter().map(|a| (a.text.clone(), serde_json::json!(a.logprob))).collect())).collect();
    serde_json::json!({
        "tokens": scores.iter().map(|s| s.token.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": scores.iter().map(|s| s.token.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

/// How many alternatives a request asks for per token: `None` for no logprobs. Chat takes
/// `logprobs: true` and `top_logprobs: 0..=20`; completions take `logprobs: 0..=20` (OpenAI
/// stops at 5 there; the larger limit costs nothing here).
pub fn logprobs_asked(req: &CompletionRequest, chat: bool) -> Result<Option<usize>, ApiError> {
    const MAX: u32 = 20;
    let bad = |p: &str, m: String| ApiError::bad_request(Some(p), m);
    if chat {
        let on = match &req.logprobs {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(bad("logprobs", format!("logprobs must be true or false for chat completions, got {other}"))),
        };
        match (on, req.top_logprobs) {
            (_, Some(n)) if n > MAX => Err(bad("top_logprobs", format!("top_logprobs must be at most {MAX}, got {n}"))),
            (false, Some(n)) if n > 0 => Err(bad("top_logprobs", "top_logprobs needs logprobs: true".into())),
            (false, _) => Ok(None),
            (true, n) => Ok(Some(n.unwrap_or(0) as usize)),
        }
    } else {
        if req.top_logprobs.is_some() {
            return Err(bad("top_logprobs", "top_logprobs is a chat completions field; completions take logprobs: N".into()));
        }
        match &req.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= MAX as u64 => Ok(Some(n as usize)),
                _ => Err(bad("logprobs", format!("logprobs must be an integer from 0 to {MAX} for completions, got {v}"))),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Timings {
    /// From receiving the request at the engine to the first token.
    pub prompt_ms: f64,
    pub prompt_tps: f64,
    pub decode_tps: f64,
}

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    /// Seconds for `Retry-After` (503 when the queue is full).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: param.map(String::from), retry_after: None }
    }

    pub fn not_found(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, message: message.into(), kind: "not_found_error", param: param.map(String::from), retry_after: None }
    }

    pub fn busy(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into(), kind: "server_busy", param: None, retry_after: Some(1) }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, retry_after: None }
    }

    pub fn body(&self) -> Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": Value::Null}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

/// Parses a request body, naming the field of a type error and quoting the JSON parse error.
pub fn parse_request(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(None, format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(None, "the request body must be a JSON object"));
    }
    let req: CompletionRequest = serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad_request(Some(&path), format!("field '{path}': {}", e.into_inner()))
    })?;
    // Shape errors inside messages are the body's too: answered before the request queues.
    for (i, m) in req.messages.iter().flatten().enumerate() {
        m.text(i)?;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_and_wrong_types_are_400s_that_say_what_and_where() {
        let e = parse_request(b"{\"messages\": [").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_request(br#"{"max_tokens": "ten"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{}", e.message);
        let e = parse_request(br#"{"messages": [{"role": "user", "content": 3}]}"#).unwrap_err();
        assert!(e.param.as_deref().is_some_and(|p| p.starts_with("messages")), "{:?}", e.param);
        let e = parse_request(b"[1]").unwrap_err();
        assert!(e.message.contains("JSON object"));
        let r = parse_request(br#"{"prompt": "hi", "stop": "x", "unknown": 1}"#).unwrap();
        assert_eq!(r.stop.unwrap().list(), vec!["x"]);
        let body = ApiError::not_found(Some("model"), "no such model").body();
        assert_eq!(body["error"]["type"], "not_found_error");
        assert_eq!(body["error"]["param"], "model");
    }
}
