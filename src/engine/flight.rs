//! Phase 4, flight: a request that memory could not answer joins an identical request in
//! flight, or leads a flight whose task looks at the disk and then calls the upstream.
//!
//! The leader's work runs in a task of its own (tracked for `close`), so the request that
//! started it can hang up without cancelling what others wait on; every request, the
//! leader's included, only waits on the flight's outcome.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use http::HeaderMap;
use serde_json::Value;

use super::Engine;
use super::classify::Outbound;
use super::govern::Upstreamed;
use super::lookup::young_enough;
use crate::answer::{Answer, CacheStatus, Refusal};
use crate::controls::CacheControls;
use crate::entry::{Billing, EntryMeta, StoredAnswer};
use crate::error::{Error, ErrorKind};
use crate::fleet::{Ending, Fleet, Followed, Relayed, Turn};
use crate::headers::NAMESPACE_HEADER;
use crate::inflight::{Flight, InFlight, Role};
use crate::key::{CacheKey, Partition};
use crate::live::LiveStream;
use crate::sse::{Completion, EventSplitter, Verdict};
use crate::upstream;

/// What a flight resolved to; every waiter gets a clone.
#[derive(Clone)]
pub(super) enum FlightOutcome {
    /// A 2xx answer, stored; `fresh_headers` are the upstream's own when it came from upstream.
    Stored {
        entry: Arc<StoredAnswer>,
        fresh_headers: Option<Arc<HeaderMap>>,
    },
    /// A complete non-2xx answer, passed on and never stored.
    Refused(Arc<Refusal>),
    /// A 2xx streamed answer, shared live while it arrives (stored once complete).
    Live(Arc<LiveStream>),
    /// No answer at all.
    Failed(Error),
}

impl FlightOutcome {
    /// Whether a caller of another credential partition may have this outcome: a 2xx answer,
    /// yes; an error answer belongs to the caller it answered (its text may name that caller's
    /// key, its quota, its organization), and so does a failure (a full queue is one
    /// partition's budget).
    fn shareable(&self) -> bool {
        matches!(self, FlightOutcome::Stored { .. } | FlightOutcome::Live(_))
    }
}

/// What a flight resolves to: its outcome, and the credential partition of the request that
/// led it (with a shared cache, followers may be of other partitions).
#[derive(Clone)]
pub(super) struct Led {
    pub by: Partition,
    pub outcome: FlightOutcome,
}

/// Whether a fetch may take the answer of another replica's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fresh {
    /// Yes: any answer to the request will do.
    Shared,
    /// No: the caller needs an answer of its own (a credential not verified yet, an error
    /// answer that was another caller's, a stricter `max-age`).
    Own,
    /// No, and the answer replaces what every replica holds (`no-cache`): announced.
    Replace,
}

/// The leader's side of a flight.
pub(super) type LeadFlight = Flight<CacheKey, Led>;

/// How many flights a request of another partition than their leaders' joins, each ending in
/// an answer it may not have, before it makes a call of its own.
const MAX_FOREIGN_FLIGHTS: u32 = 2;

impl Engine {
    /// The path of a request that memory could not answer: disk, flight, upstream.
    pub(super) async fn beyond_memory(
        self: &Arc<Self>,
        out: Outbound,
        meta: EntryMeta,
        controls: &CacheControls,
    ) -> Result<Answer, Error> {
        let key = meta.key;
        // With a shared cache, a credential the upstream has not accepted yet is answered by
        // a call of its own: no stored answer, no flight of another caller.
        let may_share = self.may_share(&out.partition);
        if controls.only_if_cached {
            if !controls.no_cache && may_share {
                if let Some(entry) = self.lookup_disk(&key, controls.max_age).await {
                    return Ok(self.hit(&entry, SystemTime::now()));
                }
                if let Some(answer) = self.joined(&out, &meta, controls).await {
                    return answer;
                }
            }
            return Err(Error::new(
                ErrorKind::NotCached,
                format!("no cached answer for key {key} (only-if-cached)"),
            ));
        }
        if controls.no_cache || !may_share {
            // Its own upstream call, whose answer replaces the stored one; a refresh the
            // client asked for is announced to the other replicas of a fleet.
            let fresh = if controls.no_cache {
                Fresh::Replace
            } else {
                Fresh::Own
            };
            return self.refresh(out, meta, fresh).await;
        }
        let mut foreign = 0;
        loop {
            let (waiter, role) = match self.flights.join(&key) {
                Role::Leader(flight) => {
                    let waiter = flight.waiter();
                    let engine = self.clone();
                    let (out, meta, max_age) = (out.clone(), meta.clone(), controls.max_age);
                    self.tasks.spawn(async move {
                        let work = engine.resolve(&out, &meta, max_age, &flight);
                        let outcome = engine.guarded(&flight, &meta, work).await;
                        flight.complete(Led {
                            by: out.partition,
                            outcome,
                        });
                    });
                    (waiter, CacheStatus::Miss)
                }
                Role::Follower(waiter) => (waiter, CacheStatus::Coalesced),
            };
            let led = waiter.wait().await.map_err(|_| abandoned())?;
            let own = led.by == out.partition;
            if !own && !led.outcome.shareable() {
                // Not this caller's answer: try the flight again (callers of this partition
                // then share one call), or, after that, make a call of its own.
                foreign += 1;
                if foreign < MAX_FOREIGN_FLIGHTS {
                    continue;
                }
                return self.refresh(out, meta, Fresh::Own).await;
            }
            if let FlightOutcome::Stored {
                entry,
                fresh_headers: None,
            } = &led.outcome
            {
                // The flight found the answer in the cache; a follower with a stricter max-age
                // than the leader's may need a fresher one.
                if !young_enough(entry, controls.max_age) {
                    return self.refresh(out, meta, Fresh::Own).await;
                }
            }
            return self.render(led.outcome, role, &meta, own);
        }
    }

    /// The answer of an identical request already on its way from the upstream, for a caller
    /// that must not start a call (`only-if-cached`): as good as a stored one, so the caller
    /// joins the flight (another replica that followed a stream through Redis reads the rest
    /// of it this way if Redis goes away). `None` if no flight is in progress, or if it ends in
    /// an answer this caller may not have. Not a stream this replica only follows: the
    /// request may come from a replica that follows it too, or from this one, and each would
    /// wait on the other.
    async fn joined(
        &self,
        out: &Outbound,
        meta: &EntryMeta,
        controls: &CacheControls,
    ) -> Option<Result<Answer, Error>> {
        let led = self.flights.in_progress(&meta.key)?.wait().await.ok()?;
        let usable = match &led.outcome {
            FlightOutcome::Stored { entry, .. } => young_enough(entry, controls.max_age),
            FlightOutcome::Live(live) => !live.is_relayed(),
            FlightOutcome::Refused(_) | FlightOutcome::Failed(_) => false,
        };
        let own = led.by == out.partition;
        usable.then(|| self.render(led.outcome, CacheStatus::Coalesced, meta, own))
    }

    /// Fetches a fresh answer outside the in-flight table and stores it (`fresh` is `Own` or
    /// `Replace`).
    async fn refresh(
        self: &Arc<Self>,
        out: Outbound,
        meta: EntryMeta,
        fresh: Fresh,
    ) -> Result<Answer, Error> {
        // A flight of its own, outside the shared table: nobody joins a refresh.
        let flight = InFlight::detached(meta.key);
        let waiter = flight.waiter();
        let engine = self.clone();
        let task_meta = meta.clone();
        self.tasks.spawn(async move {
            let work = engine.fetch(&out, &task_meta, &flight, fresh);
            let outcome = engine.guarded(&flight, &task_meta, work).await;
            flight.complete(Led {
                by: out.partition,
                outcome,
            });
        });
        let led = waiter.wait().await.map_err(|_| abandoned())?;
        self.render(led.outcome, CacheStatus::Miss, &meta, true)
    }

    /// Runs a flight's `work` and gives its outcome. If the work panics, or the engine is shut
    /// down past its deadline while it runs, the flight still gets one: every waiter gets a clear error (never a second upstream call), a stream
    /// already shared ends with that error after the events received so far, and the room it
    /// reserved in memory is given back. Nothing of it is stored.
    async fn guarded(
        &self,
        flight: &LeadFlight,
        meta: &EntryMeta,
        work: impl Future<Output = FlightOutcome>,
    ) -> FlightOutcome {
        let work = AssertUnwindSafe(work).catch_unwind();
        let error = tokio::select! {
            outcome = work => match outcome {
                Ok(outcome) => return outcome,
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(key = %meta.key, panic = why, "a flight failed inside llm-dedup; its waiters get an error");
                    Error::new(
                        ErrorKind::Abandoned,
                        "the upstream call for this request failed inside llm-dedup; nothing \
                         was stored",
                    )
                }
            },
            () = self.stopping.cancelled() => Error::new(
                ErrorKind::Abandoned,
                "the proxy is shutting down and its drain deadline passed before the upstream \
                 answered; nothing was stored",
            ),
        };
        if let Some(Led {
            outcome: FlightOutcome::Live(live),
            ..
        }) = flight.published()
        {
            live.fail_if_open(error.clone());
            self.memory.release(&meta.key).await;
        }
        FlightOutcome::Failed(error)
    }

    /// Resolves a flight: the cache again (closing the race with a flight that just ended),
    /// then the upstream.
    async fn resolve(
        &self,
        out: &Outbound,
        meta: &EntryMeta,
        max_age: Option<Duration>,
        flight: &LeadFlight,
    ) -> FlightOutcome {
        let cached = match self.lookup_memory(&meta.key, max_age).await {
            Some(entry) => Some(entry),
            None => self.lookup_disk(&meta.key, max_age).await,
        };
        match cached {
            Some(entry) => FlightOutcome::Stored {
                entry,
                fresh_headers: None,
            },
            None => self.fetch(out, meta, flight, Fresh::Shared).await,
        }
    }

    /// Calls the upstream for `flight`, taking turns with the other replicas of a fleet (the
    /// answer one of them stores, or an error answer of the same partition, is this flight's
    /// too), unless the caller needs an answer of its own (`Fresh::Own`, `Fresh::Replace`).
    async fn fetch(
        &self,
        out: &Outbound,
        meta: &EntryMeta,
        flight: &LeadFlight,
        fresh: Fresh,
    ) -> FlightOutcome {
        let Some(fleet) = &self.fleet else {
            return self.fetch_upstream(out, meta, flight, None).await;
        };
        if fresh != Fresh::Shared {
            let outcome = self.fetch_upstream(out, meta, flight, None).await;
            let stored = matches!(
                outcome,
                FlightOutcome::Stored { .. } | FlightOutcome::Live(_)
            );
            if stored && fresh == Fresh::Replace {
                fleet.replaced(&meta.key);
            }
            return outcome;
        }
        // Another replica's call is waited on no longer than a call of this one's would take.
        let patience = self.upstream.timeouts().first_byte;
        let lease = match fleet.take_turn(&meta.key, &out.partition, patience).await {
            Turn::Lead(lease) => Some(lease),
            Turn::Alone => None,
            Turn::Found(entry) => {
                let entry = Arc::new(entry);
                self.memory.insert(entry.clone()).await;
                return FlightOutcome::Stored {
                    entry,
                    fresh_headers: None,
                };
            }
            Turn::Refused(refusal) => return FlightOutcome::Refused(Arc::new(refusal)),
            Turn::Live(followed) => return self.follow(followed, out, meta, flight).await,
        };
        let relaying = lease.as_ref().map(|_| fleet);
        let outcome = self.fetch_upstream(out, meta, flight, relaying).await;
        if let Some(lease) = lease {
            if let FlightOutcome::Refused(refusal) = &outcome {
                fleet
                    .share_refusal(&meta.key, &out.partition, refusal)
                    .await;
            }
            lease.finish().await;
        }
        outcome
    }

    /// Calls the upstream and stores a complete 2xx answer. A streamed answer is published
    /// on `flight` as soon as it starts, and the flight stays open until it ends, so that
    /// identical requests arriving meanwhile join it live.
    async fn fetch_upstream(
        &self,
        out: &Outbound,
        meta: &EntryMeta,
        flight: &LeadFlight,
        relaying: Option<&Fleet>,
    ) -> FlightOutcome {
        let response = match self.send_governed(out, meta).await {
            Ok(Upstreamed::Success(r)) => r,
            Ok(Upstreamed::Refused(refusal)) => {
                tracing::debug!(key = %meta.key, status = refusal.status.as_u16(), "upstream answer not stored");
                return FlightOutcome::Refused(Arc::new(refusal));
            }
            Err(e) => return FlightOutcome::Failed(e),
        };
        #[cfg(test)]
        self.faults.trip(super::tests::Fault::AfterUpstream);
        let status = response.status();
        let headers = upstream::response_headers(response.headers());
        if status.is_success() && is_event_stream(&headers) {
            let live = LiveStream::new(status, headers, self.stream_bytes.clone());
            flight.publish(Led {
                by: out.partition,
                outcome: FlightOutcome::Live(live.clone()),
            });
            // Shared live with the followers on other replicas, too.
            let relay = relaying.map(|fleet| {
                fleet
                    .relay(&meta.key, status, &live.headers)
                    .bounded(self.max_stream_bytes)
            });
            self.pump(response, &live, meta, out, flight, relay).await;
            return FlightOutcome::Live(live);
        }
        // Read within the bound of what may be stored: a larger answer is passed on to its
        // waiters as it comes, never held whole.
        let body = match self.read_within(response, self.max_stream_bytes).await {
            Ok(Read::Whole(body)) => body,
            Ok(Read::Larger(head, rest)) if status.is_success() => {
                return self
                    .pass_on_larger(status, headers, head, rest, out, meta, flight)
                    .await;
            }
            Ok(Read::Larger(..)) => {
                return FlightOutcome::Failed(Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!(
                        "the upstream's answer ({status}) is larger than --max-stream ({} bytes)",
                        self.max_stream_bytes
                    ),
                ));
            }
            Err(e) => return FlightOutcome::Failed(e),
        };
        if !status.is_success() {
            return FlightOutcome::Refused(Arc::new(Refusal {
                status,
                headers,
                body,
            }));
        }
        // Only a complete JSON document is stored: a body cut short where the upstream closed
        // the connection (nothing else delimited it) is passed on as it came.
        let Ok(answer) = serde_json::from_slice::<Value>(&body) else {
            tracing::info!(key = %meta.key, bytes = body.len(), "upstream answer is not one whole JSON document; passed on, not stored");
            self.governor.settle(&out.partition, out.estimate, None);
            return FlightOutcome::Refused(Arc::new(Refusal {
                status,
                headers,
                body,
            }));
        };
        let billing = Billing::of_answer(&answer);
        let tokens = billing.usage.total_tokens;
        // A copy: `body` is a slice of the buffer the answer was read into.
        let exact = Bytes::copy_from_slice(&body);
        let entry = Arc::new(StoredAnswer::new(meta, status, &headers, exact, billing));
        self.governor.settle(&out.partition, out.estimate, tokens);
        self.store(entry.clone()).await;
        FlightOutcome::Stored {
            entry,
            fresh_headers: Some(Arc::new(headers)),
        }
    }
}

/// An answer's body, read within `--max-stream`.
pub(super) enum Read {
    /// All of it.
    Whole(Bytes),
    /// More than the bound: what was read, and the answer to read the rest from.
    Larger(Bytes, reqwest::Response),
}

/// How long the waiters of an answer too large to keep have to take it before the bytes they
/// have not read yet may be dropped.
const HANDOVER: Duration = Duration::from_secs(1);

impl Engine {
    /// Reads `response`'s body, unless it is larger than `bound` bytes.
    pub(super) async fn read_within(
        &self,
        mut response: reqwest::Response,
        bound: usize,
    ) -> Result<Read, Error> {
        let expected = response.content_length().unwrap_or(0);
        let mut body =
            bytes::BytesMut::with_capacity(usize::try_from(expected).unwrap_or(0).min(bound));
        while let Some(chunk) = self.upstream.next_chunk(&mut response).await? {
            body.extend_from_slice(&chunk);
            if body.len() > bound {
                return Ok(Read::Larger(body.freeze(), response));
            }
        }
        Ok(Read::Whole(body.freeze()))
    }

    /// Passes an answer larger than `--max-stream` on to the waiters of `flight` as it
    /// arrives, like a stream that outgrew the bound: nobody joins it any more, each byte is
    /// dropped once every waiter took it, and nothing is stored.
    #[allow(clippy::too_many_arguments)]
    async fn pass_on_larger(
        &self,
        status: http::StatusCode,
        headers: HeaderMap,
        head: Bytes,
        mut rest: reqwest::Response,
        out: &Outbound,
        meta: &EntryMeta,
        flight: &LeadFlight,
    ) -> FlightOutcome {
        tracing::info!(key = %meta.key, "upstream answer larger than --max-stream; passed on, not stored");
        self.governor.settle(&out.partition, out.estimate, None);
        let live = LiveStream::new(status, headers, self.stream_bytes.clone());
        live.push(head);
        let waiting = flight.waiting();
        flight.publish(Led {
            by: out.partition,
            outcome: FlightOutcome::Live(live.clone()),
        });
        flight.leave();
        // Those waiting subscribe as they take it: until they have (or a moment has passed),
        // nothing is read on, so nothing is dropped before them.
        let _ = tokio::time::timeout(HANDOVER, async {
            while live.subscribers() < waiting {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        live.stop_buffering(self.max_stream_bytes);
        let result = loop {
            // Nobody takes it any more: not read on.
            if live.subscribers() == 0 {
                break Ok(());
            }
            match self.upstream.next_chunk(&mut rest).await {
                Ok(Some(chunk)) => live.push(chunk),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        live.finish(result);
        FlightOutcome::Live(live)
    }

    /// Follows a stream another replica receives from the upstream, shared live with this
    /// flight's waiters as a stream of its own would be. Nothing is stored here: the leader
    /// stores it in the fleet's tier when it completes.
    ///
    /// If Redis goes away mid-stream, the rest exists only on the leader replica: when it
    /// named where it can be reached, the rest is read from there ([`Engine::read_rest_from`]).
    async fn follow(
        &self,
        mut followed: Followed,
        out: &Outbound,
        meta: &EntryMeta,
        flight: &LeadFlight,
    ) -> FlightOutcome {
        let live = LiveStream::relayed(
            followed.status,
            std::mem::take(&mut followed.headers),
            self.stream_bytes.clone(),
        );
        flight.publish(Led {
            by: out.partition,
            outcome: FlightOutcome::Live(live.clone()),
        });
        let mut passed = Passed::new(&live, flight, self.max_stream_bytes, meta.route);
        let result = loop {
            match followed.next().await {
                Relayed::Events(events) => events.into_iter().for_each(|e| passed.push(e)),
                Relayed::End(Ending::Complete) => break Ok(()),
                Relayed::End(Ending::Failed) => {
                    break Err(Error::new(
                        ErrorKind::UpstreamUnreachable,
                        "the upstream's stream failed on the replica that received it",
                    ));
                }
                Relayed::End(Ending::Cut) => {
                    break Err(Error::new(
                        ErrorKind::UpstreamUnreachable,
                        "the stream shared by another replica was longer than --max-stream",
                    ));
                }
                Relayed::End(Ending::Lost) => {
                    break match followed.peer.take() {
                        Some(peer) => self.read_rest_from(&peer, out, meta, &mut passed).await,
                        None => Err(Error::new(
                            ErrorKind::UpstreamUnreachable,
                            "the stream shared by another replica could not be followed to its \
                             end: Redis went away, and that replica named no address to read the \
                             rest from (--advertise)",
                        )),
                    };
                }
            }
        };
        live.finish(result);
        FlightOutcome::Live(live)
    }

    /// Reads the rest of a followed stream from the replica that receives it, at `peer`: the
    /// client's request again, with `Cache-Control: only-if-cached`, joins that replica's
    /// flight (or finds the answer it stored) without ever making an upstream call. Its events
    /// start from the first; those already passed on are skipped, after checking they are the
    /// same (a different answer is never spliced on).
    async fn read_rest_from(
        &self,
        peer: &str,
        out: &Outbound,
        meta: &EntryMeta,
        passed: &mut Passed<'_>,
    ) -> Result<(), Error> {
        let lost = |what: &str| {
            Error::new(
                ErrorKind::UpstreamUnreachable,
                format!("Redis went away mid-stream, and the replica receiving the stream {what}"),
            )
        };
        let mut headers = out.headers.clone();
        headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("only-if-cached"),
        );
        if !meta.namespace.is_empty() {
            let namespace = http::HeaderValue::from_str(&meta.namespace)
                .map_err(|_| lost("cannot be asked for this namespace"))?;
            headers.insert(NAMESPACE_HEADER, namespace);
        }
        if let Some(credential) = &out.proxy_credential {
            headers.insert(http::header::PROXY_AUTHORIZATION, credential.clone());
        }
        let url = format!("{peer}{}", out.path_and_query);
        let sent = self
            .upstream
            .send_to_replica(&out.method, &url, headers, out.body.clone());
        let response = match tokio::time::timeout(PEER_TIMEOUT, sent).await {
            Ok(Ok(response)) => response,
            Ok(Err(_)) => return Err(lost(&format!("cannot be reached at {peer}"))),
            Err(_) => return Err(lost(&format!("did not answer in time at {peer}"))),
        };
        let status = response.status();
        if !status.is_success() || !is_event_stream(response.headers()) {
            return Err(lost(&format!("no longer has it ({status})")));
        }
        tracing::info!(key = %meta.key, %peer, "Redis went away mid-stream: reading the rest from the replica receiving it");
        let mut replay = Replayed::new(passed.count, passed.digest.clone());
        let mut split = EventSplitter::bounded(self.max_stream_bytes);
        let mut body = self.upstream.body_stream(response);
        let mut take = |events: Vec<Bytes>| -> Result<(), Error> {
            for event in events {
                let new = replay
                    .check(event)
                    .map_err(|()| lost("has another answer"))?;
                if let Some(new) = new {
                    passed.push(new);
                }
            }
            Ok(())
        };
        loop {
            match body.next().await {
                Some(Ok(chunk)) => take(split.push(&chunk))?,
                Some(Err(_)) => return Err(lost("stopped sending it")),
                None => break,
            }
        }
        take(split.rest().into_iter().collect())?;
        if passed.completion.verdict() == Verdict::Complete {
            Ok(())
        } else {
            Err(lost("ended it before its end"))
        }
    }
}

/// How long the replica receiving a stream may take to start answering for the rest of it.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// The events of a followed stream passed on so far: counted, digested (to check a replay
/// from its start against them), observed for the stream's completion, and bounded by
/// `--max-stream` like a stream of this replica's own.
struct Passed<'a> {
    live: &'a LiveStream,
    flight: &'a LeadFlight,
    max: usize,
    size: usize,
    count: usize,
    digest: blake3::Hasher,
    completion: Completion,
}

impl<'a> Passed<'a> {
    fn new(
        live: &'a LiveStream,
        flight: &'a LeadFlight,
        max: usize,
        route: crate::route::Route,
    ) -> Passed<'a> {
        Passed {
            live,
            flight,
            max,
            size: 0,
            count: 0,
            digest: blake3::Hasher::new(),
            completion: Completion::new(route),
        }
    }

    fn push(&mut self, event: Bytes) {
        let was_within = self.size <= self.max;
        self.size += event.len();
        if was_within && self.size > self.max {
            // Passed on to its waiters, no longer kept, no longer joined.
            self.live.stop_buffering(self.max);
            self.flight.leave();
        }
        self.count += 1;
        digest_event(&mut self.digest, &event);
        self.completion.observe(&event);
        self.live.push(event);
    }
}

/// A replay of a stream from its first event, checked against the `count` events already
/// passed on (whose digest is `passed`): the events after those are new.
struct Replayed {
    count: usize,
    passed: blake3::Hasher,
    seen: usize,
    digest: blake3::Hasher,
}

impl Replayed {
    fn new(count: usize, passed: blake3::Hasher) -> Replayed {
        Replayed {
            count,
            passed,
            seen: 0,
            digest: blake3::Hasher::new(),
        }
    }

    /// `Some(event)` if it is new, `None` if it was passed on already, `Err` once the replay
    /// turns out to differ from what was passed on.
    fn check(&mut self, event: Bytes) -> Result<Option<Bytes>, ()> {
        if self.seen >= self.count {
            return Ok(Some(event));
        }
        self.seen += 1;
        digest_event(&mut self.digest, &event);
        if self.seen == self.count && self.digest.finalize() != self.passed.finalize() {
            return Err(());
        }
        Ok(None)
    }
}

/// Adds one event to a digest of a stream's events, delimited by its length.
fn digest_event(digest: &mut blake3::Hasher, event: &[u8]) {
    digest.update(&(event.len() as u64).to_le_bytes());
    digest.update(event);
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"))
}

/// The error of a request whose flight ended without an outcome (its task was aborted).
fn abandoned() -> Error {
    Error::new(
        ErrorKind::Abandoned,
        "the upstream call for this request was abandoned",
    )
}

#[cfg(test)]
mod tests {
    use super::{Replayed, digest_event};
    use bytes::Bytes;

    fn digest_of(events: &[&'static str]) -> blake3::Hasher {
        let mut digest = blake3::Hasher::new();
        for event in events {
            digest_event(&mut digest, event.as_bytes());
        }
        digest
    }

    fn replay(passed: &[&'static str], replayed: &[&'static str]) -> Result<Vec<Bytes>, ()> {
        let mut replay = Replayed::new(passed.len(), digest_of(passed));
        let mut new = Vec::new();
        for event in replayed {
            new.extend(replay.check(Bytes::from_static(event.as_bytes()))?);
        }
        Ok(new)
    }

    #[test]
    fn a_replay_from_the_start_gives_only_the_events_not_passed_on_yet() {
        let (a, b, c) = ("data: a\n\n", "data: b\n\n", "data: [DONE]\n\n");
        assert_eq!(replay(&[a, b], &[a, b, c]), Ok(vec![Bytes::from(c)]));
        assert_eq!(replay(&[], &[a, b]).map(|n| n.len()), Ok(2));
        assert_eq!(replay(&[a, b, c], &[a, b, c]), Ok(vec![]));
    }

    #[test]
    fn a_replay_of_another_answer_is_never_spliced_on() {
        let (a, b) = ("data: a\n\n", "data: b\n\n");
        assert_eq!(replay(&[a, b], &[a, "data: x\n\n", b]), Err(()));
        // The same bytes cut into other events are another stream, too.
        assert_eq!(replay(&["data: ab\n\n"], &["data: a", "b\n\n"]), Err(()));
    }
}
