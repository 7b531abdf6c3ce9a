//! Streams shared live across replicas: the leader's [`Relay`] appends a streamed answer's
//! events to a Redis Stream as they arrive, and a follower on another replica reads them
//! ([`Followed`]) into a live stream of its own. See [`super`] for the key layout.
//!
//! Every record carries its place in the stream (`n`: the head is 0) and, with a fleet
//! secret, a seal over the stream's name, the relay's own random id (`f`, in every record),
//! its place and its fields: a record planted by someone else, moved from another stream or
//! another flight of the same key, or replayed out of order fails its seal and is skipped.
//! A head must say a 2xx status. Without a secret, records are trusted as they are, and the
//! head names no peer (the read-back is off).

use std::time::{Duration, Instant};

use super::topology::Conn;

use super::conn::{CONNECT_TIMEOUT, OP_TIMEOUT};
use super::events::Says;
use super::seal::{Rejected, Sealed};
use super::{Fleet, Unavailable, codec};
use crate::fleet::{Ending, Relayed};
use crate::key::CacheKey;

/// How long a shared stream stays readable after its last record.
pub const STREAM_KEPT: Duration = Duration::from_secs(60);
/// How long a follower waits for a shared stream's next record before it looks again.
const STREAM_BLOCK: Duration = Duration::from_secs(1);
/// How long a follower waits for one blocking read: the block and a slow round trip on
/// either side of it. A read that takes longer is a fault of Redis or of the way to it.
const FOLLOW_READ: Duration = STREAM_BLOCK.saturating_add(OP_TIMEOUT.saturating_mul(4));
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
        let mut head = vec![("h", codec::encode_head(status, headers))];
        // With a fleet secret, the head names where this replica can be reached, for
        // followers that lose Redis (they prove themselves with a token made with it).
        if let (Some(url), true) = (&self.inner.advertised, self.has_secret()) {
            head.push(("peer", url.clone().into_bytes()));
        }
        let _ = tx.send(head);
        let (fleet, name) = (self.clone(), self.inner.layout.stream(key));
        let key = *key;
        let flight = format!("{:016x}", rand::random::<u64>()).into_bytes();
        tokio::spawn(async move {
            let ms = STREAM_KEPT.as_millis() as u64;
            let mut first = true;
            let mut n: u64 = 0;
            while let Some(mut record) = rx.recv().await {
                record.push(("f", flight.clone()));
                record.push(("n", n.to_string().into_bytes()));
                if let Some(seal) = &fleet.inner.seal {
                    let mac = seal.mac(Sealed::Stream, &record_parts(&name, &record));
                    record.push(("s", mac.as_bytes().to_vec()));
                }
                n += 1;
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

    /// The stream another replica relays for `key`, if there is one and its head can be
    /// trusted (sealed by this fleet when it has a secret, a 2xx status), its head read.
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
        let mut check = RecordCheck::new(self.clone(), name.clone());
        if !check.holds(&fields) {
            return None;
        }
        let head = field(&fields, "h").and_then(codec::decode_refusal);
        let Some(head) = head.filter(|h| h.status.is_success()) else {
            self.rejected(Rejected::Stream);
            return None;
        };
        // Only a sealed head's address is taken, and only in the form replicas write it.
        let peer = field(&fields, "peer")
            .filter(|_| self.has_secret())
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|url| super::advertised_url(url).ok());
        // A connection of its own (a blocking read would hold up everything else on a shared
        // one), whose answers may take as long as the read blocks.
        let cluster = self.cluster().await.ok()?;
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Conn::own(&self.inner.client, cluster, FOLLOW_READ),
        )
        .await
        .ok()?
        .ok()?;
        Some(Followed {
            conn,
            key: *key,
            name,
            last: id,
            check,
            status: head.status,
            headers: head.headers,
            peer,
            quiet_since: Instant::now(),
        })
    }
}

/// The parts a stream record's seal is made over: the stream's name, then each field's name
/// and value in order (the seal itself left out).
fn record_parts<'a>(name: &'a str, fields: &'a [(&'static str, Vec<u8>)]) -> Vec<&'a [u8]> {
    let mut parts = vec![name.as_bytes()];
    for (field, value) in fields {
        parts.push(field.as_bytes());
        parts.push(value);
    }
    parts
}

/// The value of `field` in a record read back.
fn field<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(f, _)| f == name)
        .map(|(_, value)| value.as_slice())
}

/// Checks the records of one relayed stream as a follower reads them: each must hold the
/// fleet's seal (when it has a secret), belong to the relay that wrote the head, and come in
/// its place.
struct RecordCheck {
    fleet: Fleet,
    name: String,
    /// The relay's id, from its head.
    flight: Option<Vec<u8>>,
    /// The place of the next record.
    next: u64,
}

impl RecordCheck {
    fn new(fleet: Fleet, name: String) -> RecordCheck {
        RecordCheck {
            fleet,
            name,
            flight: None,
            next: 0,
        }
    }

    /// Whether a record read back can be taken; one that cannot is counted.
    fn holds(&mut self, fields: &[(String, Vec<u8>)]) -> bool {
        let ok = self.check(fields);
        if ok {
            self.next += 1;
        } else {
            self.fleet.rejected(Rejected::Stream);
        }
        ok
    }

    fn check(&mut self, fields: &[(String, Vec<u8>)]) -> bool {
        let Some(seal) = &self.fleet.inner.seal else {
            return true;
        };
        let place = field(fields, "n").and_then(|n| std::str::from_utf8(n).ok());
        let (Some(flight), Some(place), Some(mac)) = (
            field(fields, "f"),
            place.and_then(|n| n.parse::<u64>().ok()),
            field(fields, "s").and_then(|s| <[u8; 32]>::try_from(s).ok()),
        ) else {
            return false;
        };
        if place != self.next || self.flight.as_deref().is_some_and(|f| f != flight) {
            return false;
        }
        let mut parts = vec![self.name.as_bytes()];
        for (name, value) in fields.iter().filter(|(f, _)| f != "s") {
            parts.push(name.as_bytes());
            parts.push(value);
        }
        if seal.mac(Sealed::Stream, &parts) != blake3::Hash::from(mac) {
            return false;
        }
        self.flight = Some(flight.to_vec());
        true
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

/// A follower's side of a stream another replica relays.
pub struct Followed {
    conn: Conn,
    key: CacheKey,
    name: String,
    last: String,
    check: RecordCheck,
    /// The upstream's status.
    pub status: http::StatusCode,
    /// The replayed headers of the answer.
    pub headers: http::HeaderMap,
    /// Where the leader replica's proxy can be reached (its `--advertise`), if it said.
    pub peer: Option<String>,
    quiet_since: Instant,
}

impl Followed {
    /// The records after the last one read, waiting up to a second for one. Silence on a
    /// healthy Redis is no error, however long; a read that fails ends this stream only
    /// (counted, but Redis stays on for the replica's other requests).
    pub async fn next(&mut self) -> Relayed {
        type Records = Vec<(String, Vec<StreamRecord>)>;
        let read = tokio::time::timeout(
            FOLLOW_READ + OP_TIMEOUT,
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
        let fleet = self.check.fleet.clone();
        let records = match read {
            Ok(Ok(records)) => records.unwrap_or_default(),
            Ok(Err(e)) => {
                fleet.count_failure("follow", &e.to_string());
                return Relayed::End(Ending::Lost);
            }
            Err(_) => {
                fleet.count_failure("follow", "timed out");
                return Relayed::End(Ending::Lost);
            }
        };
        let mut events = Vec::new();
        for (_, entries) in records {
            for (id, fields) in entries {
                if let Some(value) = field(&fields, "end") {
                    if !events.is_empty() {
                        // The events first; the end is read again next time.
                        return Relayed::Events(events);
                    }
                    self.last = id;
                    if !self.check.holds(&fields) {
                        continue;
                    }
                    return Relayed::End(Ending::read(value));
                }
                self.last = id;
                if !self.check.holds(&fields) {
                    continue;
                }
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
            && !matches!(fleet.lease_held(&self.key).await, Ok(true))
        {
            // Silent, and nobody leads it any more: its leader died, or lost Redis.
            return Relayed::End(Ending::Lost);
        }
        Relayed::Events(events)
    }
}
