//! Streams shared live across replicas: the leader's [`Relay`] appends a streamed answer's
//! events to a Redis Stream as they arrive, and a follower on another replica reads them
//! ([`Followed`]) into a live stream of its own. See [`super`] for the key layout.

use std::time::Instant;

use std::time::Duration;

use super::conn::{CONNECT_TIMEOUT, OP_TIMEOUT};
use super::events::Says;
use super::{Fleet, Unavailable, codec};
use crate::key::CacheKey;

/// How long a shared stream stays readable after its last record.
pub const STREAM_KEPT: Duration = Duration::from_secs(60);
/// How long a follower waits for a shared stream's next record before it looks again.
const STREAM_BLOCK: Duration = Duration::from_secs(1);
/// How long a shared stream may go silent, its lease gone, before a follower ends it.
const STREAM_ORPHANED: Duration = Duration::from_secs(15);

impl Fleet {
    /// Starts relaying a streamed answer of `status` and `headers` (only the replayed ones
    /// are shared) for the followers on other replicas.
    pub fn relay(
        &self,
        key: &CacheKey,
        status: http::StatusCode,
        headers: &http::HeaderMap,
    ) -> Relay {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Record>();
        // The head names where this replica can be reached, for followers that lose Redis.
        let mut head = vec![("h", codec::encode_head(status, headers))];
        if let Some(url) = &self.inner.advertised {
            head.push(("peer", url.clone().into_bytes()));
        }
        let _ = tx.send(head);
        let (fleet, name) = (self.clone(), self.inner.layout.stream(key));
        let key = *key;
        tokio::spawn(async move {
            let ms = STREAM_KEPT.as_millis() as u64;
            let mut first = true;
            while let Some(record) = rx.recv().await {
                let name = name.clone();
                let added: Result<(), Unavailable> = fleet
                    .call("relay", |mut c| async move {
                        let mut pipe = redis::pipe();
                        pipe.cmd("XADD").arg(&name).arg("*");
                        for (field, value) in record {
                            pipe.arg(field).arg(value);
                        }
                        pipe.ignore()
                            .cmd("PEXPIRE")
                            .arg(&name)
                            .arg(ms)
                            .ignore()
                            .query_async(&mut c)
                            .await
                    })
                    .await;
                if added.is_err() {
                    // Followers see the stream stop, and end it once its lease is gone.
                    return;
                }
                if first {
                    first = false;
                    fleet.publish(Says::Live(key));
                }
            }
        });
        Relay {
            tx,
            sent: 0,
            bound: usize::MAX,
            cut: false,
        }
    }

    /// The stream another replica relays for `key`, if there is one, its head read.
    pub(super) async fn follow(&self, key: &CacheKey) -> Option<Followed> {
        let name = self.inner.layout.stream(key);
        let head: Vec<StreamRecord> = {
            let name = name.clone();
            self.call("follow", |mut c| async move {
                redis::cmd("XRANGE")
                    .arg(name)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut c)
                    .await
            })
            .await
            .ok()?
        };
        let (id, fields) = head.into_iter().next()?;
        let head = fields
            .iter()
            .find(|(f, _)| f == "h")
            .and_then(|(_, value)| codec::decode_refusal(value))?;
        let peer = fields
            .into_iter()
            .find(|(f, _)| f == "peer")
            .and_then(|(_, value)| String::from_utf8(value).ok());
        // A connection of its own: a blocking read would hold up everything else on a shared one.
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.inner.client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()?;
        Some(Followed {
            fleet: self.clone(),
            conn,
            key: *key,
            name,
            last: id,
            status: head.status,
            headers: head.headers,
            peer,
            quiet_since: Instant::now(),
        })
    }
}

/// The leader's side of a stream shared live with other replicas: events are handed to a task
/// that appends them to the Redis Stream in order, so the upstream's pace never waits on Redis.
pub struct Relay {
    tx: tokio::sync::mpsc::UnboundedSender<Record>,
    sent: usize,
    bound: usize,
    cut: bool,
}

impl Relay {
    /// Relays at most `bound` bytes of events (`--max-stream`).
    pub fn bounded(mut self, bound: usize) -> Relay {
        self.bound = bound;
        self
    }

    /// Relays one event, unless the bound is passed (then the end says `cut`).
    pub fn event(&mut self, event: &[u8]) {
        if self.cut {
            return;
        }
        self.sent += event.len();
        if self.sent > self.bound {
            self.cut = true;
            let _ = self.tx.send(vec![("end", Ending::Cut.as_bytes().to_vec())]);
            return;
        }
        let _ = self.tx.send(vec![("e", event.to_vec())]);
    }

    /// Ends the relay as the stream ended: [`Ending::Complete`] or [`Ending::Failed`] (a relay
    /// past its bound said [`Ending::Cut`] already).
    pub fn end(self, ending: Ending) {
        if !self.cut {
            let _ = self.tx.send(vec![("end", ending.as_bytes().to_vec())]);
        }
    }
}

/// The fields of one record to append to a Redis Stream.
type Record = Vec<(&'static str, Vec<u8>)>;

/// One record of a Redis Stream: its id and its fields.
type StreamRecord = (String, Vec<(String, Vec<u8>)>);

/// What a follower reads next from a stream shared live.
pub enum Relayed {
    /// Events, in order.
    Events(Vec<bytes::Bytes>),
    /// The end: whether the stream completed.
    End(Ending),
}

/// How a shared stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// With its framing's success marker, as the leader received it.
    Complete,
    /// Failed at the leader (the upstream cut it or sent an error).
    Failed,
    /// Longer than `--max-stream`: no more is relayed.
    Cut,
    /// Redis, or the leader's connection to it, went away: the rest is only on the leader
    /// replica, at [`Followed::peer`] if it named where it can be reached.
    Lost,
}

impl Ending {
    /// How a relayed stream's end record says it.
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Ending::Complete => b"ok",
            Ending::Failed => b"err",
            Ending::Cut | Ending::Lost => b"cut",
        }
    }

    /// What an end record says.
    fn read(said: &[u8]) -> Ending {
        match said {
            b"ok" => Ending::Complete,
            b"err" => Ending::Failed,
            _ => Ending::Cut,
        }
    }
}

/// A follower's side of a stream another replica relays.
pub struct Followed {
    fleet: Fleet,
    conn: redis::aio::MultiplexedConnection,
    key: CacheKey,
    name: String,
    last: String,
    /// The upstream's status.
    pub status: http::StatusCode,
    /// The replayed headers of the answer.
    pub headers: http::HeaderMap,
    /// Where the leader replica's proxy can be reached (its `--advertise`), if it said.
    pub peer: Option<String>,
    quiet_since: Instant,
}

impl Followed {
    /// The records after the last one read, waiting up to a second for one.
    pub async fn next(&mut self) -> Relayed {
        type Records = Vec<(String, Vec<StreamRecord>)>;
        let read = tokio::time::timeout(
            STREAM_BLOCK + OP_TIMEOUT,
            redis::cmd("XREAD")
                .arg("COUNT")
                .arg(256)
                .arg("BLOCK")
                .arg(STREAM_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&self.name)
                .arg(&self.last)
                .query_async::<Option<Records>>(&mut self.conn),
        )
        .await;
        let records = match read {
            Ok(Ok(records)) => records.unwrap_or_default(),
            Ok(Err(e)) => {
                self.fleet.failed("follow", &e.to_string());
                return Relayed::End(Ending::Lost);
            }
            Err(_) => {
                self.fleet.failed("follow", "timed out");
                return Relayed::End(Ending::Lost);
            }
        };
        let mut events = Vec::new();
        for (_, entries) in records {
            for (id, fields) in entries {
                if let Some((_, value)) = fields.iter().find(|(f, _)| f == "end") {
                    if !events.is_empty() {
                        // The events first; the end is read again next time.
                        return Relayed::Events(events);
                    }
                    self.last = id;
                    return Relayed::End(Ending::read(value));
                }
                self.last = id;
                for (field, value) in fields {
                    if field == "e" {
                        events.push(bytes::Bytes::from(value));
                    }
                }
            }
        }
        if !events.is_empty() {
            self.quiet_since = Instant::now();
        } else if self.quiet_since.elapsed() > STREAM_ORPHANED
            && !matches!(self.fleet.lease_exists(&self.key).await, Ok(true))
        {
            // Silent, and nobody leads it any more: its leader died, or lost Redis.
            return Relayed::End(Ending::Lost);
        }
        Relayed::Events(events)
    }
}
