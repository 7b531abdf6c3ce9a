//! A streamed answer in flight, shared live by every request waiting on it.
//!
//! This module owns the buffer of events received so far and the signal that more arrived.
//! A subscriber first gets everything received so far in one chunk, then each new event as it
//! arrives; none waits for the end. The upstream side (the flight's task) pushes events and
//! finishes the stream; a subscriber going away affects nobody else.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http::{HeaderMap, StatusCode};
use tokio::sync::watch;

use crate::error::Error;

#[derive(Clone, Default)]
struct Progress {
    /// Events received so far.
    len: usize,
    /// How the stream ended, once it has.
    end: Option<Result<(), Error>>,
}

/// A stream being received from the upstream.
pub(crate) struct LiveStream {
    /// The upstream's status.
    pub status: StatusCode,
    /// The upstream's response headers (hop-by-hop ones removed).
    pub headers: HeaderMap,
    events: Mutex<Vec<Bytes>>,
    progress: watch::Sender<Progress>,
}

impl LiveStream {
    pub(crate) fn new(status: StatusCode, headers: HeaderMap) -> Arc<LiveStream> {
        Arc::new(LiveStream {
            status,
            headers,
            events: Mutex::new(Vec::new()),
            progress: watch::Sender::new(Progress::default()),
        })
    }

    fn events(&self) -> std::sync::MutexGuard<'_, Vec<Bytes>> {
        // Every critical section is a push or a copy: the buffer is consistent even after a
        // panic elsewhere.
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event and wakes the subscribers.
    pub(crate) fn push(&self, event: Bytes) {
        let len = {
            let mut events = self.events();
            events.push(event);
            events.len()
        };
        self.progress.send_modify(|p| p.len = len);
    }

    /// Ends the stream: subscribers finish after the last event, or get `Err` after it.
    pub(crate) fn finish(&self, result: Result<(), Error>) {
        self.progress.send_modify(|p| p.end = Some(result));
    }

    /// Everything received, as one body (for storing a complete stream).
    pub(crate) fn body(&self) -> Bytes {
        self.events().concat().into()
    }

    /// The stream from its first event: what has arrived at once, then each event live.
    pub(crate) fn subscribe(self: &Arc<Self>) -> BoxStream<'static, Result<Bytes, Error>> {
        let state = (self.clone(), self.progress.subscribe(), 0usize, false);
        futures_util::stream::unfold(state, |(live, mut rx, seen, ended)| async move {
            if ended {
                return None;
            }
            let (len, end) = {
                // The sender lives in `live`, which this stream holds: it cannot be dropped.
                let p = rx
                    .wait_for(|p| p.len > seen || p.end.is_some())
                    .await
                    .ok()?;
                (p.len, p.end.clone())
            };
            if len > seen {
                let chunk: Bytes = live.events()[seen..len].concat().into();
                return Some((Ok(chunk), (live, rx, len, false)));
            }
            match end {
                Some(Err(e)) => {
                    // Let the server flush what it was given before it sees the error (on
                    // an error it closes the connection at once, dropping buffered events).
                    tokio::task::yield_now().await;
                    Some((Err(e), (live, rx, seen, true)))
                }
                _ => None,
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use futures_util::TryStreamExt;

    #[tokio::test]
    async fn late_subscribers_get_the_past_at_once_then_follow_live() {
        let live = LiveStream::new(StatusCode::OK, HeaderMap::new());
        let early = live.subscribe();
        live.push(Bytes::from_static(b"a"));
        live.push(Bytes::from_static(b"b"));
        let mut late = live.subscribe();
        assert_eq!(
            late.next().await.and_then(Result::ok).as_deref(),
            Some(&b"ab"[..])
        );
        live.push(Bytes::from_static(b"c"));
        assert_eq!(
            late.next().await.and_then(Result::ok).as_deref(),
            Some(&b"c"[..])
        );
        live.finish(Ok(()));
        assert!(late.next().await.is_none());
        let all: Vec<Bytes> = early.try_collect().await.expect("complete");
        assert_eq!(all.concat(), b"abc");
        assert_eq!(live.body(), Bytes::from_static(b"abc"));
    }

    #[tokio::test]
    async fn a_failed_stream_ends_with_its_error_after_the_events() {
        let live = LiveStream::new(StatusCode::OK, HeaderMap::new());
        live.push(Bytes::from_static(b"a"));
        live.finish(Err(Error::new(ErrorKind::UpstreamUnreachable, "cut")));
        let items: Vec<Result<Bytes, Error>> = live.subscribe().collect().await;
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert_eq!(
            items[1].as_ref().err().map(Error::kind),
            Some(ErrorKind::UpstreamUnreachable)
        );
    }
}
