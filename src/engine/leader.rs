//! The leader of a flight: the one value that resolves a request memory could not answer, in a
//! task of its own, top down.
//!
//! 1. **resolve**: the cache again (closing the race with a flight that just ended), unless the
//!    caller needs an answer of its own;
//! 2. **turn**: with `--redis`, the fleet's turn: another replica's stored answer, error answer
//!    or live stream may be this flight's too; else this replica leads, under a lease;
//! 3. **call**: the upstream, through the governor (`govern.rs`);
//! 4. **stream or store**: a streamed answer received event by event and shared live
//!    (`stream.rs`), a whole answer stored, one larger than `--max-stream` passed on;
//! 5. **complete**: the flight's outcome to every waiter, the lease ended.
//!
//! A leader that panics, or runs past a shutdown's deadline, still completes its flight, with
//! an error (`guarded`).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::HeaderMap;
use serde_json::Value;

use super::Engine;
use super::classify::Outbound;
use super::flight::{FlightOutcome, Fresh, LeadFlight, Led, is_event_stream};
use super::govern::Upstreamed;
use super::prefixes::{Hold, Writer};
use crate::answer::Refusal;
use crate::entry::{Billing, EntryMeta, StoredAnswer};
use crate::error::{Error, ErrorKind};
use crate::fleet::{Fleet, Relay, Turn};
use crate::inflight::Waiter;
use crate::live::LiveStream;
use crate::prefix::Prefixes;
use crate::upstream;

/// How long the waiters of an answer too large to keep have to take it before the bytes they
/// have not read yet may be dropped.
const HANDOVER: Duration = Duration::from_secs(1);

/// The leader of one flight: everything its work needs, travelling together.
pub(super) struct Leader {
    pub(super) engine: Arc<Engine>,
    /// The request, as it goes upstream.
    pub(super) out: Outbound,
    /// What its answer is stored as.
    pub(super) meta: EntryMeta,
    /// The flight it resolves.
    pub(super) flight: LeadFlight,
    /// Whether an answer of another replica's call will do.
    pub(super) fresh: Fresh,
    /// The oldest stored answer the request accepts (`max-age`).
    pub(super) max_age: Option<Duration>,
    /// Whether the call may wait while another writes a prefix it shares (`prefixes.rs`).
    pub(super) hold_prefix: bool,
    /// How long it waited for that, in milliseconds (said in `llm-dedup-prefix-wait`).
    pub(super) held: AtomicU64,
    /// The prefixes of its request the provider caches, once taken (before its call).
    pub(super) prefixes: OnceLock<Prefixes>,
}

/// Where a leader stands after taking its turn with the fleet.
enum Leading {
    /// Calling the upstream, without a fleet or without its Redis.
    Alone,
    /// Calling the upstream under the fleet's lease on the key.
    Leased(crate::fleet::Lease, Fleet),
    /// Another replica's call answers this flight.
    Answered(FlightOutcome),
}

impl Leader {
    /// The flight's outcome as its waiters get it.
    pub(super) fn led(&self, outcome: FlightOutcome) -> Led {
        Led {
            by: self.out.partition,
            outcome,
            held: Duration::from_millis(self.held.load(Ordering::Relaxed)),
        }
    }

    /// Runs the flight in a task of its own (tracked for `close`), so that the request that
    /// started it can go away without cancelling what others wait on; returns the waiter of
    /// its outcome.
    pub(super) fn spawn(self) -> Waiter<Led> {
        let waiter = self.flight.waiter();
        let tasks = self.engine.tasks.clone();
        tasks.spawn(async move {
            let outcome = self.guarded().await;
            let led = self.led(outcome);
            self.flight.complete(led);
        });
        waiter
    }

    /// Runs the flight and gives its outcome. If the work panics, or the engine is shut down
    /// past its deadline while it runs, the flight still gets one: every waiter gets a clear
    /// error (never a second upstream call), a stream already shared ends with that error after
    /// the events received so far, and the room it reserved in memory is given back. Nothing
    /// of it is stored.
    async fn guarded(&self) -> FlightOutcome {
        let work = AssertUnwindSafe(self.run()).catch_unwind();
        let error = tokio::select! {
            outcome = work => match outcome {
                Ok(outcome) => return outcome,
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(key = %self.meta.key, panic = why, "a flight failed inside llm-dedup; its waiters get an error");
                    Error::new(
                        ErrorKind::Abandoned,
                        "the upstream call for this request failed inside llm-dedup; nothing \
                         was stored",
                    )
                }
            },
            () = self.engine.stopping.cancelled() => Error::new(
                ErrorKind::Abandoned,
                "the proxy is shutting down and its drain deadline passed before the upstream \
                 answered; nothing was stored",
            ),
        };
        if let Some(Led {
            outcome: FlightOutcome::Live(live),
            ..
        }) = self.flight.published()
        {
            live.fail_if_open(error.clone());
            self.engine.memory.release(&self.meta.key).await;
        }
        FlightOutcome::Failed(error)
    }

    /// The flight's work, top down (see the module documentation).
    async fn run(&self) -> FlightOutcome {
        let engine = &self.engine;
        // 1. Resolve: the cache again.
        if self.fresh == Fresh::Shared {
            let key = &self.meta.key;
            let cached = match engine.lookup_memory(key, self.max_age).await {
                Some(entry) => Some(entry),
                None => engine.lookup_shared_then_disk(key, self.max_age).await,
            };
            if let Some(entry) = cached {
                return FlightOutcome::Stored {
                    entry,
                    fresh_headers: None,
                };
            }
        }
        // 2. Turn.
        let leading = match self.turn().await {
            Leading::Answered(outcome) => return outcome,
            leading => leading,
        };
        // 3. Call, and 4. stream or store.
        let relay = match &leading {
            Leading::Leased(_, fleet) => Some(fleet),
            _ => None,
        };
        let outcome = self.call(relay).await;
        // 5. Complete: what the other replicas must know, then the lease ends.
        if let Some(fleet) = &engine.fleet {
            let stored = matches!(
                outcome,
                FlightOutcome::Stored { .. } | FlightOutcome::Live(_)
            );
            if stored && self.fresh == Fresh::Replace {
                fleet.replaced(&self.meta.key);
            }
        }
        if let Leading::Leased(lease, fleet) = leading {
            if let FlightOutcome::Refused(refusal) = &outcome {
                fleet
                    .share_refusal(&self.meta.key, &self.out.partition, refusal)
                    .await;
            }
            lease.finish().await;
        }
        outcome
    }

    /// Takes the flight's turn with the other replicas of a fleet: the answer one of them
    /// stores, an error answer of the same partition or a stream it receives is this flight's
    /// too. A caller that needs an answer of its own (`Fresh::Own`, `Fresh::Replace`) calls
    /// alone.
    async fn turn(&self) -> Leading {
        let Some(fleet) = &self.engine.fleet else {
            return Leading::Alone;
        };
        if self.fresh != Fresh::Shared {
            return Leading::Alone;
        }
        // Another replica's call is waited on no longer than a call of this one's would take.
        let patience = self.engine.upstream.timeouts().first_byte;
        let (key, partition) = (&self.meta.key, &self.out.partition);
        match fleet.take_turn(key, partition, patience).await {
            Turn::Lead(lease) => Leading::Leased(lease, fleet.clone()),
            Turn::Alone => Leading::Alone,
            Turn::Found(entry) => {
                let entry = Arc::new(entry);
                self.engine.memory.insert(entry.clone()).await;
                Leading::Answered(FlightOutcome::Stored {
                    entry,
                    fresh_headers: None,
                })
            }
            Turn::Refused(refusal) => Leading::Answered(FlightOutcome::Refused(Arc::new(refusal))),
            Turn::Live(followed) => Leading::Answered(self.follow(followed).await),
        }
    }

    /// Calls the upstream and takes its answer: a stream is published on the flight as soon
    /// as it starts and received live (relayed to the fleet's followers under a lease); a
    /// whole answer is stored if it is a complete 2xx JSON document.
    async fn call(&self, relaying: Option<&Fleet>) -> FlightOutcome {
        let engine = &self.engine;
        // Another request writing a prefix this one shares is waited for first (and a
        // request writing one is told when its answer starts).
        let mut writer = self.hold_for_prefix().await;
        let response = match engine.send_governed(&self.out, &self.meta).await {
            Ok(Upstreamed::Success(r)) => r,
            Ok(Upstreamed::Refused(refusal)) => {
                tracing::debug!(key = %self.meta.key, status = refusal.status.as_u16(), "upstream answer not stored");
                return FlightOutcome::Refused(Arc::new(refusal));
            }
            Err(e) => return FlightOutcome::Failed(e),
        };
        #[cfg(test)]
        engine.faults.trip(super::tests::Fault::AfterUpstream);
        let status = response.status();
        let headers = upstream::response_headers(response.headers());
        if status.is_success() && is_event_stream(&headers) {
            let live = LiveStream::new(status, headers, engine.stream_bytes.clone());
            self.flight
                .publish(self.led(FlightOutcome::Live(live.clone())));
            // Shared live with the followers on other replicas, too.
            let relay: Option<Relay> = relaying.map(|fleet| {
                fleet
                    .relay(&self.meta.key, status, &live.headers)
                    .bounded(engine.max_stream_bytes)
            });
            self.pump(response, &live, relay, writer).await;
            return FlightOutcome::Live(live);
        }
        // Read within the bound of what may be stored: a larger answer is passed on to its
        // waiters as it comes, never held whole.
        let body = match engine.read_within(response, engine.max_stream_bytes).await {
            Ok(Read::Whole(body)) => body,
            Ok(Read::Larger(head, rest)) if status.is_success() => {
                // Its answer has started: whoever waits for its prefixes goes now.
                self.prefixes_written(writer.take());
                return self.pass_on_larger(status, headers, head, rest).await;
            }
            Ok(Read::Larger(..)) => {
                return FlightOutcome::Failed(Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!(
                        "the upstream's answer ({status}) is larger than --max-stream ({} bytes)",
                        engine.max_stream_bytes
                    ),
                ));
            }
            Err(e) => return FlightOutcome::Failed(e),
        };
        if status.is_success() {
            self.prefixes_written(writer);
        }
        self.store_whole(status, headers, body).await
    }

    /// Waits, if another request is writing the longest prefix this one shares with it, for
    /// that request's first byte, its failure, or `--prefix-wait`; then this one goes,
    /// writing what longer prefixes it has that are still cold (the `Writer` returned).
    async fn hold_for_prefix(&self) -> Option<Writer> {
        let engine = &self.engine;
        if !self.hold_prefix || engine.prefix_wait.is_zero() {
            return None;
        }
        let model = self.meta.model.as_deref();
        let prefixes = match engine.prefixes_of(&self.out, self.meta.route, model).await {
            Some(prefixes) => self.prefixes.get_or_init(|| prefixes),
            None => return None,
        };
        let started = tokio::time::Instant::now();
        let mut held = Duration::ZERO;
        let mut writer = match engine.prefixes.begin(prefixes, true) {
            Hold::Go => None,
            Hold::Write(writer) => Some(writer),
            Hold::Follow(mut written) => {
                let _ =
                    tokio::time::timeout(engine.prefix_wait, written.wait_for(|done| *done)).await;
                held = started.elapsed();
                match engine.prefixes.begin(prefixes, false) {
                    Hold::Write(writer) => Some(writer),
                    _ => None,
                }
            }
        };
        // One writer for the whole fleet: another replica may be writing it.
        if let (Some(writer), Some(fleet)) = (writer.as_mut(), &engine.fleet) {
            let left = engine.prefix_wait.saturating_sub(started.elapsed());
            held += writer.across(fleet, left).await;
        }
        if !held.is_zero() {
            self.held.store(
                u64::try_from(held.as_millis()).unwrap_or(u64::MAX).max(1),
                Ordering::Relaxed,
            );
            engine.prefix_held(self.meta.route, self.meta.model.as_deref(), held);
        }
        writer
    }

    /// The answer started: this request's prefixes are in the provider's cache now, and
    /// whoever waits for them goes.
    pub(super) fn prefixes_written(&self, writer: Option<Writer>) {
        if let Some(prefixes) = self.prefixes.get() {
            self.engine.prefixes.warm(prefixes);
        }
        if let Some(writer) = writer {
            writer.written();
        }
    }

    /// Stores a whole answer if it is a complete 2xx JSON document; anything else is passed
    /// on as it came.
    async fn store_whole(
        &self,
        status: http::StatusCode,
        headers: HeaderMap,
        body: Bytes,
    ) -> FlightOutcome {
        let (engine, out) = (&self.engine, &self.out);
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
            tracing::info!(key = %self.meta.key, bytes = body.len(), "upstream answer is not one whole JSON document; passed on, not stored");
            engine.governor.settle(&out.partition, out.estimate, None);
            return FlightOutcome::Refused(Arc::new(Refusal {
                status,
                headers,
                body,
            }));
        };
        let billing = Billing::of_answer(&answer);
        let model = billing.model.as_deref().or(self.meta.model.as_deref());
        engine.provider_cache(self.meta.route, model, &billing.usage);
        let tokens = billing.usage.total_tokens;
        // A copy: `body` is a slice of the buffer the answer was read into.
        let exact = Bytes::copy_from_slice(&body);
        let entry = Arc::new(StoredAnswer::new(
            &self.meta, status, &headers, exact, billing,
        ));
        engine.governor.settle(&out.partition, out.estimate, tokens);
        engine.store(entry.clone()).await;
        FlightOutcome::Stored {
            entry,
            fresh_headers: Some(Arc::new(headers)),
        }
    }

    /// Passes an answer larger than `--max-stream` on to the waiters of the flight as it
    /// arrives, like a stream that outgrew the bound: nobody joins it any more, each byte is
    /// dropped once every waiter took it, and nothing is stored.
    async fn pass_on_larger(
        &self,
        status: http::StatusCode,
        headers: HeaderMap,
        head: Bytes,
        mut rest: reqwest::Response,
    ) -> FlightOutcome {
        let (engine, flight) = (&self.engine, &self.flight);
        tracing::info!(key = %self.meta.key, "upstream answer larger than --max-stream; passed on, not stored");
        engine
            .governor
            .settle(&self.out.partition, self.out.estimate, None);
        let live = LiveStream::new(status, headers, engine.stream_bytes.clone());
        live.push(head);
        let waiting = flight.waiting();
        flight.publish(self.led(FlightOutcome::Live(live.clone())));
        flight.leave();
        // Those waiting subscribe as they take it: until they have (or a moment has passed),
        // nothing is read on, so nothing is dropped before them.
        let _ = tokio::time::timeout(HANDOVER, async {
            while live.subscribers() < waiting {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        live.stop_buffering(engine.max_stream_bytes);
        let result = loop {
            // Nobody takes it any more: not read on.
            if live.subscribers() == 0 {
                break Ok(());
            }
            match engine.upstream.next_chunk(&mut rest).await {
                Ok(Some(chunk)) => live.push(chunk),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        live.finish(result);
        FlightOutcome::Live(live)
    }
}

/// An answer's body, read within a bound.
pub(super) enum Read {
    /// All of it.
    Whole(Bytes),
    /// More than the bound: what was read, and the answer to read the rest from.
    Larger(Bytes, reqwest::Response),
}

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
}
