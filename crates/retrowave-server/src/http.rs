//! The HTTP routes: authentication, body limits, the OpenAI endpoints, probes and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use retrowave_engine::FinishReason;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::config::ServeConfig;
use crate::driver::{EngineClient, GenerateRequest, ModelInfo, Output, Refusal};
use crate::openai::{
    ApiError, Endpoint, GenerationRequest, PromptInput, ResponseMeta, context_error, parse_request,
};

/// Default `max_tokens` of `/v1/completions` (OpenAI's); chat defaults to the rest of the context.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

struct AppState {
    engine: EngineClient,
    /// SHA-256 digests of the accepted keys (compared in constant time, whatever their length).
    key_digests: Vec<[u8; 32]>,
    max_body_bytes: usize,
    timeout: Option<std::time::Duration>,
    prometheus: PrometheusHandle,
}

type Shared = State<Arc<AppState>>;

/// The application: `/v1/*` behind the API keys (when configured), `/health`, `/ready` and
/// `/metrics` open.
pub fn router(cfg: &ServeConfig, engine: EngineClient, prometheus: PrometheusHandle) -> Router {
    let state = Arc::new(AppState {
        engine,
        key_digests: cfg
            .server
            .api_keys
            .iter()
            .map(|k| Sha256::digest(k.as_bytes()).into())
            .collect(),
        max_body_bytes: cfg.server.max_body_bytes,
        timeout: cfg.request_timeout(),
        prometheus,
    });
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(cfg.server.max_body_bytes))
        .with_state(state)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

async fn authenticate(State(s): Shared, req: Request, next: Next) -> Response {
    if s.key_digests.is_empty() {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            Some("missing_api_key"),
            "Missing API key: send the header `Authorization: Bearer <key>`.",
        )
        .into_response();
    };
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let mut ok = subtle::Choice::from(0);
    for k in &s.key_digests {
        ok |= digest.ct_eq(k);
    }
    if bool::from(ok) {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            Some("invalid_api_key"),
            "Incorrect API key provided.",
        )
        .into_response()
    }
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn ready(State(s): Shared) -> Response {
    match s.engine.model() {
        Some(m) => axum::Json(json!({"status": "ready", "model": m.id})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn render_metrics(State(s): Shared) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.prometheus.render(),
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        None,
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

fn not_ready() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        Some("model_loading"),
        "The model is still loading; retry when /ready answers 200.",
    )
}

async fn models(State(s): Shared) -> Result<Response, ApiError> {
    let m = s.engine.model().ok_or_else(not_ready)?;
    Ok(axum::Json(json!({
        "object": "list",
        "data": [{
            "id": m.id, "object": "model", "created": m.created, "owned_by": "retrowave",
            "max_model_len": m.max_context, "backend": m.backend,
        }],
    }))
    .into_response())
}

async fn completions(
    State(s): Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(s, Endpoint::Completions, body).await
}

async fn chat_completions(
    State(s): Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(s, Endpoint::Chat, body).await
}

/// The body, or the 413 / 400 that explains why there is none.
fn body_bytes(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                format!(
                    "The request body is larger than the limit of {} bytes.",
                    s.max_body_bytes
                ),
            )
        } else {
            ApiError::invalid(None, format!("cannot read the request body: {rej}"))
        }
    })
}

/// The prompt's token ids.
fn prompt_tokens(
    m: &ModelInfo,
    endpoint: Endpoint,
    req: &GenerationRequest,
) -> Result<Vec<u32>, ApiError> {
    let tok = &m.tokenizer;
    let encode_error = |e: retrowave_model::tokenizer::TokenizerError| {
        ApiError::invalid(Some("prompt"), format!("cannot tokenize the prompt: {e}"))
    };
    match endpoint {
        Endpoint::Completions => match req.prompt_input()? {
            PromptInput::Tokens(t) => Ok(t),
            PromptInput::Text(text) => {
                tokio::task::block_in_place(|| tok.encode(&text, true, false)).map_err(encode_error)
            }
        },
        Endpoint::Chat => {
            let messages = req.chat_messages()?;
            let template = m.chat_template.as_ref().ok_or_else(|| {
                ApiError::invalid(
                    Some("messages"),
                    "this model has no chat template; use /v1/completions",
                )
            })?;
            let text = template.render_prompt(&messages, tok).map_err(|e| {
                ApiError::invalid(
                    Some("messages"),
                    format!("cannot apply the chat template: {e}"),
                )
            })?;
            tokio::task::block_in_place(|| tok.encode(&text, true, true)).map_err(encode_error)
        }
    }
}

fn refusal(r: Refusal) -> ApiError {
    match r {
        Refusal::Invalid(m) => ApiError::invalid(None, m),
        Refusal::Overloaded(m) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("overloaded"),
            m,
        ),
        Refusal::Failed(m) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, m)
        }
    }
}

fn engine_gone() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        Some("shutting_down"),
        "The engine is not running (the server is shutting down).",
    )
}

fn aborted() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        None,
        "The engine failed while generating; see the server log.",
    )
}

async fn generate(
    s: Arc<AppState>,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = body_bytes(&s, body)?;
    let m = s.engine.model().ok_or_else(not_ready)?;
    let req = parse_request(&body)?;
    if let Some(name) = &req.model
        && *name != m.id
    {
        let mut e = ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            Some("model_not_found"),
            format!(
                "The model `{name}` does not exist; this server serves `{}`.",
                m.id
            ),
        );
        e.param = Some("model".into());
        return Err(e);
    }
    let prompt = prompt_tokens(m, endpoint, &req)?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    let ctx = m.max_context;
    let requested = req.max_tokens.or(req.max_completion_tokens);
    if prompt.len() >= ctx {
        let asked = requested.map_or(1, |v| usize::try_from(v).unwrap_or(usize::MAX));
        return Err(context_error(prompt.len(), asked, ctx));
    }
    let default_max = match endpoint {
        Endpoint::Completions => COMPLETIONS_DEFAULT_MAX_TOKENS.min(ctx - prompt.len()),
        Endpoint::Chat => ctx - prompt.len(),
    };
    let params = req.sampling(default_max)?;
    if prompt.len().saturating_add(params.max_tokens) > ctx {
        return Err(context_error(prompt.len(), params.max_tokens, ctx));
    }
    let (tx, mut rx) = unbounded_channel();
    let sent = s.engine.submit(GenerateRequest {
        prompt,
        params,
        deadline: s.timeout.map(|t| arrived + t),
        arrived,
        outputs: tx,
    });
    if !sent {
        return Err(engine_gone());
    }
    match rx.recv().await {
        Some(Output::Accepted) => {}
        Some(Output::Refused(r)) => return Err(refusal(r)),
        _ => return Err(engine_gone()),
    }
    let meta = ResponseMeta::new(endpoint, &m.id);
    if req.streams() {
        Ok(stream(meta, rx, req.include_usage()).into_response())
    } else {
        collect(meta, rx).await
    }
}

/// Waits for the whole generation and answers it in one body.
async fn collect(
    meta: ResponseMeta,
    mut rx: UnboundedReceiver<Output>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(out) = rx.recv().await {
        match out {
            Output::Accepted => {}
            Output::Token { text: t } => text.push_str(&t),
            Output::Done {
                text: t,
                reason,
                usage,
            } => {
                if reason == FinishReason::Cancelled {
                    return Err(aborted());
                }
                text.push_str(&t);
                return Ok(axum::Json(meta.response(&text, reason, &usage)).into_response());
            }
            Output::Refused(r) => return Err(refusal(r)),
        }
    }
    Err(engine_gone())
}

struct StreamState {
    rx: UnboundedReceiver<Output>,
    meta: ResponseMeta,
    include_usage: bool,
    opened: bool,
    done: bool,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// Streams the generation as OpenAI's server-sent events, ending with `data: [DONE]`. Dropping
/// the stream (the client went away) drops the receiver, which cancels the request.
fn stream(
    meta: ResponseMeta,
    rx: UnboundedReceiver<Output>,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let state = StreamState {
        rx,
        meta,
        include_usage,
        opened: false,
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let u = st.include_usage;
        if !st.opened && st.meta.endpoint == Endpoint::Chat {
            st.opened = true;
            let ev = data(&st.meta.chunk("", true, None, u));
            return Some((vec![ev], st));
        }
        st.opened = true;
        loop {
            let out = st.rx.recv().await;
            let events = match out {
                Some(Output::Accepted) => continue,
                Some(Output::Token { text }) if text.is_empty() => continue,
                Some(Output::Token { text }) => vec![data(&st.meta.chunk(&text, false, None, u))],
                Some(Output::Done {
                    text,
                    reason,
                    usage,
                }) => {
                    st.done = true;
                    let mut evs = Vec::new();
                    if reason == FinishReason::Cancelled {
                        evs.push(data(&aborted().body()));
                    } else {
                        if st.meta.endpoint == Endpoint::Chat {
                            if !text.is_empty() {
                                evs.push(data(&st.meta.chunk(&text, false, None, u)));
                            }
                            evs.push(data(&st.meta.chunk("", false, Some(reason), u)));
                        } else {
                            evs.push(data(&st.meta.chunk(&text, false, Some(reason), u)));
                        }
                        if u {
                            evs.push(data(&st.meta.usage_chunk(&usage)));
                        }
                    }
                    evs.push(SseEvent::default().data("[DONE]"));
                    evs
                }
                Some(Output::Refused(r)) => {
                    st.done = true;
                    vec![data(&refusal(r).body()), SseEvent::default().data("[DONE]")]
                }
                None => {
                    st.done = true;
                    vec![
                        data(&engine_gone().body()),
                        SseEvent::default().data("[DONE]"),
                    ]
                }
            };
            return Some((events, st));
        }
    })
    .flat_map(|evs| futures_util::stream::iter(evs.into_iter().map(Ok)));
    Sse::new(events)
}
