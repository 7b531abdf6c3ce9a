//! The proxy: llm-dedup over HTTP, for clients in any language.
//!
//! This module owns the axum application: routing (operator endpoints under `/_llm-dedup/`,
//! everything else to the engine), the per-request span and log line, the one place
//! where an engine error becomes an HTTP status with an OpenAI-style JSON body, and graceful
//! shutdown. It holds no caching logic: every decision is the engine's.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::answer::AnswerBody;
use crate::engine::{Dedup, PeerRefused};
use crate::error::{Error, ErrorKind};

mod edge;
mod operator;
#[cfg(feature = "sqlite")]
mod stats;

pub use edge::EdgeLimits;
pub use operator::OperatorAccess;

/// Numbers requests in the order they arrive, for the log.
static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

/// What the operator endpoints share.
struct Operator {
    access: OperatorAccess,
    #[cfg(feature = "sqlite")]
    stats: tokio::sync::Mutex<stats::StatsCache>,
}

#[derive(Clone)]
struct AppState {
    engine: Dedup,
    operator: Arc<Operator>,
}

/// The proxy's router: operator endpoints (loopback only), and every other request to `engine`.
///
/// Request ids and tracing are done in the proxy handler rather than by tower-http's layers: on the
/// hit path those layers cost about a fifth of the throughput (measured with
/// `cargo bench --bench load`), while a span created in the handler costs nothing when debug
/// logging is off.
pub fn app(engine: Dedup) -> Router {
    app_with(engine, OperatorAccess::loopback_only())
}

/// The proxy's router with the operator endpoints open as `access` says. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` (as [`serve`] does): without a peer
/// address, nobody is on loopback.
pub fn app_with(engine: Dedup, access: OperatorAccess) -> Router {
    let state = AppState {
        engine,
        operator: Arc::new(Operator {
            access,
            #[cfg(feature = "sqlite")]
            stats: Default::default(),
        }),
    };
    let operator = Router::new()
        .route("/_llm-dedup/stats", get(stats))
        .route("/_llm-dedup/metrics", get(metrics))
        .route("/_llm-dedup", get(crate::page::page))
        .route("/_llm-dedup/", get(crate::page::page))
        .route("/_llm-dedup/series", get(series))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            operator_only,
        ));
    let routes = Router::new()
        .route("/_llm-dedup/health", get(health))
        // Another replica of the fleet, with a token made with the fleet secret.
        .route("/_llm-dedup/peer/{key}", get(peer))
        .merge(operator)
        // The operator namespace is llm-dedup's own: nothing under it is ever forwarded.
        .route("/_llm-dedup/{*rest}", any(unknown_operator_path))
        .fallback(proxy)
        .with_state(state);
    // Before routing: every spelling of an operator path is routed as that path.
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::map_request(
            operator::normalize_operator_path,
        ))
}

async fn operator_only(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match state.operator.access.check(&request) {
        Ok(()) => next.run(request).await,
        Err(refusal) => *refusal,
    }
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// The same JSON as `llm-dedup stats --json`, at most a second old. Cheap to call: it reads
/// through one read-only connection kept open, never waits for the writer, and answers calls
/// within a second of each other with the same figures.
#[cfg_attr(not(feature = "sqlite"), allow(unused_variables))]
async fn stats(State(state): State<AppState>) -> Response {
    #[cfg(feature = "sqlite")]
    if let Some(path) = state.engine.database().map(ToOwned::to_owned) {
        return stats::read(&state, path).await;
    }
    error_response(&Error::new(
        ErrorKind::Cache,
        "this proxy keeps no database",
    ))
}

/// Requests per minute by outcome (`?minutes=N`, at most a day, by default a day).
async fn series(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<crate::page::SeriesQuery>,
) -> Response {
    match query.minutes() {
        Ok(minutes) => axum::Json(state.engine.series(minutes)).into_response(),
        Err(message) => {
            let body = json!({"error": {"message": message, "type": "invalid_request_error",
                                        "param": "minutes", "code": null}});
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
        }
    }
}

/// Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.engine.metrics_text().await,
    )
        .into_response()
}

/// The rest of a stream, for another replica of the fleet (see `engine/peer.rs`).
async fn peer(
    State(state): State<AppState>,
    axum::extract::Path(key): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    let token = headers
        .get(crate::headers::PEER_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match state.engine.peer_stream(&key, token).await {
        Ok(answer) => into_response(answer),
        Err(refused) => {
            let (status, message) = match refused {
                PeerRefused::Forbidden => (
                    StatusCode::FORBIDDEN,
                    "this endpoint answers the replicas of a fleet, with a token of its secret",
                ),
                PeerRefused::NotHere => (
                    StatusCode::NOT_FOUND,
                    "this replica receives no stream under that key",
                ),
            };
            let body = json!({"error": {"message": message, "type": "invalid_request_error",
                                        "param": null, "code": null}});
            (status, axum::Json(body)).into_response()
        }
    }
}

async fn unknown_operator_path(uri: axum::http::Uri) -> Response {
    let message = format!("no operator endpoint at {}", uri.path());
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
                                "param": null, "code": "not_found"}});
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

async fn proxy(State(AppState { engine, .. }): State<AppState>, request: Request) -> Response {
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
            into_response(answer)
        }
        Err(e) => error_response(&e),
    }
}

/// An engine's answer as an HTTP response.
fn into_response(answer: crate::answer::Answer) -> Response {
    let body = match answer.body {
        AnswerBody::Full(bytes) => Body::from(bytes),
        AnswerBody::Stream(stream) => Body::from_stream(stream),
    };
    let mut response = Response::new(body);
    *response.status_mut() = answer.status;
    *response.headers_mut() = answer.headers;
    response
}

/// An engine error as the proxy answers it (`http::Response::from(error)`, shaped like the
/// provider's own errors), logged by how much it matters.
pub fn error_response(e: &Error) -> Response {
    let response = http::Response::<AnswerBody>::from(e.clone());
    let status = response.status();
    // A miss under `only-if-cached` is a 504 by the standard, but the answer the client asked
    // for, not a failure.
    if status.is_server_error() && e.kind() != ErrorKind::NotCached {
        tracing::warn!(error = %e.chain(), status = status.as_u16(), "request failed");
    } else {
        tracing::debug!(error = %e.chain(), status = status.as_u16(), "request refused");
    }
    response.map(Body::new)
}

/// Serves the proxy on `listener` within the edge's `limits` until `shutdown` resolves, then
/// drains: stops accepting, lets the answers in progress finish within the drain deadline
/// (then closes their connections), waits for the upstream calls in flight until that
/// deadline (then fails them), and commits everything queued for the database before this
/// returns. The operator endpoints answer as
/// `access` says.
pub async fn serve<F>(
    listener: TcpListener,
    engine: Dedup,
    access: OperatorAccess,
    limits: EdgeLimits,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let access = match listener.local_addr() {
        Ok(addr) => access.listening_on(addr),
        Err(_) => access,
    };
    let app = app_with(engine.clone(), access);
    let figures = engine.edge_figures();
    let stopped = edge::run(listener, app, limits, figures, shutdown).await;
    // Upstream calls still running (their clients gone) get what is left of the deadline.
    let left = (stopped + limits.drain()).saturating_duration_since(tokio::time::Instant::now());
    engine.shutdown(left).await.map_err(std::io::Error::other)
}
