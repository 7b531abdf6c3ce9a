//! A `reqwest-middleware` adapter: an existing `reqwest` client gains the cache with one
//! `.with(..)`.
//!
//! This module owns only the translation between `reqwest` requests and responses and the
//! engine's `http` types; every caching decision is the engine's. Requests the engine cannot
//! take (another host than its upstream, a streamed request body) go on down the chain
//! untouched.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use llm_dedup::{Dedup, middleware::DedupMiddleware};
//! use reqwest_middleware::ClientBuilder;
//!
//! let engine = Dedup::builder().upstream("https://api.openai.com").build()?;
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(DedupMiddleware::new(engine.clone()))
//!     .build();
//! let response = client
//!     .post("https://api.openai.com/v1/embeddings")
//!     .bearer_auth("sk-...")
//!     .header("content-type", "application/json")
//!     .body(r#"{"model": "text-embedding-3-small", "input": "hello"}"#)
//!     .send()
//!     .await?;
//! println!("{:?}", response.headers().get("llm-dedup-cache")); // "miss", then "hit"
//! engine.close().await?;
//! # Ok(()) }
//! ```
//!
//! [`DedupMiddleware::with_client`] gives the engine the client the chain was built on: the
//! engine then makes the upstream calls of the requests it handles with that client, so its
//! default headers (an API key set there), proxy, TLS settings and timeouts apply. Without
//! it ([`DedupMiddleware::new`]) the engine uses its own pooled client. Either way,
//! middlewares placed after this one in the chain do not see requests it handles, and a
//! response built by the engine reports no URL (`Response::url` is a placeholder): reqwest
//! offers no way to set it.
//!
//! llm-dedup builds reqwest without a crypto provider of its own (`rustls-no-provider`; its
//! engine configures rustls on ring for itself). A client the program builds needs one:
//! reqwest's default `rustls` feature brings it, or the program installs one at start-up
//! (`rustls::crypto::ring::default_provider().install_default()`).

use bytes::Bytes;
use http::Extensions;
use http_body_util::Full;
use reqwest_middleware::{Middleware, Next, Result};

use crate::answer::AnswerBody;
use crate::engine::Dedup;
use crate::upstream::{CallerClient, CallerTransport};

/// Sends requests for the engine's upstream through the engine (cache, coalescing); passes
/// everything else on.
#[derive(Clone)]
pub struct DedupMiddleware {
    engine: Dedup,
    client: Option<CallerClient>,
}

impl DedupMiddleware {
    /// A middleware that uses `engine`. Requests to URLs under the engine's upstream base URL
    /// go through the engine, which calls the upstream with its own client; others continue
    /// down the chain.
    pub fn new(engine: Dedup) -> DedupMiddleware {
        DedupMiddleware {
            engine,
            client: None,
        }
    }

    /// As [`DedupMiddleware::new`], the engine calling the upstream with `client` (the one the
    /// chain is built on): its default headers, proxy, TLS settings and timeouts apply. The
    /// cache keeps the answers of this middleware's requests apart from every other
    /// caller's (a credential set as a default header never reaches the engine, so the
    /// engine cannot tell two such clients apart otherwise); its clones share them.
    pub fn with_client(engine: Dedup, client: reqwest::Client) -> DedupMiddleware {
        DedupMiddleware {
            engine,
            client: Some(CallerClient {
                client: CallerTransport::Client(client),
                id: rand::random(),
            }),
        }
    }
}

#[async_trait::async_trait]
impl Middleware for DedupMiddleware {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> Result<reqwest::Response> {
        let Some(path_and_query) = self.engine.relative_to_upstream(req.url()) else {
            return next.run(req, extensions).await;
        };
        // A streamed request body cannot be read without consuming it: pass it on.
        let body = match req.body() {
            None => Bytes::new(),
            Some(body) => match body.as_bytes() {
                Some(bytes) => Bytes::copy_from_slice(bytes),
                None => return next.run(req, extensions).await,
            },
        };
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = req.method().clone();
        *request.uri_mut() = path_and_query
            .parse()
            .map_err(reqwest_middleware::Error::middleware)?;
        *request.headers_mut() = req.headers().clone();
        if let Some(client) = &self.client {
            request.extensions_mut().insert(client.clone());
        }
        let answer = self
            .engine
            .send(request)
            .await
            .map_err(reqwest_middleware::Error::middleware)?;
        let body = match answer.body {
            AnswerBody::Full(bytes) => reqwest::Body::from(bytes),
            AnswerBody::Stream(stream) => reqwest::Body::wrap_stream(stream),
        };
        let mut response = http::Response::new(body);
        *response.status_mut() = answer.status;
        *response.headers_mut() = answer.headers;
        Ok(reqwest::Response::from(response))
    }
}
