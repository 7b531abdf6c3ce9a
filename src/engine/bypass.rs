//! Requests that go around the cache: sent once, paced like everything else, streamed back.

use tokio::time::Instant;

use super::Engine;
use super::classify::Bypassed;
use super::count::{Saved, route_name};
use super::verified::Verifies;
use crate::answer::{Answer, AnswerBody, CacheStatus};
use crate::error::Error;
use crate::headers::CACHE_HEADER;
use crate::upstream;

impl Engine {
    /// Sends a request that the cache does not answer, and streams its answer back.
    pub(super) async fn pass_through(&self, request: Bypassed) -> Result<Answer, Error> {
        let Bypassed {
            method,
            path_and_query,
            headers,
            body,
            partition,
            route,
            model,
            reason,
            via,
        } = request;
        tracing::debug!(path = %path_and_query.split('?').next().unwrap_or(""), reason = reason.as_str(), "bypassing the cache");
        // Paced like everything else, but sent once: its body may be a stream that cannot be
        // sent again.
        let deadline = Instant::now() + self.governor.settings().max_queue_wait;
        let permit = self.governor.acquire(&partition, 0, deadline).await?;
        self.fleet_budget(&partition, deadline).await?;
        let sent = self
            .upstream
            .send(&method, &path_and_query, &headers, body, via.as_ref())
            .await;
        if let Ok(response) = &sent {
            // Only a call on a cacheable route proves a credential: a health probe or a CORS
            // preflight is answered to anyone.
            let verifies = if route.is_some() {
                Verifies::Yes
            } else {
                Verifies::No
            };
            self.learn_from(&partition, response, verifies).await;
        }
        drop(permit);
        let status = sent.as_ref().ok().map(|r| r.status());
        self.upstream_called(route, model.as_deref(), status);
        let response = sent?;
        let status = response.status();
        if status.is_client_error() || status.is_server_error() {
            tracing::info!(
                route = route_name(route),
                status = status.as_u16(),
                "upstream refused the request; passed on (not cacheable, not retried)"
            );
        }
        self.record(
            route,
            model.as_deref(),
            CacheStatus::Bypass,
            Saved::default(),
        );
        let mut headers = upstream::response_headers(response.headers());
        headers.insert(CACHE_HEADER, CacheStatus::Bypass.header_value());
        let body = self.upstream.body_stream(response);
        Ok(Answer {
            status,
            headers,
            body: AnswerBody::Stream(body),
            cache: CacheStatus::Bypass,
            key: None,
        })
    }
}
