//! The library's error type: what went wrong, and whose fault it was.
//!
//! One opaque [`Error`] with an [`ErrorKind`] the caller can match on to decide what to do
//! (fix the request, retry later, look at the cache). The proxy turns kinds into HTTP statuses
//! in one place (`server.rs`); this module knows nothing of HTTP answers.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed (bad JSON, bad control header). The caller must fix it.
    InvalidRequest,
    /// The request body is larger than the configured limit.
    BodyTooLarge,
    /// `only-if-cached` was asked and the cache has no answer.
    NotCached,
    /// The upstream could not be reached or dropped the connection.
    UpstreamUnreachable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The upstream answered 2xx with a body that is not the answer its API describes.
    UpstreamInvalid,
    /// The flight this request waited on ended without an outcome.
    Abandoned,
    /// The request waited in the queue for the upstream's budget longer than allowed.
    QueueFull,
    /// The cache itself failed (database, configuration).
    Cache,
}

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The request: retrying it unchanged will fail again.
    Request,
    /// The upstream provider or the network to it: retrying later may succeed.
    Upstream,
    /// llm-dedup's own cache or configuration.
    Cache,
}

/// An error from the engine. Cheap to clone, so one failure can be handed to every request
/// that waited on the same upstream call.
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Arc<dyn StdError + Send + Sync>>,
    retry_after: Option<std::time::Duration>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
            retry_after: None,
        }
    }

    /// The same error, telling the caller to come back after `wait`.
    pub(crate) fn with_retry_after(mut self, wait: std::time::Duration) -> Error {
        self.retry_after = Some(wait);
        self
    }

    /// How long to wait before sending the request again, when known.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    pub(crate) fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Error {
        Error {
            kind,
            message: message.into(),
            source: Some(Arc::new(source)),
            retry_after: None,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whose fault it is.
    pub fn origin(&self) -> Origin {
        match self.kind {
            ErrorKind::InvalidRequest | ErrorKind::BodyTooLarge | ErrorKind::NotCached => {
                Origin::Request
            }
            ErrorKind::UpstreamUnreachable
            | ErrorKind::UpstreamTimeout
            | ErrorKind::UpstreamInvalid
            | ErrorKind::Abandoned
            | ErrorKind::QueueFull => Origin::Upstream,
            ErrorKind::Cache => Origin::Cache,
        }
    }

    /// Whether sending the same request again later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.origin() == Origin::Upstream
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cause is reached through `source()`, not repeated here.
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source.as_ref().map(|s| s.to_string()))
            .finish()
    }
}

impl Error {
    /// This error and its causes, joined by `: `, each cause named once.
    pub fn chain(&self) -> String {
        describe_chain(self)
    }
}

/// Joins an error and its causes with `: `, leaving out a cause that only repeats what is
/// already said (many libraries repeat their cause in their own message, or the reverse).
pub fn describe_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) && !text.contains(&last) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        next = cause.source();
    }
    out
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_names_each_cause_once() {
        let io = std::io::Error::other("connection refused");
        let e = Error::with_source(
            ErrorKind::UpstreamUnreachable,
            "upstream x cannot be reached",
            io,
        );
        assert_eq!(e.to_string(), "upstream x cannot be reached");
        assert_eq!(
            e.chain(),
            "upstream x cannot be reached: connection refused"
        );
        let e = Error::with_source(
            ErrorKind::Cache,
            "disk: connection refused",
            std::io::Error::other("connection refused"),
        );
        assert_eq!(e.chain(), "disk: connection refused");
    }
}
