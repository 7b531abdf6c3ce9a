//! Phase 6, stream: a streamed answer received from the upstream event by event, shared live
//! with every waiter of its flight, and stored once it completed.

use std::sync::Arc;

use super::Engine;
use super::classify::Outbound;
use super::flight::LeadFlight;
use crate::entry::{Billing, EntryMeta, StoredAnswer};
use crate::fleet::{Ending, Relay};
use crate::live::LiveStream;
use crate::sse::{Completion, EventSplitter, Verdict};

/// Growth of a flight's stream buffer between two updates of its memory reservation.
const RESERVE_STEP: usize = 64 * 1024;

impl Engine {
    /// Receives a streamed answer into `live`, event by event, and stores it if it completed
    /// without error and within `--max-stream`. A cut or failed stream is passed on as it
    /// came and never stored. A stream that grows past `--max-stream` is passed on to the
    /// requests already sharing it, but no longer kept: its flight leaves the table (a request
    /// arriving now could not be given it from its start, so it makes its own call), its room
    /// in memory is given back, and each event is dropped once every subscriber took it.
    pub(super) async fn pump(
        &self,
        response: reqwest::Response,
        live: &LiveStream,
        meta: &EntryMeta,
        out: &Outbound,
        flight: &LeadFlight,
        mut relay: Option<Relay>,
    ) {
        let mut split = EventSplitter::bounded(self.max_stream_bytes);
        let mut completion = Completion::new(meta.route);
        let mut size = 0usize;
        let mut reserved = 0usize;
        let mut overgrown = false;
        let mut response = response;
        let result = loop {
            // Past the bound, only those already taking it get it: with none left, it is not
            // read on (it will not be stored).
            if overgrown && live.subscribers() == 0 {
                tracing::debug!(key = %meta.key, size, "stream past --max-stream with nobody taking it: no longer read");
                break Ok(());
            }
            match self.upstream.next_chunk(&mut response).await {
                Ok(Some(chunk)) => {
                    for event in split.push(&chunk) {
                        // Past the bound, bytes rather than events: never stored, so not read.
                        if !split.overflowed() {
                            completion.observe(&event);
                        }
                        size += event.len();
                        if let Some(relay) = relay.as_mut() {
                            relay.event(&event);
                        }
                        live.push(event);
                        #[cfg(test)]
                        self.faults.trip(super::tests::Fault::MidStream);
                    }
                    if (size > self.max_stream_bytes || split.overflowed()) && !overgrown {
                        overgrown = true;
                        live.stop_buffering(self.max_stream_bytes);
                        flight.leave();
                        if reserved > 0 {
                            self.memory.release(&meta.key).await;
                        }
                        tracing::debug!(key = %meta.key, size, "stream past --max-stream: passed on, no longer kept");
                    }
                    // What the flight buffers counts against the memory bound, refreshed
                    // every RESERVE_STEP bytes (small streams never reserve).
                    if !overgrown && size - reserved >= RESERVE_STEP {
                        reserved = size;
                        self.memory.reserve(meta.key, size as u64).await;
                    }
                }
                Err(e) => break Err(e),
                Ok(None) => break Ok(()),
            }
        };
        if let Some(rest) = split.rest() {
            size += rest.len();
            if let Some(relay) = relay.as_mut() {
                relay.event(&rest);
            }
            live.push(rest);
        }
        let verdict = completion.verdict();
        self.governor.settle(
            &out.partition,
            out.estimate,
            completion.usage().total_tokens,
        );
        if result.is_ok() && verdict == Verdict::Complete && !overgrown {
            let billing = Billing::of_stream(&completion);
            let entry = StoredAnswer::new(meta, live.status, &live.headers, live.body(), billing);
            // Before the stream is finished and the flight ends: later requests find it.
            self.store(Arc::new(entry)).await;
            if let Some(relay) = relay.take() {
                relay.end(Ending::Complete);
            }
        } else {
            tracing::debug!(key = %meta.key, ?verdict, size, cut = result.is_err(), "stream not stored");
            if reserved > 0 && !overgrown {
                self.memory.release(&meta.key).await;
            }
        }
        if let Some(relay) = relay {
            // Complete streams ended the relay above.
            relay.end(Ending::Failed);
        }
        live.finish(result);
    }
}
