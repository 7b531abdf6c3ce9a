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

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::answer::AnswerBody;
use crate::engine::Dedup;
use crate::error::Error;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> tower::Service<http::Request<B>> for Dedup
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<AnswerBody>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let dedup = self.clone();
        Box::pin(async move { dedup.send(request).await.map(http::Response::from) })
    }
}
