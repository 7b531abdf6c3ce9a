//! The proxy's edge: accepting connections and holding clients to time and size limits.
//!
//! This module owns the accept loop and what it bounds: how long a request's headers may take,
//! how long a request body may stall, how many connections are open, how many bytes of request
//! bodies are held at once, and how long a stop waits for the answers in progress. Past a
//! bound a client gets an answer that says so (`408`, `503` with `Retry-After`) or its
//! connection is closed: nothing a client does, however slowly, holds the proxy, its memory or
//! its shutdown. It makes no caching decision; every request goes to the app as it came.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::metrics::EdgeFigures;
use crate::throttle::LogGate;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The edge's bounds: time a client may take, connections and request bytes at once, and the
/// time a stop waits. Each has a default fit for a proxy facing clients it does not control
/// (see [`EdgeLimits::default`]), and a setter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeLimits {
    header_timeout: Duration,
    body_timeout: Duration,
    max_connections: usize,
    max_buffered: u64,
    drain_timeout: Duration,
}

impl Default for EdgeLimits {
    /// Headers within 10 s, a body never silent for 30 s, 4,096 connections and 256 MiB of
    /// request bodies at once, 20 s to drain on a stop (below Kubernetes' 30 s grace period).
    fn default() -> Self {
        EdgeLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_buffered: 256 * 1024 * 1024,
            drain_timeout: Duration::from_secs(20),
        }
    }
}

impl EdgeLimits {
    /// How long a request's headers may take to arrive, counted from the moment the
    /// connection waits for them (so an idle keep-alive connection is closed after it too);
    /// past it the connection is closed. By default, 10 s.
    #[must_use]
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout;
        self
    }

    /// The longest silence while a request body arrives (past it the request gets `408`), and
    /// the longest a client may leave its answer unread (past it the connection is closed). By
    /// default, 30 s.
    #[must_use]
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// Most connections open at once; a connection past it gets `503` with `Retry-After` and
    /// is closed. By default, 4,096.
    #[must_use]
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Most bytes of request bodies held in memory at once, over all requests, counted as they
    /// arrive; a request that would go past it gets `503` with `Retry-After`. By default,
    /// 256 MiB.
    #[must_use]
    pub fn max_buffered(mut self, bytes: u64) -> Self {
        self.max_buffered = bytes;
        self
    }

    /// How long a stop waits for the answers in progress before it closes their connections.
    /// By default, 20 s.
    #[must_use]
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The drain deadline (see [`EdgeLimits::drain_timeout`]).
    pub fn drain(&self) -> Duration {
        self.drain_timeout
    }

    /// The bound on request bytes held at once (see [`EdgeLimits::max_buffered`]).
    pub fn buffered(&self) -> u64 {
        self.max_buffered
    }
}

/// Logs about accept errors (out of file descriptors), at most once a minute.
static ACCEPT_FAILED: LogGate = LogGate::per_minute();

/// Most connections being refused at once (each is answered `503` and closed within a
/// second); past it, a connection is closed without an answer.
const MAX_REFUSING: usize = 256;

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then drains: stops
/// accepting, lets the answers in progress finish, and after the drain deadline closes the
/// connections still open. Returns, once every connection is closed, when the stop began.
/// Moves `figures` as connections open and close, bytes are held and clients turned away.
pub(super) async fn run<F>(
    listener: TcpListener,
    app: Router,
    limits: EdgeLimits,
    figures: EdgeFigures,
    shutdown: F,
) -> tokio::time::Instant
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let http1 = Arc::new(http1);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let buffered = Arc::new(Buffered {
        max: limits.max_buffered,
        held: AtomicU64::new(0),
        figures: figures.clone(),
    });
    let graceful = GracefulShutdown::new();
    let tasks = TaskTracker::new();
    // Cancelled at the drain deadline: every connection still open closes.
    let cut = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            figures.refuse("max_connections");
            if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                tasks.spawn(async move {
                    refuse(stream).await;
                    drop(refusal);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let edge = Edge {
            app: app.clone(),
            peer,
            limits,
            buffered: buffered.clone(),
        };
        let service = hyper::service::service_fn(move |request| edge.clone().handle(request));
        // HTTP/1.1 only: its header timeout holds from the first byte awaited (an HTTP/2
        // preface is refused as a malformed request).
        let io = TokioIo::new(Reading::new(stream, limits.body_timeout));
        let conn = graceful.watch(http1.serve_connection(io, service));
        let cut = cut.clone();
        let open = figures.connections.clone();
        open.inc();
        tasks.spawn(async move {
            tokio::select! {
                _ = conn => {}
                () = cut.cancelled() => {}
            }
            open.dec();
            drop(permit);
        });
    }
    let stopped = tokio::time::Instant::now();
    drop(listener);
    let open = graceful.count();
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open,
            deadline = ?limits.drain_timeout,
            "answers still in progress at the drain deadline: their connections are closed"
        );
        cut.cancel();
    }
    tasks.close();
    tasks.wait().await;
    stopped
}

/// A client connection that must keep reading what it asked for: a write that finds no room
/// for `silence` (the client stopped reading) fails, and the connection closes.
struct Reading {
    inner: TcpStream,
    silence: Duration,
    /// Running while a write waits for room.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Reading {
    fn new(inner: TcpStream, silence: Duration) -> Reading {
        Reading {
            inner,
            silence,
            stall: None,
        }
    }

    /// What a write that waited gives: `Pending` while it may still wait, an error once it
    /// waited too long.
    fn waited<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stall = None;
            return polled;
        }
        let silence = self.silence;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(silence)));
        if stall.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading its answer",
            )));
        }
        Poll::Pending
    }
}

impl tokio::io::AsyncRead for Reading {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Reading {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.waited(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.waited(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Waits out an accept error: none for a connection that failed before it was accepted, a
/// second for anything else (out of file descriptors: connections will close meanwhile).
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    if let Some(held) = ACCEPT_FAILED.open() {
        tracing::error!(error = %e, similar_since = held, "cannot accept connections; trying again in a second");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Answers a connection past `--max-connections` with `503` and closes it, within a second.
async fn refuse(mut stream: TcpStream) {
    let body = json!({"error": {
        "message": "the proxy has too many connections open; retry in a moment",
        "type": "server_error", "param": null, "code": "too_many_connections"}})
    .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nx-should-retry: true\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sends until it closes: closing with unread bytes would reset
        // the connection, and the client might lose the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// What one connection's requests go through.
#[derive(Clone)]
struct Edge {
    app: Router,
    peer: SocketAddr,
    limits: EdgeLimits,
    buffered: Arc<Buffered>,
}

impl Edge {
    /// Hands `request` to the app, its body bounded in time and in bytes held, and turns a
    /// body that stalled or went past the bound into the answer that says so.
    async fn handle(self, request: Request<Incoming>) -> Result<Response, Infallible> {
        let hold = Arc::new(Hold {
            budget: self.buffered.clone(),
            bytes: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            over: AtomicBool::new(false),
        });
        let (mut parts, body) = request.into_parts();
        // Bytes are counted as they arrive, not as declared: a client declaring a large body
        // and sending it slowly holds what it sent, not what it promised.
        parts.extensions.insert(ConnectInfo(self.peer));
        let body = Body::new(Guarded {
            inner: body,
            hold: hold.clone(),
            silence: self.limits.body_timeout,
            stall: None,
        });
        let response = match self.app.oneshot(Request::from_parts(parts, body)).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        if hold.stalled.load(Ordering::Relaxed) {
            self.buffered.figures.refuse("body_timeout");
            return Ok(stalled(self.limits.body_timeout));
        }
        if hold.over.load(Ordering::Relaxed) {
            self.buffered.figures.refuse("max_buffered");
            return Ok(busy());
        }
        // The bytes stay counted while an answer still being made goes out.
        if response.body().size_hint().exact().is_some() {
            return Ok(response);
        }
        Ok(response.map(|inner| Body::new(Holding { inner, _hold: hold })))
    }
}

/// Request bytes held across all requests, against the bound.
struct Buffered {
    max: u64,
    held: AtomicU64,
    /// Where the bytes held are reported.
    figures: EdgeFigures,
}

/// What one request holds of the bound, and what became of its body. The bytes are given back
/// when the last holder (the body, the answer going out) is dropped.
struct Hold {
    budget: Arc<Buffered>,
    bytes: AtomicU64,
    stalled: AtomicBool,
    over: AtomicBool,
}

impl Hold {
    /// Holds `n` more bytes, if the bound allows.
    fn grow(&self, n: u64) -> bool {
        let taken = self
            .budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n)
                    .filter(|total| *total <= self.budget.max)
            });
        if taken.is_ok() {
            self.bytes.fetch_add(n, Ordering::Relaxed);
            self.budget.figures.bytes_held.inc_by(gauge(n));
        }
        taken.is_ok()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let bytes = *self.bytes.get_mut();
        self.budget.held.fetch_sub(bytes, Ordering::AcqRel);
        self.budget.figures.bytes_held.dec_by(gauge(bytes));
    }
}

/// A count of bytes as a gauge's step (never near the limit: bytes held are bounded).
fn gauge(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// A request body that may not stall longer than `silence` between two frames, and whose
/// bytes count against the bound of bytes held.
struct Guarded {
    inner: Incoming,
    hold: Arc<Hold>,
    silence: Duration,
    /// Running while the body is silent.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("the request body stalled")]
    Stalled,
    #[error("too many request bytes are held at once")]
    OverBound,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.stall = None;
                if let Some(data) = frame.data_ref()
                    && !this.hold.grow(data.len() as u64)
                {
                    this.hold.over.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Cut::OverBound.into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let silence = this.silence;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(silence)));
                if stall.as_mut().poll(cx).is_ready() {
                    this.hold.stalled.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Cut::Stalled.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An answer going out, holding its request's bytes until it is done.
struct Holding {
    inner: Body,
    _hold: Arc<Hold>,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `503` for a request that would hold more bytes than the bound allows.
fn busy() -> Response {
    let body = json!({"error": {
        "message": "the proxy holds too many request bytes at once; retry in a moment",
        "type": "server_error", "param": null, "code": "too_many_request_bytes"}});
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(
        crate::headers::SHOULD_RETRY,
        HeaderValue::from_static("true"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `408` for a request whose body stalled longer than `silence`.
fn stalled(silence: Duration) -> Response {
    let body = json!({"error": {
        "message": format!("the request body stalled: no byte for {}", humantime::format_duration(silence)),
        "type": "invalid_request_error", "param": null, "code": "request_timeout"}});
    let mut response = (StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        crate::headers::SHOULD_RETRY,
        HeaderValue::from_static("true"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
