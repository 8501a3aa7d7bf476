//! The OpenAI wire format: request bodies, their validation into engine requests, responses,
//! stream chunks and error bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use retrowave_engine::{FinishReason, Usage};
use retrowave_model::chat::ChatMessage;
use retrowave_model::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::{Value, json};

/// An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// Any status, with an error type and code.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::record_http_error(self.status.as_u16());
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// The body of `/v1/completions` and `/v1/chat/completions` (one type for both; each endpoint
/// requires its own field). Unknown fields are ignored, as OpenAI clients send many; fields this
/// server cannot honour are refused in [`GenerationRequest::sampling`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct GenerationRequest {
    pub model: Option<String>,
    /// Completions: a string, a list of one string, or a list of token ids.
    pub prompt: Option<Value>,
    /// Chat: the conversation.
    pub messages: Option<Vec<Message>>,
    pub max_tokens: Option<u64>,
    /// Chat's newer name of `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 or -1 = no limit.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    /// A string or a list of strings.
    pub stop: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    pub echo: Option<bool>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub suffix: Option<Value>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub tools: Option<Value>,
    /// Extension (vLLM's): keep going after an end-of-generation token.
    pub ignore_eos: Option<bool>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    /// A string, a list of `{"type": "text", "text": ...}` parts, or null.
    #[serde(default)]
    pub content: Value,
}

/// Parses a request body, naming the field at fault in errors.
pub fn parse_request(body: &[u8]) -> Result<GenerationRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("malformed JSON in the request body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ApiError::invalid(Some(&path), format!("invalid value for `{path}`: {inner}"))
    })
}

/// What a completions request asks to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

impl GenerationRequest {
    /// Whether the response streams.
    pub fn streams(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the stream ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The completions prompt.
    pub fn prompt_input(&self) -> Result<PromptInput, ApiError> {
        let bad = |m: &str| Err(ApiError::invalid(Some("prompt"), m));
        match &self.prompt {
            None | Some(Value::Null) => bad("`prompt` is required"),
            Some(Value::String(s)) => Ok(PromptInput::Text(s.clone())),
            Some(Value::Array(items)) if items.is_empty() => bad("`prompt` is empty"),
            Some(Value::Array(items)) => {
                if let [Value::String(s)] = items.as_slice() {
                    return Ok(PromptInput::Text(s.clone()));
                }
                if items.iter().all(Value::is_string) {
                    return bad("only one prompt per request is supported");
                }
                items
                    .iter()
                    .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .map(PromptInput::Tokens)
                    .map_or_else(
                        || bad("`prompt` must be a string, a list of one string or a list of token ids"),
                        Ok,
                    )
            }
            Some(_) => {
                bad("`prompt` must be a string, a list of one string or a list of token ids")
            }
        }
    }

    /// The chat messages (text content only).
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        let Some(messages) = &self.messages else {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` is required",
            ));
        };
        if messages.is_empty() {
            return Err(ApiError::invalid(Some("messages"), "`messages` is empty"));
        }
        messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let param = format!("messages[{i}].content");
                let content = match &m.content {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    Value::Array(parts) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.get("type").and_then(Value::as_str), p.get("text")) {
                                (Some("text"), Some(Value::String(t))) => text.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid(
                                        Some(&param),
                                        "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                    ));
                                }
                            }
                        }
                        text
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            Some(&param),
                            "content must be a string or a list of text parts",
                        ));
                    }
                };
                Ok(ChatMessage::new(m.role.as_str(), content))
            })
            .collect()
    }

    /// Refuses what this server does not do, and builds the sampling parameters. `max_tokens`
    /// is `default_max_tokens` when the request gives none.
    pub fn sampling(&self, default_max_tokens: usize) -> Result<SamplingParams, ApiError> {
        let unsupported = |param: &str, what: &str| {
            Err(ApiError::invalid(
                Some(param),
                format!("{what} is not supported by this server"),
            ))
        };
        if self.n.is_some_and(|n| n != 1) {
            return unsupported("n", "n other than 1");
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return unsupported("best_of", "best_of other than 1");
        }
        if self.echo == Some(true) {
            return unsupported("echo", "echo");
        }
        if matches!(&self.logprobs, Some(v) if !(v.is_null() || *v == json!(false) || *v == json!(0)))
        {
            return unsupported("logprobs", "logprobs");
        }
        if matches!(&self.top_logprobs, Some(v) if !(v.is_null() || *v == json!(0))) {
            return unsupported("top_logprobs", "top_logprobs");
        }
        if matches!(&self.suffix, Some(v) if !v.is_null()) {
            return unsupported("suffix", "suffix");
        }
        if matches!(&self.tools, Some(v) if !(v.is_null() || *v == json!([]))) {
            return unsupported("tools", "tool calling");
        }
        for (param, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return unsupported(param, param);
            }
        }
        let stop = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| {
                    ApiError::invalid(Some("stop"), "`stop` must be a string or a list of strings")
                })?,
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("stop"),
                    "`stop` must be a string or a list of strings",
                ));
            }
        };
        let max_tokens = match self.max_tokens.or(self.max_completion_tokens) {
            None => default_max_tokens,
            Some(0) => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    "`max_tokens` must be at least 1",
                ));
            }
            Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
        };
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid(
                    Some("top_k"),
                    format!("`top_k` must be -1, 0 (no limit) or positive, got {k}"),
                ));
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                Some("temperature"),
                format!("`temperature` must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("`top_p` must be in (0, 1], got {top_p}"),
            ));
        }
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: self.seed,
            max_tokens,
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        };
        params
            .validate()
            .map_err(|e| ApiError::invalid(None, format!("invalid sampling parameters: {e}")))?;
        Ok(params)
    }
}

/// The 400 for a request that does not fit the context.
pub fn context_error(prompt_tokens: usize, max_tokens: usize, context: usize) -> ApiError {
    let mut e = ApiError::invalid(
        Some("max_tokens"),
        format!(
            "This request does not fit the context: the prompt has {prompt_tokens} tokens and max_tokens {max_tokens}, the context is {context} tokens. Shorten the prompt or lower max_tokens."
        ),
    );
    e.code = Some("context_length_exceeded");
    e
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// The OpenAI name of a finish reason (`timeout` is this server's own).
pub fn finish_reason(r: FinishReason) -> &'static str {
    r.as_str()
}

/// The `usage` object.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Identity of one response: id, creation time, model.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseMeta {
    /// New ids for a response of `endpoint`.
    pub fn new(endpoint: Endpoint, model: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        ResponseMeta {
            endpoint,
            id: format!("{prefix}-{:x}{:06x}", now.as_micros(), n & 0xff_ffff),
            created: now.as_secs(),
            model: model.to_string(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The whole (non-streaming) response.
    pub fn response(&self, text: &str, reason: FinishReason, usage: &Usage) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason(reason),
            }),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason(reason),
            }),
        };
        json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage_json(usage),
        })
    }

    /// A stream chunk with `text` (for chat: `role` opens the message), and a finish reason on
    /// the last one. `with_usage_null` adds `"usage": null` (as OpenAI does when the stream ends
    /// with a usage chunk).
    pub fn chunk(
        &self,
        text: &str,
        role: bool,
        reason: Option<FinishReason>,
        with_usage_null: bool,
    ) -> Value {
        let reason = reason.map(finish_reason);
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": reason,
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if role || !text.is_empty() {
                    delta.insert("content".into(), json!(text));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
            }
        };
        let mut v = json!({
            "id": self.id, "object": self.object(true), "created": self.created, "model": self.model,
            "choices": [choice],
        });
        if with_usage_null {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The final usage chunk of a stream (`choices` empty).
    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        json!({
            "id": self.id, "object": self.object(true), "created": self.created, "model": self.model,
            "choices": [], "usage": usage_json(usage),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse_request(b"{\"prompt\": \"hi\", ").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("malformed JSON"), "{}", e.message);
        let e = parse_request(br#"{"prompt": "hi", "max_tokens": "ten"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("max_tokens"), "{}", e.message);
        let e = parse_request(br#"{"messages": [{"role": 3}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = parse_request(b"[1, 2]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        let r = parse_request(br#"{"prompt": "hi", "user": "u1", "max_tokens": 5}"#).unwrap();
        assert_eq!(r.max_tokens, Some(5));
    }

    #[test]
    fn prompts_stops_and_unsupported_fields() {
        let r = parse_request(br#"{"prompt": [1, 2, 3], "stop": "\n"}"#).unwrap();
        assert_eq!(
            r.prompt_input().unwrap(),
            PromptInput::Tokens(vec![1, 2, 3])
        );
        let p = r.sampling(16).unwrap();
        assert_eq!((p.stop.clone(), p.max_tokens), (vec!["\n".to_string()], 16));
        let r = parse_request(br#"{"prompt": ["a"], "stop": ["x", "y"], "top_k": -1}"#).unwrap();
        assert_eq!(r.prompt_input().unwrap(), PromptInput::Text("a".into()));
        assert_eq!(r.sampling(1).unwrap().stop, vec!["x", "y"]);
        let r = parse_request(br#"{"prompt": ["a", "b"]}"#).unwrap();
        assert!(r.prompt_input().unwrap_err().message.contains("one prompt"));
        for body in [
            r#"{"prompt": "a", "n": 2}"#,
            r#"{"prompt": "a", "logprobs": 3}"#,
            r#"{"prompt": "a", "stop": [1]}"#,
            r#"{"prompt": "a", "max_tokens": 0}"#,
            r#"{"prompt": "a", "temperature": 3}"#,
            r#"{"prompt": "a", "top_p": 0}"#,
            r#"{"prompt": "a", "presence_penalty": 0.5}"#,
        ] {
            let r = parse_request(body.as_bytes()).unwrap();
            assert_eq!(
                r.sampling(16).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{body}"
            );
        }
        let r = parse_request(
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.chat_messages().unwrap(),
            vec![ChatMessage::new("user", "hi")]
        );
    }
}
