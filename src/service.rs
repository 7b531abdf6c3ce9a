//! The tower face: a [`Dedup`] is a [`tower::Service`] from `http::Request` to
//! `http::Response<AnswerBody>`, for axum, hyper, tonic or any tower stack.
//!
//! ```no_run
//! use tower::ServiceExt;
//!
//! # async fn run() -> Result<(), llm_dedup::Error> {
//! let dedup = llm_dedup::Dedup::builder().build()?;
//! let request = http::Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-...")
//!     .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{\"model\":\"gpt-4o-mini\",\"messages\":[]}")))
//!     .expect("a request");
//! let response = dedup.oneshot(request).await?;
//! println!("{:?}", response.headers().get("llm-dedup-cache"));
//! # Ok(()) }
//! ```
//!
//! The service is always ready (the engine queues what must wait for the upstream's budget
//! itself), and cheap to clone: clones share one engine.
//!
//! [`DedupLayer`] puts the engine in front of the caller's own tower service instead: what
//! must go upstream goes through that service (its credentials, tracing, proxy apply), with
//! an absolute URI under the engine's upstream and an [`UpstreamBody`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::TryStreamExt;

use crate::answer::AnswerBody;
use crate::engine::Dedup;
use crate::error::Error;
use crate::upstream::{CallerClient, CallerTransport, ServiceCall};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A future that may be sent across threads.
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<B> tower::Service<http::Request<B>> for Dedup
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<AnswerBody>;
    type Error = Error;
    type Future = BoxFuture<Result<Self::Response, Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let dedup = self.clone();
        Box::pin(async move { dedup.send(request).await.map(http::Response::from) })
    }
}

/// A tower layer that answers requests with a [`Dedup`] and sends what must go upstream
/// through the inner service it wraps (the caller's HTTP client as a tower service), so that
/// what that service adds (credentials, tracing, retries, a proxy) applies to the upstream
/// calls. Requests the inner service handles are partitioned apart from every other
/// caller's (the credential it adds is invisible to the engine): one layer's services share
/// answers with each other, not with other callers of the engine.
///
/// The inner service takes `http::Request<Body>` with an absolute URI under the engine's
/// upstream, and answers `http::Response` with any body of `Bytes`.
#[derive(Clone)]
pub struct DedupLayer {
    dedup: Dedup,
    id: [u8; 16],
}

impl DedupLayer {
    /// A layer answering with `dedup`.
    pub fn new(dedup: Dedup) -> DedupLayer {
        DedupLayer {
            dedup,
            id: rand::random(),
        }
    }
}

impl std::fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupLayer")
            .field("dedup", &self.dedup)
            .finish_non_exhaustive()
    }
}

impl<S> tower::Layer<S> for DedupLayer {
    type Service = DedupService<S>;

    fn layer(&self, inner: S) -> DedupService<S> {
        DedupService {
            dedup: self.dedup.clone(),
            inner,
            id: self.id,
        }
    }
}

/// The service of a [`DedupLayer`]: a [`Dedup`] over the caller's inner service.
#[derive(Clone)]
pub struct DedupService<S> {
    dedup: Dedup,
    inner: S,
    id: [u8; 16],
}

/// The body of a request [`DedupService`] hands to its inner service.
pub type UpstreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

impl<S, B, RB> tower::Service<http::Request<B>> for DedupService<S>
where
    S: tower::Service<http::Request<UpstreamBody>, Response = http::Response<RB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<AnswerBody>;
    type Error = Error;
    type Future = BoxFuture<Result<Self::Response, Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // In a lock, so that a service that is only `Send` still makes a `Sync` call.
        let inner = std::sync::Mutex::new(self.inner.clone());
        let call: ServiceCall =
            std::sync::Arc::new(move |request: http::Request<reqwest::Body>| {
                use http_body_util::BodyExt;
                use tower::ServiceExt;
                let request: http::Request<UpstreamBody> = request
                    .map(|body| body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync());
                // Boxed here, out of the async block: the compiler checks `Send` of the inner
                // service's future where its types are plain.
                let answered: BoxFuture<Result<S::Response, S::Error>> = Box::pin(
                    inner
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone()
                        .oneshot(request),
                );
                Box::pin(async move {
                    let response = answered.await.map_err(Into::into)?;
                    let response = response.map(|body| {
                        reqwest::Body::wrap_stream(body.into_data_stream().map_err(Into::into))
                    });
                    Ok(reqwest::Response::from(response))
                })
            });
        request.extensions_mut().insert(CallerClient {
            client: CallerTransport::Service(call),
            id: self.id,
        });
        let dedup = self.dedup.clone();
        Box::pin(async move { dedup.send(request).await.map(http::Response::from) })
    }
}
