//! llm-dedup under async-openai, in process: async-openai (feature `middleware`) sends every
//! request through a tower service of `HttpRequestFactory` (`Client::with_http_service`);
//! this one hands it to a [`Dedup`] as an `http::Request` and gives back its answer as the
//! `reqwest::Response` async-openai reads, streams included.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use http_body_util::BodyExt;
use llm_dedup::Dedup;

/// A tower service for `async_openai::Client::with_http_service`, answered by `Dedup`.
#[derive(Clone)]
pub struct ThroughDedup(pub Dedup);

impl tower::Service<HttpRequestFactory> for ThroughDedup {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), OpenAIError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let dedup = self.0.clone();
        Box::pin(async move {
            let request = factory.build().await?;
            // The engine sends to its own upstream: the request keeps its path and query,
            // relative to the engine's base URL when it lies under it.
            let url = request.url();
            let base = reqwest::Url::parse(dedup.upstream())
                .map(|b| b.path().trim_end_matches('/').to_owned())
                .unwrap_or_default();
            let path = url
                .path()
                .strip_prefix(&base)
                .filter(|rest| rest.starts_with('/'))
                .unwrap_or(url.path());
            let target = match url.query() {
                Some(query) => format!("{path}?{query}"),
                None => path.to_owned(),
            };
            let mut forwarded = http::Request::builder()
                .method(request.method().as_str())
                .uri(target);
            for (name, value) in request.headers() {
                forwarded = forwarded.header(name.as_str(), value.as_bytes());
            }
            let body = match request.body() {
                None => bytes::Bytes::new(),
                Some(body) => body
                    .as_bytes()
                    .map(bytes::Bytes::copy_from_slice)
                    .ok_or_else(
                        // A streamed body (a file upload) is not sent empty: refused.
                        || {
                            OpenAIError::InvalidArgument(
                                "a streamed request body cannot go through llm-dedup in process"
                                    .into(),
                            )
                        },
                    )?,
            };
            let forwarded = forwarded
                .body(http_body_util::Full::new(body))
                .map_err(|e| OpenAIError::InvalidArgument(e.to_string()))?;
            let answer = dedup
                .send(forwarded)
                .await
                .map_err(|e| OpenAIError::Boxed(Box::new(e)))?;
            let answer: http::Response<llm_dedup::AnswerBody> = answer.into();
            let (head, body) = answer.into_parts();
            let body = reqwest::Body::wrap_stream(body.into_data_stream());
            Ok(reqwest::Response::from(http::Response::from_parts(
                head, body,
            )))
        })
    }
}
