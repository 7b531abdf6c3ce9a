//! What a request gets back: an [`Answer`], how it was produced ([`CacheStatus`]), and the
//! shape every refused answer takes on its way through the engine ([`Refusal`]).
//!
//! This module owns the answer types the engine, the proxy, the metrics and the middleware all
//! speak. It is a leaf: it imports only the other leaves (`error`, `key`, `headers`).

use bytes::Bytes;
use futures_util::TryStreamExt;
use futures_util::stream::BoxStream;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::error::{Error, ErrorKind};
use crate::headers::{CACHE_HEADER, SHOULD_RETRY};
use crate::key::CacheKey;

/// How an answer was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheStatus {
    /// Served from the cache; the upstream was not called.
    Hit,
    /// This request's upstream call produced the answer.
    Miss,
    /// An identical request in flight at the same moment produced the answer.
    Coalesced,
    /// Embeddings only: some inputs were answered from the cache, the others by the upstream.
    Partial,
    /// The cache was not used (not cacheable, streamed, stateful, or `no-store`).
    Bypass,
}

impl CacheStatus {
    /// The value of the `llm-dedup-cache` header.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Partial => "partial",
            CacheStatus::Bypass => "bypass",
        }
    }

    /// The `llm-dedup-cache` header value.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// The body of an [`Answer`]: an [`http_body::Body`], so an answer is an
/// `http::Response<AnswerBody>` (`Answer::into`) for any hyper, axum or tower stack.
#[non_exhaustive]
pub enum AnswerBody {
    /// A complete body.
    Full(Bytes),
    /// A body passed through as it arrives from the upstream.
    Stream(BoxStream<'static, Result<Bytes, Error>>),
}

impl std::fmt::Debug for AnswerBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnswerBody::Full(b) => f.debug_tuple("Full").field(&b.len()).finish(),
            AnswerBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

impl http_body::Body for AnswerBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Error>>> {
        use futures_util::Stream;
        match self.get_mut() {
            AnswerBody::Full(bytes) if bytes.is_empty() => std::task::Poll::Ready(None),
            AnswerBody::Full(bytes) => {
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(std::mem::take(bytes)))))
            }
            AnswerBody::Stream(stream) => std::pin::Pin::new(stream)
                .poll_next(cx)
                .map(|next| next.map(|chunk| chunk.map(http_body::Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, AnswerBody::Full(bytes) if bytes.is_empty())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            AnswerBody::Full(bytes) => http_body::SizeHint::with_exact(bytes.len() as u64),
            AnswerBody::Stream(_) => http_body::SizeHint::default(),
        }
    }
}

/// An answer to one request. Its headers already carry `llm-dedup-cache`, `llm-dedup-key`
/// (when the request had a key) and `age` (on hits). `http::Response::from(answer)` makes it
/// a response for any HTTP stack.
#[derive(Debug)]
#[non_exhaustive]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: AnswerBody,
    /// How it was produced.
    pub cache: CacheStatus,
    /// The request's cache key, when it had one.
    pub key: Option<CacheKey>,
}

impl Answer {
    /// The complete body, reading a streamed one to its end.
    pub async fn into_bytes(self) -> Result<Bytes, Error> {
        match self.body {
            AnswerBody::Full(b) => Ok(b),
            AnswerBody::Stream(s) => {
                let chunks: Vec<Bytes> = s.try_collect().await?;
                Ok(chunks.concat().into())
            }
        }
    }
}

impl From<Answer> for http::Response<AnswerBody> {
    /// The answer's status, headers (the cache's own included) and body.
    fn from(answer: Answer) -> http::Response<AnswerBody> {
        let mut response = http::Response::new(answer.body);
        *response.status_mut() = answer.status;
        *response.headers_mut() = answer.headers;
        response
    }
}

impl From<Error> for http::Response<AnswerBody> {
    /// The error as the proxy answers it, shaped like the provider's own errors so that
    /// SDKs surface it well: its status (`400` malformed, `413` too large, `429` queue full,
    /// `502` upstream unreachable or invalid, `504` upstream timeout or an `only-if-cached`
    /// miss, `500` otherwise), `{"error": {"message", "type", "param", "code"}}`,
    /// `x-should-retry`, and `retry-after` when waiting helps. For a tower stack that needs a
    /// response for every request.
    fn from(e: Error) -> http::Response<AnswerBody> {
        let (status, kind, code) = error_shape(&e);
        let body = serde_json::json!({
            "error": {"message": e.to_string(), "type": kind, "param": null, "code": code}
        });
        let mut response = http::Response::new(AnswerBody::Full(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            SHOULD_RETRY,
            HeaderValue::from_static(if e.is_retryable() { "true" } else { "false" }),
        );
        if let Some(wait) = e.retry_after() {
            // Whole seconds, at most 60: the official SDKs honour that exactly.
            let secs = wait.as_secs_f64().ceil().clamp(1.0, 60.0) as u64;
            headers.insert(http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// The status, error type and code an engine error is answered with.
fn error_shape(e: &Error) -> (StatusCode, &'static str, &'static str) {
    match e.kind() {
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
    }
}

/// An upstream answer that is not a stored 2xx: passed on as it came (status, headers, body),
/// never stored. Shared by every waiter of the flight that received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The upstream's status.
    pub status: StatusCode,
    /// The upstream's headers (hop-by-hop ones removed).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Refusal {
    /// The answer a request gets from this refusal, marked with how it reached it. It has no
    /// key: nothing was stored.
    pub fn answer(&self, cache: CacheStatus) -> Answer {
        let mut headers = self.headers.clone();
        headers.insert(CACHE_HEADER, cache.header_value());
        Answer {
            status: self.status,
            headers,
            body: AnswerBody::Full(self.body.clone()),
            cache,
            key: None,
        }
    }
}
