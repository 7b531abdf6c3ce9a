//! The peer read-back: the rest of a followed stream read from the replica that receives
//! it, when Redis went away mid-stream; and the other side, answering such a request.
//!
//! Only in a fleet with a secret: the asking replica presents a token made with it for the
//! key and its caller's partition ([`PEER_TOKEN_HEADER`]), never a client's credential or
//! request; the address asked is the one named in the stream's sealed head. The replica
//! asked answers a valid token only, and only with the stream it receives from the upstream
//! itself (or the answer it stored from it), never one it follows: two followers would wait
//! on each other.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method};

use super::Dedup;
use super::flight::{FlightOutcome, is_event_stream};
use super::follow::Passed;
use super::leader::Leader;
use crate::answer::{Answer, AnswerBody, CacheStatus};
use crate::entry::replayed_headers;
use crate::error::{Error, ErrorKind};
use crate::headers::PEER_TOKEN_HEADER;
use crate::key::CacheKey;
use crate::sse::{EventSplitter, Verdict};

/// How long the replica receiving a stream may take to start answering for the rest of it.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// The path another replica asks for the rest of the stream under a key at.
pub(crate) const PEER_PATH: &str = "/_llm-dedup/peer/";

/// Why a replica does not answer a peer's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) enum PeerRefused {
    /// No valid token of this fleet for the key (or no fleet secret here).
    Forbidden,
    /// No stream this replica receives, and no answer stored from one, under the key.
    NotHere,
}

impl Dedup {
    /// The stream this replica receives from the upstream under `key` (hex), or the answer it
    /// stored from it, for another replica of the fleet presenting `token` (see the module
    /// documentation). Not counted as a request: the asking replica counts its own.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) async fn peer_stream(&self, key: &str, token: &str) -> Result<Answer, PeerRefused> {
        let engine = &self.engine;
        let fleet = engine.fleet.as_ref().ok_or(PeerRefused::Forbidden)?;
        let key = CacheKey::from_hex(key).ok_or(PeerRefused::Forbidden)?;
        let partition = fleet
            .check_peer_token(&key, token)
            .ok_or(PeerRefused::Forbidden)?;
        let shown = |status, headers: &HeaderMap, body| Answer {
            status,
            headers: replayed_headers(headers),
            body,
            cache: CacheStatus::Coalesced,
            key: Some(key),
        };
        if let Some(flight) = engine.flights.in_progress(&key)
            && let Ok(led) = flight.wait().await
        {
            // Another partition's flight is this caller's only when answers are shared.
            if led.by != partition && !engine.shared_cache {
                return Err(PeerRefused::NotHere);
            }
            return match led.outcome {
                FlightOutcome::Live(live) if !live.is_relayed() => Ok(shown(
                    live.status,
                    &live.headers,
                    AnswerBody::Stream(live.subscribe()),
                )),
                FlightOutcome::Stored { entry, .. } => Ok(shown(
                    http::StatusCode::from_u16(entry.status).unwrap_or_default(),
                    &entry.hit_headers,
                    AnswerBody::Full(entry.body.clone()),
                )),
                _ => Err(PeerRefused::NotHere),
            };
        }
        match engine.lookup_memory(&key, None).await {
            Some(entry) => Ok(shown(
                http::StatusCode::from_u16(entry.status).unwrap_or_default(),
                &entry.hit_headers,
                AnswerBody::Full(entry.body.clone()),
            )),
            None => Err(PeerRefused::NotHere),
        }
    }
}

/// A replay that differs from the events already passed on: never spliced on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Diverged;

impl Leader {
    /// Reads the rest of a followed stream from the replica that receives it, at `peer`, with
    /// a token of the fleet (see the module documentation). Its events start from the first;
    /// those already passed on are skipped, after checking they are the same (a different
    /// answer is never spliced on).
    pub(super) async fn read_rest_from(
        &self,
        peer: &str,
        passed: &mut Passed<'_>,
    ) -> Result<(), Error> {
        let (engine, meta) = (&self.engine, &self.meta);
        let lost = |what: &str| {
            Error::new(
                ErrorKind::UpstreamUnreachable,
                format!("Redis went away mid-stream, and the replica receiving the stream {what}"),
            )
        };
        let token = engine
            .fleet
            .as_ref()
            .and_then(|fleet| fleet.peer_token(&meta.key, &self.out.partition))
            .ok_or_else(|| lost("cannot be asked without a fleet secret"))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            PEER_TOKEN_HEADER,
            HeaderValue::from_str(&token).map_err(|_| lost("cannot be asked"))?,
        );
        let url = format!("{peer}{PEER_PATH}{}", meta.key.to_hex());
        let sent = engine
            .upstream
            .send_to_replica(&Method::GET, &url, headers, Bytes::new());
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
        let mut split = EventSplitter::bounded(engine.max_stream_bytes);
        let mut body = engine.upstream.body_stream(response);
        let mut take = |events: Vec<Bytes>| -> Result<(), Error> {
            for event in events {
                let new = replay
                    .check(event)
                    .map_err(|Diverged| lost("has another answer"))?;
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

    /// `Some(event)` if it is new, `None` if it was passed on already, [`Diverged`] once the
    /// replay turns out to differ from what was passed on.
    fn check(&mut self, event: Bytes) -> Result<Option<Bytes>, Diverged> {
        if self.seen >= self.count {
            return Ok(Some(event));
        }
        self.seen += 1;
        digest_event(&mut self.digest, &event);
        if self.seen == self.count && self.digest.finalize() != self.passed.finalize() {
            return Err(Diverged);
        }
        Ok(None)
    }
}

/// Adds one event to a digest of a stream's events, delimited by its length.
pub(super) fn digest_event(digest: &mut blake3::Hasher, event: &[u8]) {
    digest.update(&(event.len() as u64).to_le_bytes());
    digest.update(event);
}

#[cfg(test)]
mod tests {
    use super::{Diverged, Replayed, digest_event};
    use bytes::Bytes;

    fn digest_of(events: &[&'static str]) -> blake3::Hasher {
        let mut digest = blake3::Hasher::new();
        for event in events {
            digest_event(&mut digest, event.as_bytes());
        }
        digest
    }

    fn replay(passed: &[&'static str], replayed: &[&'static str]) -> Result<Vec<Bytes>, Diverged> {
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
        assert_eq!(replay(&[a, b], &[a, "data: x\n\n", b]), Err(Diverged));
        // The same bytes cut into other events are another stream, too.
        assert_eq!(
            replay(&["data: ab\n\n"], &["data: a", "b\n\n"]),
            Err(Diverged)
        );
    }
}
