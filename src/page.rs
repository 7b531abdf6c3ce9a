//! The live page, `GET /_llm-dedup/`: one self-contained HTML file (`assets/page.html`, its
//! CSS and script inline) built into the binary. It draws `/_llm-dedup/series` and shows the
//! figures of `/_llm-dedup/stats`, refreshing itself every 5 seconds; its
//! Content-Security-Policy lets it talk to this proxy and nothing else.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::series::MINUTES;

const PAGE: &str = include_str!("../assets/page.html");

/// Inline script and style only, requests to this origin only, no frames, no forms.
const POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                      connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                      form-action 'none'; frame-ancestors 'none'";

/// The page.
pub(crate) async fn page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(POLICY),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        PAGE,
    )
        .into_response()
}

/// `/_llm-dedup/series?minutes=N`.
#[derive(Debug, Deserialize)]
pub(crate) struct SeriesQuery {
    minutes: Option<String>,
}

impl SeriesQuery {
    /// The minutes asked for: 1 to a day, a day when not given.
    pub(crate) fn minutes(&self) -> Result<usize, String> {
        match self.minutes.as_deref() {
            None => Ok(MINUTES),
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=MINUTES).contains(&n) => Ok(n),
                _ => Err(format!(
                    "minutes must be a whole number from 1 to {MINUTES}, not {text:?}"
                )),
            },
        }
    }
}
