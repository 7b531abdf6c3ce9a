//! A leader's step 4 (in phase 5), for a streamed answer: received from the upstream event by
//! event, shared live with every waiter of its flight, and stored once it completed.

use std::sync::Arc;

use super::leader::Leader;
use super::prefixes::Writer;
use crate::entry::{Billing, StoredAnswer};
use crate::fleet::{Ending, Relay};
use crate::live::LiveStream;
use crate::sse::{Completion, EventSplitter, Verdict};

/// Growth of a flight's stream buffer between two updates of its memory reservation.
const RESERVE_STEP: usize = 64 * 1024;

/// A stream's size against `--max-stream`. Past it, the stream is passed on to those already
/// sharing it, but no longer kept, and no longer joined: a request arriving now could not be
/// given it from its start, so it makes its own call.
pub(super) struct StreamBound {
    max: usize,
    size: usize,
    outgrown: bool,
}

impl StreamBound {
    pub(super) fn new(max: usize) -> StreamBound {
        StreamBound {
            max,
            size: 0,
            outgrown: false,
        }
    }

    /// Counts `bytes` more; `true` the one time the stream grows past the bound.
    pub(super) fn grew(&mut self, bytes: usize) -> bool {
        self.size += bytes;
        let now = !self.outgrown && self.size > self.max;
        self.outgrown |= now;
        now
    }

    /// Whether the stream grew past the bound.
    pub(super) fn outgrown(&self) -> bool {
        self.outgrown
    }

    /// The bytes counted so far.
    pub(super) fn size(&self) -> usize {
        self.size
    }
}

impl Leader {
    /// Keeps no more of `live` than `--max-stream` (what its subscribers have yet to take),
    /// and takes the flight out of the table.
    pub(super) fn outgrow(&self, live: &LiveStream) {
        live.stop_buffering(self.engine.max_stream_bytes);
        self.flight.leave();
    }

    /// Receives a streamed answer into `live`, event by event, and stores it if it completed
    /// without error and within `--max-stream`. A cut or failed stream is passed on as it
    /// came and never stored. A stream (or one event of it) that grows past the bound is
    /// passed on to the requests already sharing it ([`StreamBound`]), its room in memory is
    /// given back, and once nobody takes it any more it is no longer read.
    pub(super) async fn pump(
        &self,
        mut response: reqwest::Response,
        live: &LiveStream,
        mut relay: Option<Relay>,
        mut writer: Option<Writer>,
    ) {
        let (engine, meta, out) = (&self.engine, &self.meta, &self.out);
        let mut first = true;
        let mut split = EventSplitter::bounded(engine.max_stream_bytes);
        let mut completion = Completion::new(meta.route);
        let mut bound = StreamBound::new(engine.max_stream_bytes);
        let mut reserved = 0usize;
        let result = loop {
            if bound.outgrown() && live.subscribers() == 0 {
                tracing::debug!(key = %meta.key, size = bound.size(), "stream past --max-stream with nobody taking it: no longer read");
                break Ok(());
            }
            match engine.upstream.next_chunk(&mut response).await {
                Ok(Some(chunk)) => {
                    if std::mem::take(&mut first) {
                        // The answer started: the prompt's prefixes are readable now.
                        self.prefixes_written(writer.take());
                    }
                    let mut grew = false;
                    for event in split.push(&chunk) {
                        // Past the bound, bytes rather than events: never stored, so not read.
                        if !split.overflowed() {
                            completion.observe(&event);
                        }
                        grew |= bound.grew(event.len());
                        if let Some(relay) = relay.as_mut() {
                            relay.event(&event);
                        }
                        live.push(event);
                        #[cfg(test)]
                        engine.faults.trip(super::tests::Fault::MidStream);
                    }
                    if grew {
                        self.outgrow(live);
                        if reserved > 0 {
                            engine.memory.release(&meta.key).await;
                        }
                        tracing::debug!(key = %meta.key, size = bound.size(), "stream past --max-stream: passed on, no longer kept");
                    }
                    // What the flight buffers counts against the memory bound, refreshed
                    // every RESERVE_STEP bytes (small streams never reserve).
                    if !bound.outgrown() && bound.size() - reserved >= RESERVE_STEP {
                        reserved = bound.size();
                        engine.memory.reserve(meta.key, reserved as u64).await;
                    }
                }
                Err(e) => break Err(e),
                Ok(None) => break Ok(()),
            }
        };
        if let Some(rest) = split.rest() {
            bound.grew(rest.len());
            if let Some(relay) = relay.as_mut() {
                relay.event(&rest);
            }
            live.push(rest);
        }
        let verdict = completion.verdict();
        let billing = Billing::of_stream(&completion);
        let model = billing.model.as_deref().or(meta.model.as_deref());
        engine.provider_cache(meta.route, model, &billing.usage);
        engine.governor.settle(
            &out.partition,
            out.estimate,
            completion.usage().total_tokens,
        );
        let complete = result.is_ok() && verdict == Verdict::Complete;
        if complete && !bound.outgrown() {
            let entry = StoredAnswer::new(meta, live.status, &live.headers, live.body(), billing);
            // Before the stream is finished and the flight ends: later requests find it.
            engine.store(Arc::new(entry)).await;
        } else {
            tracing::debug!(key = %meta.key, ?verdict, size = bound.size(), cut = result.is_err(), "stream not stored");
            if reserved > 0 && !bound.outgrown() {
                engine.memory.release(&meta.key).await;
            }
        }
        if let Some(relay) = relay {
            relay.end(if complete {
                Ending::Complete
            } else {
                Ending::Failed
            });
        }
        live.finish(result);
    }
}
