//! A streamed answer in flight, shared live by every request waiting on it.
//!
//! This module owns the buffer of events received so far and the signal that more arrived.
//! A subscriber first gets everything received so far in one chunk, then each new event as it
//! arrives; none waits for the end. The upstream side (the flight's task) pushes events and
//! finishes the stream; a subscriber going away affects nobody else.
//!
//! # Memory
//!
//! While a stream may still be stored, every event is kept (a late subscriber gets them all).
//! Once it outgrows what may be stored ([`LiveStream::stop_buffering`]), nobody new may
//! subscribe, and an event is dropped as soon as every subscriber has taken it. A subscriber
//! that falls so far behind that what it has not taken, before the newest event, exceeds the
//! bound is cut off (its stream ends with an error) rather than let the buffer grow. The bytes held by all streams
//! of an engine are counted in one gauge ([`HeldBytes`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http::{HeaderMap, StatusCode};
use tokio::sync::watch;

use crate::error::{Error, ErrorKind};

/// Bytes held by the stream buffers of one engine (the `llm_dedup_stream_buffer_bytes` gauge).
pub(crate) type HeldBytes = Arc<AtomicU64>;

#[derive(Clone, Default)]
struct Progress {
    /// Events received so far.
    len: usize,
    /// How the stream ended, once it has.
    end: Option<Result<(), Error>>,
}

/// A subscriber's place: the number of the next event it takes, or [`CUT`].
type Cursor = Arc<AtomicUsize>;

/// A cursor's value once its subscriber was cut off for falling too far behind.
const CUT: usize = usize::MAX;

/// The events kept, and where each subscriber is.
#[derive(Default)]
struct Buffer {
    /// Events kept; `events[0]` is event number `first`.
    events: VecDeque<Bytes>,
    first: usize,
    /// Bytes in `events`.
    bytes: usize,
    /// Set once the stream outgrew what may be stored: the most bytes kept for subscribers.
    bound: Option<usize>,
    cursors: Vec<Cursor>,
}

impl Buffer {
    /// Drops the events every subscriber has taken, cutting off the slowest subscribers while
    /// what is kept before the newest event exceeds the bound (a subscriber is never cut for
    /// not having taken an event that just arrived, however large). With no subscriber (none
    /// yet: the flight's waiters may be about to subscribe), the events are kept within the
    /// bound, the oldest dropped first. Returns the bytes dropped.
    fn trim(&mut self) -> usize {
        let Some(bound) = self.bound else {
            return 0;
        };
        let bound = bound.saturating_add(self.events.back().map_or(0, Bytes::len));
        // A subscriber that went away holds the only other reference to its cursor no more.
        self.cursors.retain(|c| Arc::strong_count(c) > 1);
        let mut dropped = 0;
        loop {
            let end = self.first + self.events.len();
            let slowest = self
                .cursors
                .iter()
                .map(|c| c.load(Ordering::Acquire))
                .filter(|at| *at != CUT)
                .min();
            let taken = slowest.map_or(self.first, |at| at.min(end));
            while self.first < taken {
                dropped += self.pop_oldest();
            }
            if self.bytes <= bound {
                return dropped;
            }
            match slowest {
                Some(slowest) => {
                    for cursor in &self.cursors {
                        if cursor.load(Ordering::Acquire) == slowest {
                            cursor.store(CUT, Ordering::Release);
                        }
                    }
                }
                None => dropped += self.pop_oldest(),
            }
        }
    }

    /// Drops the oldest event; returns its size.
    fn pop_oldest(&mut self) -> usize {
        let Some(event) = self.events.pop_front() else {
            return 0;
        };
        self.first += 1;
        self.bytes -= event.len();
        event.len()
    }
}

/// A stream being received from the upstream.
pub(crate) struct LiveStream {
    /// The upstream's status.
    pub status: StatusCode,
    /// The upstream's response headers (hop-by-hop ones removed).
    pub headers: HeaderMap,
    buffer: Mutex<Buffer>,
    progress: watch::Sender<Progress>,
    held: HeldBytes,
    /// Received from another replica of the fleet, not from the upstream.
    relayed: bool,
}

impl LiveStream {
    /// A stream received from the upstream, whose buffered bytes are counted in `held`.
    pub(crate) fn new(status: StatusCode, headers: HeaderMap, held: HeldBytes) -> Arc<LiveStream> {
        LiveStream::make(status, headers, held, false)
    }

    /// A stream another replica receives from the upstream and relays to this one.
    pub(crate) fn relayed(
        status: StatusCode,
        headers: HeaderMap,
        held: HeldBytes,
    ) -> Arc<LiveStream> {
        LiveStream::make(status, headers, held, true)
    }

    fn make(status: StatusCode, headers: HeaderMap, held: HeldBytes, relayed: bool) -> Arc<Self> {
        Arc::new(LiveStream {
            status,
            headers,
            buffer: Mutex::new(Buffer::default()),
            progress: watch::Sender::new(Progress::default()),
            held,
            relayed,
        })
    }

    /// Whether another replica receives this stream from the upstream (this one follows it).
    pub(crate) fn is_relayed(&self) -> bool {
        self.relayed
    }

    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        // Every critical section leaves the buffer consistent, even after a panic elsewhere.
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event and wakes the subscribers.
    pub(crate) fn push(&self, event: Bytes) {
        let len = {
            let mut buffer = self.buffer();
            let size = event.len();
            buffer.events.push_back(event);
            buffer.bytes += size;
            let dropped = buffer.trim();
            self.account(size, dropped);
            buffer.first + buffer.events.len()
        };
        self.progress.send_modify(|p| p.len = len);
    }

    /// Keeps at most `bound` bytes from now on: events are dropped once every subscriber has
    /// taken them, and nobody may subscribe any more.
    pub(crate) fn stop_buffering(&self, bound: usize) {
        let mut buffer = self.buffer();
        buffer.bound = Some(bound);
        let dropped = buffer.trim();
        self.account(0, dropped);
    }

    /// How many subscribers are still taking the stream (not gone, not cut off).
    pub(crate) fn subscribers(&self) -> usize {
        let buffer = self.buffer();
        buffer
            .cursors
            .iter()
            .filter(|c| Arc::strong_count(c) > 1 && c.load(Ordering::Acquire) != CUT)
            .count()
    }

    /// Bytes this stream holds now.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.buffer().bytes
    }

    fn account(&self, added: usize, dropped: usize) {
        self.held.fetch_add(added as u64, Ordering::Relaxed);
        self.held.fetch_sub(dropped as u64, Ordering::Relaxed);
    }

    /// Ends the stream: subscribers finish after the last event, or get `Err` after it.
    pub(crate) fn finish(&self, result: Result<(), Error>) {
        self.progress.send_modify(|p| p.end = Some(result));
    }

    /// Ends the stream with `error`, unless it has ended already (its flight died).
    pub(crate) fn fail_if_open(&self, error: Error) {
        self.progress.send_if_modified(|p| {
            let open = p.end.is_none();
            if open {
                p.end = Some(Err(error));
            }
            open
        });
    }

    /// Everything received, as one body (for storing a complete stream; a stream that
    /// stopped buffering is never stored).
    pub(crate) fn body(&self) -> Bytes {
        let buffer = self.buffer();
        let mut body = Vec::with_capacity(buffer.bytes);
        for event in &buffer.events {
            body.extend_from_slice(event);
        }
        body.into()
    }

    /// The stream from its first event: what has arrived at once, then each event live. Once
    /// the stream has dropped events, a new subscriber gets an error instead.
    pub(crate) fn subscribe(self: &Arc<Self>) -> BoxStream<'static, Result<Bytes, Error>> {
        let cursor = {
            let mut buffer = self.buffer();
            if buffer.first > 0 {
                let e = Error::new(
                    ErrorKind::Abandoned,
                    "the stream this request waited on grew past --max-stream before it could \
                     be joined; send the request again",
                );
                return futures_util::stream::once(async { Err(e) }).boxed();
            }
            let cursor = Cursor::default();
            buffer.cursors.push(cursor.clone());
            cursor
        };
        let state = (self.clone(), self.progress.subscribe(), cursor, false);
        futures_util::stream::unfold(state, |(live, mut rx, cursor, ended)| async move {
            if ended {
                return None;
            }
            let seen = cursor.load(Ordering::Acquire);
            if seen == CUT {
                return Some((Err(too_slow()), (live, rx, cursor, true)));
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
                let chunk = {
                    let buffer = live.buffer();
                    let seen = cursor.load(Ordering::Acquire);
                    if seen == CUT {
                        None
                    } else {
                        let from = seen - buffer.first;
                        let to = len - buffer.first;
                        let mut chunk = Vec::new();
                        for event in buffer.events.range(from..to) {
                            chunk.extend_from_slice(event);
                        }
                        cursor.store(len, Ordering::Release);
                        Some(Bytes::from(chunk))
                    }
                };
                return match chunk {
                    Some(chunk) => Some((Ok(chunk), (live, rx, cursor, false))),
                    None => Some((Err(too_slow()), (live, rx, cursor, true))),
                };
            }
            match end {
                Some(Err(e)) => {
                    // Let the server flush what it was given before it sees the error (on
                    // an error it closes the connection at once, dropping buffered events).
                    tokio::task::yield_now().await;
                    Some((Err(e), (live, rx, cursor, true)))
                }
                _ => None,
            }
        })
        .boxed()
    }
}

/// The error of a subscriber cut off for falling too far behind.
fn too_slow() -> Error {
    Error::new(
        ErrorKind::UpstreamUnreachable,
        "this client read the stream too slowly: more than --max-stream waited for it",
    )
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        let bytes = self.buffer().bytes;
        self.held.fetch_sub(bytes as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use futures_util::TryStreamExt;

    #[tokio::test]
    async fn late_subscribers_get_the_past_at_once_then_follow_live() {
        let live = LiveStream::new(StatusCode::OK, HeaderMap::new(), HeldBytes::default());
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
        let live = LiveStream::new(StatusCode::OK, HeaderMap::new(), HeldBytes::default());
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

    #[tokio::test]
    async fn past_its_bound_a_stream_keeps_only_what_a_subscriber_has_yet_to_take() {
        let held = HeldBytes::default();
        let live = LiveStream::new(StatusCode::OK, HeaderMap::new(), held.clone());
        let mut fast = live.subscribe();
        let mut slow = live.subscribe();
        live.push(Bytes::from(vec![b'a'; 10]));
        live.push(Bytes::from(vec![b'b'; 10]));
        assert_eq!(held.load(Ordering::Relaxed), 20);
        live.stop_buffering(25);
        assert_eq!(live.buffered(), 20, "nothing taken yet: everything kept");
        assert_eq!(
            fast.next().await.and_then(Result::ok).map(|c| c.len()),
            Some(20)
        );
        assert_eq!(
            slow.next().await.and_then(Result::ok).map(|c| c.len()),
            Some(20)
        );
        live.push(Bytes::from(vec![b'c'; 10]));
        assert_eq!(live.buffered(), 10, "taken by both: dropped");
        assert!(
            live.subscribe().next().await.is_some_and(|r| r.is_err()),
            "too late to join"
        );
        // The slow one stops reading; once more than the bound waits for it before the newest
        // event, it is cut off.
        assert_eq!(
            fast.next().await.and_then(Result::ok).map(|c| c.len()),
            Some(10)
        );
        live.push(Bytes::from(vec![b'd'; 10]));
        live.push(Bytes::from(vec![b'e'; 10]));
        assert_eq!(live.buffered(), 30, "c, d and e wait for the slow one");
        live.push(Bytes::from(vec![b'f'; 10]));
        assert!(live.buffered() <= 25 + 10, "{}", live.buffered());
        assert!(slow.next().await.is_some_and(|r| r.is_err()), "cut off");
        assert_eq!(
            fast.next().await.and_then(Result::ok).map(|c| c.len()),
            Some(30)
        );
        live.finish(Ok(()));
        assert!(fast.next().await.is_none());
        drop((fast, slow));
        drop(live);
        assert_eq!(
            held.load(Ordering::Relaxed),
            0,
            "the gauge comes back to zero"
        );
    }
}
