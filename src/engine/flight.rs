//! Phase 5, flight: a request that memory could not answer joins an identical request in
//! flight, or leads one ([`Leader`], in `leader.rs`, whose task resolves it).
//!
//! The leader's work runs in a task of its own (tracked for `close`), so the request that
//! started it can hang up without cancelling what others wait on; every request, the
//! leader's included, only waits on the flight's outcome.

use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderMap;

use super::Engine;
use super::classify::Outbound;
use super::leader::Leader;
use super::lookup::young_enough;
use crate::answer::{Answer, CacheStatus, Refusal};
use crate::controls::CacheControls;
use crate::entry::{EntryMeta, StoredAnswer};
use crate::error::{Error, ErrorKind};
use crate::headers::PREFIX_WAIT_HEADER;
use crate::inflight::{Flight, InFlight, Role};
use crate::key::{CacheKey, Partition};
use crate::live::LiveStream;

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
    /// How long the leader's call waited while another request wrote a prefix it shares.
    pub held: std::time::Duration,
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
                if let Some(entry) = self.lookup_shared_then_disk(&key, controls.max_age).await {
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
            return self.refresh(out, meta, fresh, controls).await;
        }
        self.fly(out, meta, controls, None).await
    }

    /// Joins the flight for `meta.key`, or leads it (`lead`: one this request already holds),
    /// and renders its outcome for this request.
    pub(super) async fn fly(
        self: &Arc<Self>,
        out: Outbound,
        meta: EntryMeta,
        controls: &CacheControls,
        mut lead: Option<LeadFlight>,
    ) -> Result<Answer, Error> {
        let key = meta.key;
        let mut foreign = 0;
        loop {
            let role = match lead.take() {
                Some(flight) => Role::Leader(flight),
                None => self.flights.join(&key),
            };
            let (waiter, role) = match role {
                Role::Leader(flight) => {
                    let leader = Leader {
                        engine: self.clone(),
                        out: out.clone(),
                        meta: meta.clone(),
                        flight,
                        fresh: Fresh::Shared,
                        max_age: controls.max_age,
                        hold_prefix: !controls.no_prefix_hold,
                        held: Default::default(),
                        prefixes: Default::default(),
                    };
                    (leader.spawn(), CacheStatus::Miss)
                }
                Role::Follower(waiter) => (waiter, CacheStatus::Coalesced),
            };
            let led = {
                let _waiting = Waiting::count(&self.waiting);
                waiter.wait().await.map_err(|_| abandoned())?
            };
            let own = led.by == out.partition;
            if !own && !led.outcome.shareable() {
                // Not this caller's answer: try the flight again (callers of this partition
                // then share one call), or, after that, make a call of its own.
                foreign += 1;
                if foreign < MAX_FOREIGN_FLIGHTS {
                    continue;
                }
                return self.refresh(out, meta, Fresh::Own, controls).await;
            }
            if let FlightOutcome::Stored {
                entry,
                fresh_headers: None,
            } = &led.outcome
            {
                // The flight found the answer in the cache; a follower with a stricter max-age
                // than the leader's may need a fresher one.
                if !young_enough(entry, controls.max_age) {
                    return self.refresh(out, meta, Fresh::Own, controls).await;
                }
            }
            let held = led.held;
            return said_held(self.render(led.outcome, role, &meta, own), held);
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
        let held = led.held;
        usable.then(|| {
            said_held(
                self.render(led.outcome, CacheStatus::Coalesced, meta, own),
                held,
            )
        })
    }

    /// Fetches a fresh answer outside the in-flight table and stores it (`fresh` is `Own` or
    /// `Replace`).
    async fn refresh(
        self: &Arc<Self>,
        out: Outbound,
        meta: EntryMeta,
        fresh: Fresh,
        controls: &CacheControls,
    ) -> Result<Answer, Error> {
        // A flight of its own, outside the shared table: nobody joins a refresh.
        let leader = Leader {
            engine: self.clone(),
            flight: InFlight::detached(meta.key),
            out,
            meta: meta.clone(),
            fresh,
            max_age: None,
            hold_prefix: !controls.no_prefix_hold,
            held: Default::default(),
            prefixes: Default::default(),
        };
        let led = leader.spawn().wait().await.map_err(|_| abandoned())?;
        let held = led.held;
        said_held(
            self.render(led.outcome, CacheStatus::Miss, &meta, true),
            held,
        )
    }
}

/// `answer`, saying in `llm-dedup-prefix-wait` how long its call waited while another request
/// wrote a prefix it shares, if it did.
fn said_held(answer: Result<Answer, Error>, held: std::time::Duration) -> Result<Answer, Error> {
    answer.map(|mut answer| {
        if !held.is_zero() {
            answer.headers.insert(
                PREFIX_WAIT_HEADER,
                http::HeaderValue::from(held.as_millis() as u64),
            );
        }
        answer
    })
}

/// One request waiting on a flight, counted in the engine's gauge while it waits (and no
/// longer once it stopped, however it stopped).
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(gauge: &'a std::sync::atomic::AtomicUsize) -> Waiting<'a> {
        gauge.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether an answer's headers say it is a stream of server-sent events.
pub(super) fn is_event_stream(headers: &HeaderMap) -> bool {
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
