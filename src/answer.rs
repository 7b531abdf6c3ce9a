//! What a request gets back: an [`Answer`], how it was produced ([`CacheStatus`]), and the
//! shape every refused answer takes on its way through the engine ([`Refusal`]).
//!
//! This module owns the answer types the engine, the proxy, the metrics and the middleware all
//! speak. It is a leaf: it imports only the other leaves (`error`, `key`, `headers`).

use bytes::Bytes;
use futures_util::TryStreamExt;
use futures_util::stream::BoxStream;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::error::Error;
use crate::headers::CACHE_HEADER;
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
