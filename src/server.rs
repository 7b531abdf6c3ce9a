//! The proxy: llm-dedup over HTTP, for clients in any language.
//!
//! This module owns the axum application: routing (operator endpoints under `/_llm-dedup/`,
//! everything else to the engine), the per-request span and log line, the one place
//! where an engine error becomes an HTTP status with an OpenAI-style JSON body, and graceful
//! shutdown. It holds no caching logic: every decision is the engine's.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::answer::AnswerBody;
use crate::engine::Dedup;
use crate::error::{Error, ErrorKind};

/// Numbers requests in the order they arrive, for the log.
static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

/// The proxy's router: operator endpoints, and every other request to `engine`.
///
/// Request ids and tracing are done in the proxy handler rather than by tower-http's layers: on the
/// hit path those layers cost about a fifth of the throughput (measured with
/// `cargo bench --bench load`), while a span created in the handler costs nothing when debug
/// logging is off.
pub fn app(engine: Dedup) -> Router {
    Router::new()
        .route("/_llm-dedup/health", get(health))
        .route("/_llm-dedup/stats", get(stats))
        .route("/_llm-dedup/metrics", get(metrics))
        // The operator namespace is llm-dedup's own: nothing under it is ever forwarded.
        .route("/_llm-dedup/{*rest}", any(unknown_operator_path))
        .fallback(proxy)
        .with_state(engine)
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// The same JSON as `llm-dedup stats --json`, counters committed first so they are current.
async fn stats(State(engine): State<Dedup>) -> Response {
    let Some(path) = engine.database().map(ToOwned::to_owned) else {
        let e = Error::new(ErrorKind::Cache, "this proxy keeps no database");
        return error_response(&e);
    };
    if let Err(e) = engine.flush().await {
        return error_response(&e);
    }
    let read = tokio::task::spawn_blocking(move || crate::inspect::Inspector::open(&path)?.stats());
    match read.await {
        Ok(Ok(stats)) => axum::Json(stats).into_response(),
        Ok(Err(e)) => error_response(&Error::with_source(
            ErrorKind::Cache,
            "cannot read the stats",
            e,
        )),
        Err(e) => error_response(&Error::with_source(
            ErrorKind::Cache,
            "cannot read the stats",
            e,
        )),
    }
}

/// Prometheus text format.
async fn metrics(State(engine): State<Dedup>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        engine.metrics_text().await,
    )
        .into_response()
}

async fn unknown_operator_path(uri: axum::http::Uri) -> Response {
    let message = format!("no operator endpoint at {}", uri.path());
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
                                "param": null, "code": "not_found"}});
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

async fn proxy(State(engine): State<Dedup>, request: Request) -> Response {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        // Nothing would be logged: no span, no clock reading.
        return answer(engine, request, None).await;
    }
    // The span names the path only: queries and headers may carry credentials.
    let span = tracing::debug_span!(
        "request",
        id = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed),
        method = %request.method(),
        path = request.uri().path(),
    );
    let started = Some(std::time::Instant::now());
    answer(engine, request, started).instrument(span).await
}

async fn answer(engine: Dedup, request: Request, started: Option<std::time::Instant>) -> Response {
    match engine.send(request).await {
        Ok(answer) => {
            if let Some(started) = started {
                tracing::debug!(
                    cache = answer.cache.as_str(),
                    status = answer.status.as_u16(),
                    key = answer.key.map(|k| k.to_hex()[..12].to_owned()),
                    ms = started.elapsed().as_millis() as u64,
                    "answered"
                );
            }
            let body = match answer.body {
                AnswerBody::Full(bytes) => Body::from(bytes),
                AnswerBody::Stream(stream) => Body::from_stream(stream),
            };
            let mut response = Response::new(body);
            *response.status_mut() = answer.status;
            *response.headers_mut() = answer.headers;
            response
        }
        Err(e) => error_response(&e),
    }
}

/// The one place where an engine error becomes an HTTP answer, shaped like the provider's
/// own errors (`{"error": {"message", "type", "param", "code"}}`) so SDKs surface it well.
pub fn error_response(e: &Error) -> Response {
    let (status, kind, code) = match e.kind() {
        ErrorKind::InvalidRequest => (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
        ),
        ErrorKind::BodyTooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
        ),
        ErrorKind::NotCached => (
            StatusCode::GATEWAY_TIMEOUT,
            "invalid_request_error",
            "not_cached",
        ),
        ErrorKind::UpstreamTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "upstream_timeout",
        ),
        ErrorKind::QueueFull => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "queue_full",
        ),
        ErrorKind::UpstreamUnreachable | ErrorKind::Abandoned => (
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_unreachable",
        ),
        ErrorKind::UpstreamInvalid => (
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_invalid_answer",
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
        ),
    };
    // A miss under `only-if-cached` is a 504 by the standard, but the answer the client asked
    // for, not a failure.
    if status.is_server_error() && e.kind() != ErrorKind::NotCached {
        tracing::warn!(error = %e.chain(), status = status.as_u16(), "request failed");
    } else {
        tracing::debug!(error = %e.chain(), status = status.as_u16(), "request refused");
    }
    let body =
        json!({"error": {"message": e.to_string(), "type": kind, "param": null, "code": code}});
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::HeaderName::from_static("x-should-retry"),
        HeaderValue::from_static(if e.is_retryable() { "true" } else { "false" }),
    );
    if let Some(wait) = e.retry_after() {
        // Whole seconds, at most 60: the official SDKs honour that exactly.
        let secs = wait.as_secs_f64().ceil().clamp(1.0, 60.0) as u64;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.into());
    }
    response
}

/// Serves the proxy on `listener` until `shutdown` resolves, then drains: requests in progress
/// finish, upstream calls in flight finish and are stored, and the database writer commits
/// everything before this returns.
pub async fn serve<F>(listener: TcpListener, engine: Dedup, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, app(engine.clone()))
        .with_graceful_shutdown(shutdown)
        .await?;
    engine.close().await.map_err(std::io::Error::other)
}
