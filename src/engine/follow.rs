//! Following a stream another replica of the fleet receives from the upstream: shared live
//! with this flight's waiters as a stream of this replica's own would be. Nothing is stored
//! here: the replica that receives it stores it in the fleet's tier when it completes.

use bytes::Bytes;

use super::flight::FlightOutcome;
use super::leader::Leader;
use super::stream::StreamBound;
use crate::error::{Error, ErrorKind};
use crate::fleet::{Ending, Followed, Relayed};
use crate::live::LiveStream;
use crate::sse::Completion;

impl Leader {
    /// Follows `followed` to its end. If Redis goes away mid-stream, the rest exists only on
    /// the replica receiving it: when it named where it can be reached, the rest is read from
    /// there (`peer.rs`).
    pub(super) async fn follow(&self, mut followed: Followed) -> FlightOutcome {
        let live = LiveStream::relayed(
            followed.status,
            std::mem::take(&mut followed.headers),
            self.engine.stream_bytes.clone(),
        );
        self.flight
            .publish(self.led(FlightOutcome::Live(live.clone())));
        let mut passed = Passed::new(self, &live);
        // The replica receiving the stream ends it after this much silence from the upstream;
        // a relay silent longer (its leader hangs, or the records are not the fleet's) is
        // waited for no longer.
        let idle = self.engine.upstream.timeouts().idle;
        let mut heard = tokio::time::Instant::now();
        let result = loop {
            match followed.next().await {
                Relayed::Events(events) if events.is_empty() && heard.elapsed() > idle => {
                    break Err(Error::new(
                        ErrorKind::UpstreamTimeout,
                        "the stream another replica receives was silent for longer than \
                         --upstream-idle-timeout",
                    ));
                }
                Relayed::Events(events) => {
                    if !events.is_empty() {
                        heard = tokio::time::Instant::now();
                    }
                    events.into_iter().for_each(|e| passed.push(e));
                }
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
                        Some(peer) => self.read_rest_from(&peer, &mut passed).await,
                        None => Err(Error::new(
                            ErrorKind::UpstreamUnreachable,
                            "the stream shared by another replica could not be followed to its \
                             end: Redis went away, and the rest can be read from that replica \
                             only in a fleet with a secret (--fleet-secret) whose replicas name \
                             their address (--advertise)",
                        )),
                    };
                }
            }
        };
        live.finish(result);
        FlightOutcome::Live(live)
    }
}

/// The events of a followed stream passed on so far: counted, digested (to check a replay
/// from its start against them), observed for the stream's completion, and bounded by
/// `--max-stream` like a stream of this replica's own.
pub(super) struct Passed<'a> {
    leader: &'a Leader,
    live: &'a LiveStream,
    bound: StreamBound,
    pub(super) count: usize,
    pub(super) digest: blake3::Hasher,
    pub(super) completion: Completion,
}

impl<'a> Passed<'a> {
    fn new(leader: &'a Leader, live: &'a LiveStream) -> Passed<'a> {
        Passed {
            leader,
            live,
            bound: StreamBound::new(leader.engine.max_stream_bytes),
            count: 0,
            digest: blake3::Hasher::new(),
            completion: Completion::new(leader.meta.route),
        }
    }

    /// Passes one event on.
    pub(super) fn push(&mut self, event: Bytes) {
        if self.bound.grew(event.len()) {
            self.leader.outgrow(self.live);
        }
        self.count += 1;
        super::peer::digest_event(&mut self.digest, &event);
        self.completion.observe(&event);
        self.live.push(event);
    }
}
