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
    /// Every status, in the order of their discriminants.
    pub const ALL: [CacheStatus; 5] = [
        CacheStatus::Hit,
        CacheStatus::Miss,
        CacheStatus::Coalesced,
        CacheStatus::Partial,
        CacheStatus::Bypass,
    ];

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

/// The body of an [`Answer`].
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

/// An answer to one request. Its headers already carry `llm-dedup-cache`, `llm-dedup-key`
/// (when the request had a key) and `age` (on hits).
#[derive(Debug)]
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
