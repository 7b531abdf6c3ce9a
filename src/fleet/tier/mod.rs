//! The fleet tier on Redis: see [`super`] for what it shares and how it fails.

/// A `redis-server` of a test's own, for the fleet's unit tests.
#[cfg(test)]
#[path = "../../../tests/common/redis_server.rs"]
mod redis_server;

mod admin;
mod budget;
mod codec;
mod conn;
mod entries;
mod events;
mod layout;
mod prefixes;
mod seal;
mod stream;
mod topology;
mod turns;

pub(crate) use admin::{Admin, AdminError};
pub use conn::redis_address;
pub use layout::Layout;
pub(crate) use prefixes::PrefixMark;
pub use seal::FleetSecret;
pub(crate) use seal::{Rejected, Seal};
pub(crate) use stream::{Followed, Relay};
pub use topology::RedisMode;
pub(crate) use turns::Lease;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use tokio::sync::Notify;

pub(crate) use super::replies::Unavailable;

use super::replies::Event;
use crate::key::CacheKey;
use crate::throttle::LogGate;

/// The base URL other replicas reach this one at (`--advertise`), checked: `http` or
/// `https`, a host, and nothing after it (no path, query, fragment or credentials). Given
/// without its trailing `/`.
pub fn advertised_url(url: &str) -> Result<String, String> {
    // The address is not echoed: it could hold a password (clap shows what was given).
    let bad = |why: &str| format!("the advertised address {why}");
    let parsed = reqwest::Url::parse(url).map_err(|_| bad("is not an http:// or https:// URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(bad("must be an http:// or https:// URL with a host"));
    }
    if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad(
            "must name a host and a port only, like http://10.0.0.5:8080",
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("must not hold credentials"));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// What a replica is told of its fleet besides the Redis URL.
#[derive(Debug, Default)]
pub struct FleetSettings {
    /// Where the other replicas reach this one's proxy (`--advertise`): a follower of a stream
    /// this replica relays reads the rest from there if Redis goes away (with a secret only).
    pub advertised: Option<String>,
    /// The fleet secret's keys (`--fleet-secret`): what this replica writes is sealed with
    /// them, and only what holds its seal is trusted.
    pub seal: Option<Seal>,
    /// The largest answer an entry read from Redis may inflate to (`--max-stream`).
    pub max_entry: u64,
    /// Whether `--redis` names a single node or a cluster's, or to ask it (`--redis-mode`).
    pub mode: RedisMode,
}

/// A handle on the fleet tier; cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

type Listener = Box<dyn Fn(Event) + Send + Sync>;

/// The seals of sealed messages heard lately, and when; cleared of stale ones whenever it
/// has doubled since the last time (so each message costs O(1) on average).
#[derive(Default)]
struct Heard {
    at: HashMap<blake3::Hash, Instant>,
    clear_at: usize,
}

struct Inner {
    client: redis::Client,
    /// The server, without any password (for logs).
    shown: String,
    /// What `--redis-mode` asked.
    mode: RedisMode,
    /// Whether the fleet's Redis is a cluster, once known.
    cluster: OnceLock<bool>,
    conn: tokio::sync::Mutex<Option<topology::Conn>>,
    layout: Layout,
    /// This replica's id, in its leases and messages.
    replica: String,
    errors: AtomicU64,
    gate: LogGate,
    /// Redis is left alone until then, after a failure.
    down_until: Mutex<Option<Instant>>,
    /// Local waiters for the end of another replica's lease, by key.
    waiters: Mutex<HashMap<CacheKey, Arc<Notify>>>,
    subscribed: AtomicBool,
    listener: OnceLock<Listener>,
    /// Where the other replicas reach this one's proxy (`--advertise`), named in the streams
    /// it relays.
    advertised: Option<String>,
    /// The fleet secret's keys, if the fleet has one.
    seal: Option<Seal>,
    /// The largest answer an entry may inflate to.
    max_entry: u64,
    /// What was read and not trusted, by [`Rejected::index`].
    rejected: [AtomicU64; Rejected::ALL.len()],
    rejected_gate: LogGate,
    /// The seals of the sealed messages obeyed lately, and when: a message sent again is
    /// obeyed once.
    heard: Mutex<Heard>,
}

impl Fleet {
    /// A fleet tier on the Redis at `url` (`redis://`, `rediss://` for TLS, `unix://`). Only
    /// the URL is checked here; connections are made when first needed.
    pub fn new(url: &str, settings: FleetSettings) -> Result<Fleet, redis::RedisError> {
        conn::provide_tls(url);
        let client = redis::Client::open(url)?;
        let FleetSettings {
            advertised,
            seal,
            max_entry,
            mode,
        } = settings;
        Ok(Fleet {
            inner: Arc::new(Inner {
                shown: client.get_connection_info().addr().to_string(),
                client,
                mode,
                cluster: OnceLock::new(),
                conn: tokio::sync::Mutex::new(None),
                layout: Layout::default(),
                replica: format!("{:016x}", rand::random::<u64>()),
                errors: AtomicU64::new(0),
                gate: LogGate::per_minute(),
                down_until: Mutex::new(None),
                waiters: Mutex::new(HashMap::new()),
                subscribed: AtomicBool::new(false),
                listener: OnceLock::new(),
                advertised,
                seal,
                max_entry,
                rejected: Default::default(),
                rejected_gate: LogGate::per_minute(),
                heard: Mutex::new(Heard::default()),
            }),
        })
    }

    /// Whether the fleet has a secret: what Redis holds is trusted only when sealed with it.
    pub fn has_secret(&self) -> bool {
        self.inner.seal.is_some()
    }

    /// The credential salt the fleet secret gives, if there is one (then Redis never holds it).
    pub fn secret_salt(&self) -> Option<[u8; 32]> {
        self.inner.seal.as_ref().map(Seal::salt)
    }

    /// A token that lets this replica ask the replica receiving the stream under `key` for
    /// the rest of it, on behalf of `partition`; `None` without a fleet secret (then no
    /// replica is asked).
    pub fn peer_token(&self, key: &CacheKey, partition: &crate::key::Partition) -> Option<String> {
        let seal = self.inner.seal.as_ref()?;
        Some(seal.peer_token(key, partition, std::time::SystemTime::now()))
    }

    /// The partition a peer's token speaks for, if it is a valid token of this fleet for
    /// `key`; one that is not is counted.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub fn check_peer_token(&self, key: &CacheKey, token: &str) -> Option<crate::key::Partition> {
        let seal = self.inner.seal.as_ref()?;
        let partition = seal.check_peer_token(key, token, std::time::SystemTime::now());
        if partition.is_none() {
            self.rejected(Rejected::PeerToken);
        }
        partition
    }

    /// What was read from Redis and not trusted so far, by kind.
    pub fn rejections(&self) -> [(&'static str, u64); Rejected::ALL.len()] {
        Rejected::ALL.map(|kind| {
            let n = self.inner.rejected[kind.index()].load(Ordering::Relaxed);
            (kind.as_str(), n)
        })
    }

    /// Counts a record or message not trusted, and logs it at most once a minute. Redis stays
    /// on: one bad value says nothing of the others.
    pub(super) fn rejected(&self, kind: Rejected) {
        self.inner.rejected[kind.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(held) = self.inner.rejected_gate.open() {
            tracing::warn!(
                kind = kind.as_str(),
                similar_since = held,
                "ignored a value in Redis this replica cannot trust (not sealed with the fleet \
                 secret, malformed, or out of bounds)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::advertised_url;

    #[test]
    fn an_advertised_address_names_a_host_and_port_and_nothing_else() {
        assert_eq!(
            advertised_url("http://10.0.0.5:8080/").as_deref(),
            Ok("http://10.0.0.5:8080")
        );
        assert_eq!(
            advertised_url("https://replica-a.internal").as_deref(),
            Ok("https://replica-a.internal")
        );
        for bad in [
            "",
            "10.0.0.5:8080",
            "ftp://10.0.0.5",
            "http://10.0.0.5:8080/v1",
            "http://10.0.0.5:8080/?a=1",
            "http://user:secret@10.0.0.5:8080",
        ] {
            let err = advertised_url(bad).expect_err(bad);
            assert!(!err.contains("secret"), "never echoes a password: {err}");
        }
    }
}
