//! The proxy: llm-dedup over HTTP, for clients in any language.
//!
//! This module owns the axum application: routing (operator endpoints under `/_llm-dedup/`,
//! everything else to the engine), the tower layers for request ids and tracing, the one place
//! where an engine error becomes an HTTP status with an OpenAI-style JSON body, and graceful
//! shutdown. It holds no caching logic: every decision is the engine's.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::engine::{AnswerBody, Dedup};
use crate::error::{Error, ErrorKind};

/// Header carrying the proxy's id for a request (distinct from the provider's `x-request-id`).
pub const REQUEST_ID_HEADER: &str = "llm-dedup-request-id";

/// Numbers requests in the order they arrive.
#[derive(Clone, Default)]
struct Counter;

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

impl MakeRequestId for Counter {
    fn make_request_id<B>(&mut self, _request: &http::Request<B>) -> Option<RequestId> {
        let n = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&n.to_string())
            .ok()
            .map(RequestId::new)
    }
}

/// The proxy's router: operator endpoints, and every other request to `engine`.
pub fn app(engine: Dedup) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    let layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(request_id.clone(), Counter))
        .layer(
            TraceLayer::new_for_http()
                // The span names the path only: queries and headers may carry credentials.
                .make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get(REQUEST_ID_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::debug_span!("request", id, method = %req.method(), path = req.uri().path())
                })
                // One line per request, written by `proxy` with the cache outcome in it.
                .on_request(())
                .on_response(())
                .on_eos(())
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(PropagateRequestIdLayer::new(request_id));
    Router::new()
        .route("/_llm-dedup/health", get(health))
        .fallback(proxy)
        .with_state(engine)
        .layer(layers)
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn proxy(State(engine): State<Dedup>, request: Request) -> Response {
    let started = std::time::Instant::now();
    match engine.send(request).await {
        Ok(answer) => {
            tracing::debug!(
                cache = answer.cache.as_str(),
                status = answer.status.as_u16(),
                key = answer.key.map(|k| k.to_hex()[..12].to_owned()),
                ms = started.elapsed().as_millis() as u64,
                "answered"
            );
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
        ErrorKind::UpstreamUnreachable | ErrorKind::Abandoned => (
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_unreachable",
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
        ),
    };
    if status.is_server_error() {
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
