//! The tier shared by the replicas of a fleet, in Redis or Valkey (`--redis`).
//!
//! Everything Redis does here is an optimisation: a Redis error or timeout is a miss, never a
//! failed request. The rooms, one subject each:
//!
//! - `conn`: the connection and its fault rule ([`Unavailable`]);
//! - `layout`: every key name and the events channel ([`Layout`]);
//! - `entries`: stored answers and the fleet's credential salt;
//! - `turns`: cross-replica flights, leases and turns ([`Turn`], [`Lease`]);
//! - `stream`: streams relayed live ([`Relay`], [`Followed`]);
//! - `events`: what replicas and the inspector tell each other ([`Message`](events::Message)),
//!   and the local waiters it wakes;
//! - `budget` (with `lua/budget.lua`): the shared rate budget;
//! - `codec`: the compact form of entries and error answers;
//! - `admin`: the inspector's blocking access ([`Admin`]).
//!
//! Only this module names `redis::`. A follower of a relayed stream whose Redis goes away
//! mid-stream ([`Ending::Lost`]) has passed on events it cannot take back, and only the leader
//! replica has the rest: the engine reads it from the `peer` address named in the stream's
//! head, with the client's request and `Cache-Control: only-if-cached` (the proxy's public
//! API, which joins a flight but never starts one).

mod admin;
mod budget;
mod codec;
mod conn;
mod entries;
mod events;
mod layout;
mod stream;
mod turns;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use tokio::sync::Notify;

pub(crate) use admin::{Admin, AdminError};
pub(crate) use budget::{BudgetTurn, Budgeted, Confirmed};
pub(crate) use conn::Unavailable;
pub use conn::redis_address;
pub(crate) use events::Event;
pub use layout::Layout;
pub(crate) use stream::{Ending, Followed, Relay, Relayed};
pub(crate) use turns::{Lease, Turn};

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

/// A handle on the fleet tier; cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

type Listener = Box<dyn Fn(Event) + Send + Sync>;

struct Inner {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
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
}

impl Fleet {
    /// A fleet tier on the Redis at `url` (`redis://`, `rediss://` for TLS, `unix://`). Only
    /// the URL is checked here; connections are made when first needed. `advertised` is where
    /// the other replicas reach this one's proxy, if they can: a follower of a stream this
    /// replica relays reads the rest from there if Redis goes away (see [`Ending::Lost`]).
    pub fn new(url: &str, advertised: Option<String>) -> Result<Fleet, redis::RedisError> {
        let client = redis::Client::open(url)?;
        Ok(Fleet {
            inner: Arc::new(Inner {
                client,
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
            }),
        })
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
