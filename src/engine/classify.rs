//! Phase 1, classify: may the cache answer this request, and what does it ask of the cache?
//!
//! A request's route and its controls (`Cache-Control`, `llm-dedup-ttl`,
//! `llm-dedup-namespace`) are read from its head; a request on no cacheable route, or with
//! `no-store`, is passed through with its body streamed. A cacheable request's body is read
//! whole (within `--max-body`) and, the first time its exact bytes are seen, parsed: a
//! stateful Responses request is passed through too, an embeddings request takes the
//! per-input path.

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::{BodyExt, Limited};
use serde_json::Value;

use super::{BoxError, Engine};
use crate::controls::CacheControls;
use crate::embeddings::{self, InputKind};
use crate::error::{Error, ErrorKind};
use crate::key::Partition;
use crate::route::{self, BypassReason, Route};
use crate::upstream::{self, CallerClient};

/// What the head of a request says.
pub(super) enum Class {
    /// The cache may answer it: its route and what it asks of the cache.
    Cacheable(Route, CacheControls),
    /// It goes around the cache.
    Bypass(Bypass),
}

/// A request that goes around the cache before its body is read.
pub(super) struct Bypass {
    route: Option<Route>,
    reason: BypassReason,
}

/// A request ready to go upstream; cheap to clone.
#[derive(Clone)]
pub(super) struct Outbound {
    pub method: Method,
    pub path_and_query: String,
    /// The headers that go upstream ([`upstream::forwarded`]); the key is computed from them.
    pub headers: HeaderMap,
    /// The `Proxy-Authorization` the client addressed to this proxy: not forwarded, but part
    /// of the credential partition.
    pub proxy_credential: Option<HeaderValue>,
    pub body: Bytes,
    /// The rate-limit budget it draws on: a salted hash of its credential headers. Known
    /// once the request is keyed.
    pub partition: Partition,
    /// Tokens the provider will charge up front, roughly. Known once the request is keyed.
    pub estimate: u32,
    /// The caller's own client, when it gave one: the request goes upstream with it.
    pub via: Option<CallerClient>,
}

impl Outbound {
    /// A request with its whole body, not keyed yet.
    #[inline]
    pub(super) fn new(head: Parts, body: Bytes) -> Outbound {
        let mut headers = head.headers;
        let (proxy_credential, via) = caller(&mut headers, &head.extensions);
        Outbound {
            path_and_query: path_and_query(&head.uri),
            method: head.method,
            headers,
            proxy_credential,
            body,
            partition: Partition::from_bytes([0; 32]),
            estimate: 0,
            via,
        }
    }
}

/// The request headers as they go upstream ([`upstream::forwarded`]), the
/// `Proxy-Authorization` that partitions the request besides them, and the caller's own
/// client, which the request is then sent with (its identity partitions it too).
fn caller(
    headers: &mut http::HeaderMap,
    extensions: &http::Extensions,
) -> (Option<HeaderValue>, Option<CallerClient>) {
    let proxy_credential = upstream::forwarded(headers);
    match extensions.get::<CallerClient>() {
        None => (proxy_credential, None),
        Some(via) => (proxy_credential, Some(via.clone())),
    }
}

impl Outbound {
    /// This request, sent around the cache for `reason`.
    pub(super) fn bypassed(
        self,
        route: Option<Route>,
        model: Option<String>,
        reason: BypassReason,
    ) -> Bypassed {
        Bypassed {
            method: self.method,
            path_and_query: self.path_and_query,
            headers: self.headers,
            body: self.body.into(),
            partition: self.partition,
            route,
            model,
            reason,
            via: self.via,
        }
    }
}

#[inline]
fn path_and_query(uri: &http::Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned())
}

/// A request passed through to the upstream as it came, its body streamed.
pub(super) struct Bypassed {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: reqwest::Body,
    /// The rate-limit budget it draws on.
    pub partition: Partition,
    /// The cacheable route it is on, if any, and the model it names, for the counters.
    pub route: Option<Route>,
    pub model: Option<String>,
    pub reason: BypassReason,
    /// The caller's own client, when it gave one.
    pub via: Option<CallerClient>,
}

/// What a cacheable request's body turned out to be.
pub(super) enum Parsed {
    /// An ordinary request: its parsed body (an object).
    Plain(Value),
    /// An embeddings request whose `input` splits into inputs the API accepts.
    Embeddings {
        body: Value,
        kind: InputKind,
        inputs: Vec<Value>,
    },
    /// A request that goes around the cache anyway (a stateful Responses request).
    Bypass {
        reason: BypassReason,
        model: Option<String>,
    },
}

impl Engine {
    /// Reads the route and the controls of a request from its head.
    #[inline]
    pub(super) fn classify(&self, head: &Parts) -> Result<Class, Error> {
        let controls = CacheControls::from_headers(&head.headers)
            .map_err(|m| Error::new(ErrorKind::InvalidRequest, m))?;
        let route = Route::classify(&head.method, head.uri.path());
        let declared = head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body as u64) {
            return Err(self.too_large());
        }
        Ok(match (route, controls.no_store) {
            (Some(route), false) => Class::Cacheable(route, controls),
            (Some(route), true) => Class::Bypass(Bypass {
                route: Some(route),
                reason: BypassReason::NoStore,
            }),
            (None, _) => Class::Bypass(Bypass {
                route: None,
                reason: BypassReason::NotCacheable,
            }),
        })
    }

    /// A request that goes around the cache, its body streamed within `--max-body`.
    pub(super) fn bypassed<B>(&self, head: Parts, body: B, bypass: Bypass) -> Bypassed
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let stream = Limited::new(body, self.max_body).into_data_stream();
        let mut headers = head.headers;
        let (proxy_credential, via) = caller(&mut headers, &head.extensions);
        Bypassed {
            path_and_query: path_and_query(&head.uri),
            partition: self.partition(&headers, proxy_credential.as_ref(), via.as_ref()),
            method: head.method,
            headers,
            body: reqwest::Body::wrap_stream(stream),
            route: bypass.route,
            model: None,
            reason: bypass.reason,
            via,
        }
    }

    /// Reads a whole request body of at most `--max-body` bytes. A body that arrives in one
    /// piece, as a small one does, is returned as it is, without copying (`http_body_util`'s
    /// `collect` cost the hit path more than the rest of reading the request).
    pub(super) async fn read_body<B>(&self, body: B) -> Result<Bytes, Error>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let mut body = std::pin::pin!(body);
        let mut first = Bytes::new();
        let mut joined = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                let e: BoxError = e.into();
                Error::new(
                    ErrorKind::InvalidRequest,
                    format!("could not read the request body: {e}"),
                )
            })?;
            // Trailers carry nothing a cache key or an upstream call uses.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if first.len() + joined.len() + data.len() > self.max_body {
                return Err(self.too_large());
            }
            if first.is_empty() && joined.is_empty() {
                first = data;
            } else {
                if joined.is_empty() {
                    joined.extend_from_slice(&std::mem::take(&mut first));
                }
                joined.extend_from_slice(&data);
            }
        }
        Ok(if joined.is_empty() {
            first
        } else {
            joined.into()
        })
    }

    /// Parses the body of a cacheable request on `route` and tells what it is.
    pub(super) fn parse(&self, route: Route, out: &Outbound) -> Result<Parsed, Error> {
        let value: Value = serde_json::from_slice(&out.body).map_err(|e| {
            Error::new(
                ErrorKind::InvalidRequest,
                format!("the request body is not valid JSON: {e}"),
            )
        })?;
        if !value.is_object() {
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                "the request body must be a JSON object",
            ));
        }
        if let Some(reason) = route::bypass_reason(route, &value) {
            let model = route::model_of(&out.path_and_query, &value);
            return Ok(Parsed::Bypass { reason, model });
        }
        if route == Route::Embeddings {
            // Cached and sent per input; a request whose `input` is not one the API accepts
            // is cached whole, and the provider says what is wrong with it.
            if let Some((kind, inputs)) = embeddings::split(value.get("input")) {
                let most = self.batcher.most_inputs();
                if inputs.len() > most {
                    // What the provider would refuse, before any work per input.
                    return Err(Error::new(
                        ErrorKind::InvalidRequest,
                        format!(
                            "an embeddings request takes at most {most} inputs; this one has {}",
                            inputs.len()
                        ),
                    ));
                }
                return Ok(Parsed::Embeddings {
                    body: value,
                    kind,
                    inputs,
                });
            }
        }
        Ok(Parsed::Plain(value))
    }

    pub(super) fn too_large(&self) -> Error {
        Error::new(
            ErrorKind::BodyTooLarge,
            format!(
                "the request body is larger than the limit of {} bytes",
                self.max_body
            ),
        )
    }
}
