//! `introspect serve`: the local engine behind OpenAI's API, for the openai SDK, lm-eval-harness,
//! inspect-ai and the paper authors' clients. Adapters are model names (as vLLM's `--lora-modules`).
//!
//! One engine thread owns the model; HTTP handlers (axum, on tokio) validate a request, queue it and wait
//! for its answer (or stream it token by token). The engine admits requests into its decode batches
//! between steps ([`engine`]), so concurrent clients share batches and none waits for another to end. Every error is OpenAI's `{"error": {...}}` with its 4xx; 500 only for a
//! fault of the engine itself.

pub mod adapters;
pub mod engine;
pub mod fine_tuning;
pub mod load;
pub mod wire;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio_stream::StreamExt;

use crate::backend::{ChatRequest, LocalBackend};
use engine::Engine;

/// What the server holds to.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Requests waiting for the engine before new ones get 503.
    pub max_queued: usize,
    /// Requests the engine takes into one batch.
    pub max_batch_requests: usize,
    /// Largest upload to /v1/files.
    pub max_file_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 2 << 20,
            max_queued: 1024,
            max_batch_requests: 64,
            max_file_bytes: 512 << 20,
        }
    }
}

/// OpenAI's error object, with the status it goes out with.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: String, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
        }
    }

    /// 503 with Retry-After: `--max-queued` requests wait already.
    pub fn queue_full() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server's queue is full; retry shortly".into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn internal(message: String) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
            kind: "server_error",
            param: None,
            code: None,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// OpenAI's `{"error": {...}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": ErrorBody {
            message: &self.message,
            kind: self.kind,
            param: self.param.as_deref(),
            code: self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

struct AppState {
    /// The name the base model answers to.
    base: String,
    /// The adapters served as models (loaded at start, at run time, or trained by a job).
    adapters: RwLock<Vec<String>>,
    api_key: Option<String>,
    engine: Engine,
    next_id: AtomicU64,
    max_body_bytes: usize,
    runtime_lora: bool,
    fine_tuning: Option<Arc<fine_tuning::Store>>,
}

impl AppState {
    fn has_adapter(&self, name: &str) -> bool {
        self.adapters
            .read()
            .expect("adapters lock")
            .iter()
            .any(|a| a == name)
    }
}

/// What `serve` is given.
pub struct ServeConfig {
    /// The name the base model answers to in `model`.
    pub base_name: String,
    pub api_key: Option<String>,
    pub limits: Limits,
    /// vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter.
    pub runtime_lora: bool,
    /// OpenAI's files and fine-tuning endpoints, with their state directory and recipe.
    pub fine_tuning: Option<fine_tuning::FineTuningConfig>,
}

/// Binds `addr` (port 0: any free one) and returns the address bound and the server's future, which
/// runs until `shutdown` completes (the CLI: SIGINT or SIGTERM), then lets requests in flight finish.
pub async fn bind(
    mut backend: LocalBackend,
    config: ServeConfig,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let store = config
        .fine_tuning
        .map(fine_tuning::Store::open)
        .transpose()?
        .map(Arc::new);
    let mut pending = vec![];
    if let Some(store) = &store {
        let (models, unfinished) = store.startup();
        for (name, dir) in models {
            backend
                .add_adapter(&name, &dir)
                .with_context(|| format!("serving the fine-tuned model {name}"))?;
        }
        pending = unfinished;
    }
    let adapters = backend.adapter_names();
    let state = Arc::new(AppState {
        base: config.base_name,
        adapters: RwLock::new(adapters),
        api_key: config.api_key,
        engine: Engine::start(backend, &config.limits),
        next_id: AtomicU64::new(0),
        max_body_bytes: config.limits.max_body_bytes,
        runtime_lora: config.runtime_lora,
        fine_tuning: store,
    });
    // Jobs a stopped server left unfinished resume from their last checkpoint.
    for id in pending {
        state
            .engine
            .submit_task(fine_tuning::train_task(state.clone(), id));
    }
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/load_lora_adapter", post(adapters::load))
        .route("/v1/unload_lora_adapter", post(adapters::unload))
        .route(
            "/v1/files",
            post(fine_tuning::upload).layer(axum::extract::DefaultBodyLimit::max(
                config.limits.max_file_bytes,
            )),
        )
        .route("/v1/files/{id}", get(fine_tuning::file))
        .route(
            "/v1/fine_tuning/jobs",
            post(fine_tuning::create_job).get(fine_tuning::jobs),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(fine_tuning::job))
        .route(
            "/v1/fine_tuning/jobs/{id}/cancel",
            post(fine_tuning::cancel),
        )
        .route("/v1/fine_tuning/jobs/{id}/events", get(fine_tuning::events))
        .fallback(not_found)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    Ok((bound, std::future::IntoFuture::into_future(server)))
}

/// SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    eprintln!("introspect serve: stopping after the requests in flight");
}

fn check_key(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "missing or wrong API key (Authorization: Bearer <key>)".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    })
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint; this server has GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/load_lora_adapter and /v1/unload_lora_adapter, /v1/files and /v1/fine_tuning/jobs"
            .into(),
        kind: "invalid_request_error",
        param: None,
        code: None,
    }
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&state, &headers) {
        return e.into_response();
    }
    let mut data = vec![serde_json::json!({
        "id": state.base, "object": "model", "created": 0, "owned_by": "introspect",
        "root": state.base, "parent": null,
    })];
    for a in state.adapters.read().expect("adapters lock").iter() {
        data.push(serde_json::json!({
            "id": a, "object": "model", "created": 0, "owned_by": "introspect",
            "root": state.base, "parent": state.base,
        }));
    }
    Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The body, up to `limit` bytes. A longer one is read on (and dropped) up to 64× the limit before the
/// 413 goes out: a client still sending would otherwise see the connection reset instead of the answer.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request(format!("cannot read the request body: {e}"), None)
        })?;
        seen += chunk.len();
        if seen <= limit {
            bytes.extend_from_slice(&chunk);
        } else if seen > limit.saturating_mul(64) {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the request body is over this server's limit of {limit} bytes (--max-body-mib)"
            ),
            kind: "invalid_request_error",
            param: None,
            code: None,
        });
    }
    Ok(Bytes::from(bytes))
}

/// The body as JSON of type T, or the 400 that says what is wrong with it.
fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not a valid request: {e}"), None))
}

/// The engine's answer to a submitted request, or 503 when the queue was full.
async fn wait<T>(submitted: engine::Submit<T>) -> Result<T, ApiError> {
    match submitted {
        Some(rx) => rx
            .await
            .map_err(|_| ApiError::internal("the engine stopped".into()))?,
        None => Err(ApiError::queue_full()),
    }
}

/// The adapter a request's `model` names (None: the base), or 404.
fn resolve_model(state: &AppState, model: &str) -> Result<Option<String>, ApiError> {
    if model == state.base {
        return Ok(None);
    }
    if state.has_adapter(model) {
        return Ok(Some(model.to_string()));
    }
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "the model `{model}` does not exist; this server has: {}",
            std::iter::once(&state.base)
                .chain(state.adapters.read().expect("adapters lock").iter())
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ),
        kind: "invalid_request_error",
        param: Some("model".into()),
        code: Some("model_not_found"),
    })
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let answer = async {
        let bytes = read_body(body, state.max_body_bytes).await?;
        check_key(&state, &headers)?;
        let body: wire::CompletionBody = parse_body(&bytes)?;
        let job = body.to_job(resolve_model(&state, &body.model)?)?;
        let answers = wait(state.engine.submit_completion(job)).await?;
        let id = format!("cmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
        Ok::<_, ApiError>(Json(wire::text_completion_json(
            &id,
            now(),
            &body.model,
            &answers,
        )))
    };
    answer.await.into_response()
}

async fn chat(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    chat_inner(&state, &headers, body).await.into_response()
}

async fn chat_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.max_body_bytes).await?;
    check_key(state, headers)?;
    let body: wire::ChatBody = parse_body(&bytes)?;
    let request = body.to_request(resolve_model(state, &body.model)?)?;
    let id = format!("chatcmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
    let created = now();
    if body.stream.unwrap_or(false) {
        let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
        let chunks = wire::ChatChunks::new(id, created, body.model, request.n, include_usage);
        return stream_chat(state, request, chunks).await;
    }
    let answer = wait(state.engine.submit(request)).await?;
    Ok(Json(wire::completion_json(&id, created, &body.model, &answer)).into_response())
}

/// Server-sent events of a streamed chat answer, token by token, ending with `data: [DONE]`. The answer
/// starts once the engine has admitted the request (so a prompt over the context is still a 400); a
/// fault after that arrives as an error event. A client that goes away drops the events, which tells
/// the engine to drop its rows.
async fn stream_chat(
    state: &AppState,
    request: ChatRequest,
    mut chunks: wire::ChatChunks,
) -> Result<Response, ApiError> {
    let mut events = state
        .engine
        .submit_stream(request)
        .ok_or_else(ApiError::queue_full)?;
    match events.recv().await {
        Some(engine::StreamEvent::Admitted) => {}
        Some(engine::StreamEvent::Done(Err(e))) => return Err(e),
        _ => return Err(ApiError::internal("the engine stopped".into())),
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Event, Infallible>>();
    let send = move |data: String| tx.send(Ok(Event::default().data(data))).is_ok();
    tokio::spawn(async move {
        for c in chunks.start() {
            if !send(c.to_string()) {
                return;
            }
        }
        while let Some(event) = events.recv().await {
            let out = match event {
                engine::StreamEvent::Admitted => vec![],
                engine::StreamEvent::Delta {
                    choice,
                    text,
                    tokens,
                } => vec![chunks.delta(choice, &text, &tokens)],
                engine::StreamEvent::Done(Ok(answer)) => chunks.finish(&answer),
                engine::StreamEvent::Done(Err(e)) => vec![e.body()],
            };
            for c in out {
                if !send(c.to_string()) {
                    return;
                }
            }
        }
        send("[DONE]".into());
    });
    Ok(Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).into_response())
}
