//! The fleet tier: several replicas sharing answers and flights through Redis (or Valkey).
//!
//! With `--redis URL` every replica keeps its own memory tier (and, if it has one, its own
//! SQLite file), and between the two it reads and writes one shared tier in Redis. A request
//! that misses memory looks in Redis before the local disk; an answer fetched from the
//! upstream is written to Redis before its flight ends. Identical requests on different
//! replicas share one upstream call through a **lease**.
//!
//! # Key layout
//!
//! Everything lives under `llm-dedup:v{KEY_VERSION}:` (old keys simply stop matching when the
//! key layout changes):
//!
//! - `salt`: the credential salt of the fleet, 32 bytes, created once with `SET NX` (the first
//!   replica's own salt), so every replica computes the same keys.
//! - `e:{key}`: a stored answer in the compact form of `codec.rs`, expiring with it (`PX`). Namespaces
//!   are part of the key already.
//! - `lease:{key}`: the replica leading the upstream call for `key` (`SET NX PX`, renewed
//!   every third of [`LEASE`] while the call runs, deleted when it ends).
//! - `err:{key}:{partition}`: an error answer for the followers of one credential partition
//!   on other replicas, kept [`REFUSAL_KEPT`]; never served as an entry.
//! - `s:{key}`: a streamed answer in flight, shared live: a Redis Stream whose first record
//!   is the head (status and replayed headers, and as `peer` the leader's `--advertise`
//!   address if it has one), then one record per event, then the end
//!   (`ok` or `err`); it expires [`STREAM_KEPT`] after its last record. At most
//!   `--max-stream` bytes are relayed: past that, the end says `cut`.
//! - `budget:{partition}:{what}`: the rate budget of one credential partition, shared by the
//!   replicas (`budget.rs`): `pause` after a refusal, what the upstream said is `left`, the
//!   pace's GCRA state (`rpm`), and the window's accounting and the budget's shape (`win`).
//! - channel `events`: `"{replica} live {key}"` when a stream starts,
//!   `"{replica} done {key}"` when a lease ends, `"{replica} replaced
//!   {key}"` after a `no-cache` refresh, `"{replica} purge all"` and `"{replica} purge {key}"`
//!   from the inspector.
//!
//! # Cross-replica flights
//!
//! The leader of a local flight takes its turn ([`Fleet::take_turn`]) before calling the
//! upstream: if Redis has the answer, that is the outcome; if no lease is held, it takes the
//! lease and calls; otherwise it waits for a `done` event (or polls every [`POLL`], in case
//! the event is missed) and looks again. A leader that dies stops renewing its lease; once it
//! expires, the next waiter to look takes it over. A lease that shows nothing (no answer, no
//! stream) for longer than the upstream's first-byte timeout is waited for no longer: its
//! holder hangs (or someone planted it), and the waiter calls on its own. An error answer reaches waiters of the same
//! partition through `err:`; waiters of another partition take their own turn.
//!
//! # Faults
//!
//! Every call has a short timeout ([`OP_TIMEOUT`]). A failure is counted
//! (`llm_dedup_redis_errors_total`), logged at most once a minute, and turns Redis off for
//! [`BACKOFF`]: meanwhile each replica uses its own tiers and flights only, and then tries
//! again (the connection reconnects by itself). No request fails because Redis did.
//!
//! A follower of a relayed stream whose Redis goes away mid-stream ([`Ending::Lost`]) has
//! passed on events it cannot take back, and only the leader replica has the rest: the engine
//! reads it from the `peer` address named in the stream's head, with the client's request and
//! `Cache-Control: only-if-cached` (the proxy's public API, which joins a flight but never
//! starts one).

mod budget;
mod codec;
mod stream;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Notify;

pub use budget::{BudgetTurn, Budgeted, Confirmed, Said};
pub use codec::{decode_entry, encode_entry};
pub use stream::{Ending, Followed, Relay, Relayed};

use crate::answer::Refusal;
use crate::entry::{StoredAnswer, unix_ms};
use crate::key::{CacheKey, KEY_VERSION, Partition};
use crate::throttle::LogGate;

/// Longest wait for one Redis call.
pub const OP_TIMEOUT: Duration = Duration::from_millis(250);
/// Longest wait to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long Redis is left alone after a failure.
pub const BACKOFF: Duration = Duration::from_secs(1);
/// How long a lease lasts unless renewed.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often a waiting replica looks again without an event.
pub const POLL: Duration = Duration::from_millis(200);
/// How long an error answer waits for followers of its partition.
pub const REFUSAL_KEPT: Duration = Duration::from_secs(10);
/// How long a shared stream stays readable after its last record.
pub const STREAM_KEPT: Duration = Duration::from_secs(60);
/// How long a follower waits for a shared stream's next record before it looks again.
const STREAM_BLOCK: Duration = Duration::from_secs(1);
/// How long a shared stream may go silent, its lease gone, before a follower ends it.
const STREAM_ORPHANED: Duration = Duration::from_secs(15);

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

/// What another replica (or the inspector) said happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The answer under this key was replaced (a `no-cache` refresh): copies held here are old.
    Replaced(CacheKey),
    /// These entries were purged.
    Purged(CacheKey),
    /// Every entry was purged.
    PurgedAll,
}

/// What a leader's turn came to.
pub enum Turn {
    /// This replica leads: call the upstream, then [`Lease::finish`].
    Lead(Lease),
    /// Another replica stored the answer.
    Found(StoredAnswer),
    /// Another replica's call for the same partition was refused with this answer.
    Refused(Refusal),
    /// Another replica is receiving a streamed answer: follow it live.
    Live(Followed),
    /// Redis cannot be used now: go on alone.
    Alone,
}

/// A handle on the fleet tier; cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

type Listener = Box<dyn Fn(Event) + Send + Sync>;

struct Inner {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    prefix: String,
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
                prefix: format!("llm-dedup:v{KEY_VERSION}:"),
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

    /// The fleet's credential salt: the one in Redis, or `ours` stored there if there is none
    /// yet. Blocking, with a short timeout; `None` if Redis cannot be reached.
    pub fn shared_salt(&self, ours: &[u8; 32]) -> Option<[u8; 32]> {
        let inner = &self.inner;
        let read = || -> redis::RedisResult<Vec<u8>> {
            let mut conn = inner.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
            conn.set_read_timeout(Some(CONNECT_TIMEOUT))?;
            conn.set_write_timeout(Some(CONNECT_TIMEOUT))?;
            let key = format!("{}salt", inner.prefix);
            let _: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&ours[..])
                .arg("NX")
                .query(&mut conn)?;
            redis::cmd("GET").arg(&key).query(&mut conn)
        };
        match read() {
            Ok(bytes) => match <[u8; 32]>::try_from(bytes.as_slice()) {
                Ok(salt) => Some(salt),
                Err(_) => {
                    self.failed("salt", "the fleet's salt in Redis is not 32 bytes");
                    None
                }
            },
            Err(e) => {
                self.failed("salt", &e.to_string());
                None
            }
        }
    }

    /// Calls `listener` with every event another replica publishes (from a task of its own).
    pub fn on_event(&self, listener: impl Fn(Event) + Send + Sync + 'static) {
        let _ = self.inner.listener.set(Box::new(listener));
    }

    /// Redis calls that failed or timed out.
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// The stored answer under `key`, if Redis has one that has not expired.
    pub async fn get(&self, key: &CacheKey) -> Result<Option<StoredAnswer>, ()> {
        let name = self.entry_name(key);
        let bytes: Option<Vec<u8>> = self
            .call("get", |mut c| async move { c.get(name).await })
            .await?;
        Ok(bytes.and_then(|b| self.fresh(*key, &b)))
    }

    /// The stored answers under `keys`, in one trip; `None` for each one missing (all of them
    /// when Redis cannot be used).
    pub async fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<StoredAnswer>> {
        if keys.is_empty() {
            return Vec::new();
        }
        let names: Vec<String> = keys.iter().map(|k| self.entry_name(k)).collect();
        let read: Result<Vec<Option<Vec<u8>>>, ()> = self
            .call("mget", |mut c| async move {
                redis::cmd("MGET").arg(&names).query_async(&mut c).await
            })
            .await;
        match read {
            Ok(values) if values.len() == keys.len() => keys
                .iter()
                .zip(values)
                .map(|(key, v)| v.and_then(|b| self.fresh(*key, &b)))
                .collect(),
            _ => vec![None; keys.len()],
        }
    }

    /// Writes `entry`, to expire with it.
    pub async fn put(&self, entry: &StoredAnswer) {
        let left = entry.expires_at.saturating_sub(unix_ms(SystemTime::now()));
        let Ok(ms) = u64::try_from(left) else { return };
        if ms == 0 {
            return;
        }
        self.set_px(self.entry_name(&entry.key), encode_entry(entry), ms)
            .await;
    }

    /// `SET name value PX ms`.
    async fn set_px(&self, name: String, value: Vec<u8>, ms: u64) {
        let _: Result<(), ()> = self
            .call("set", |mut c| async move {
                redis::cmd("SET")
                    .arg(name)
                    .arg(value)
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut c)
                    .await
            })
            .await;
    }

    /// Tells the other replicas that the answer under `key` was replaced.
    pub fn replaced(&self, key: &CacheKey) {
        self.publish(format!("replaced {}", key.to_hex()));
    }

    /// Waits for this replica's turn to call the upstream for `key` on behalf of `partition`
    /// (see the module documentation). A lease held by another replica that shows nothing
    /// for `patience` (no answer, no stream: its holder hangs, or the lease was planted) is
    /// waited for no longer: this replica then calls on its own ([`Turn::Alone`]).
    pub async fn take_turn(
        &self,
        key: &CacheKey,
        partition: &Partition,
        patience: Duration,
    ) -> Turn {
        let notify = self.waiter(key);
        let mut seen_other = false;
        let since = tokio::time::Instant::now();
        let turn = loop {
            let notified = notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            match self.get(key).await {
                Err(()) => break Turn::Alone,
                Ok(Some(entry)) => break Turn::Found(entry),
                Ok(None) => {}
            }
            if seen_other {
                // Only an answer refused while this replica waited is its business.
                if let Ok(Some(refusal)) = self.refusal(key, partition).await {
                    break Turn::Refused(refusal);
                }
            }
            match self.try_lease(key).await {
                Err(()) => break Turn::Alone,
                Ok(true) => break Turn::Lead(Lease::start(self.clone(), *key)),
                Ok(false) => seen_other = true,
            }
            if let Some(followed) = self.follow(key).await {
                break Turn::Live(followed);
            }
            if since.elapsed() > patience {
                tracing::info!(%key, waited = ?since.elapsed(), "another replica's lease showed nothing for longer than the upstream timeout: calling the upstream from here");
                break Turn::Alone;
            }
            let _ = tokio::time::timeout(POLL, notified).await;
        };
        self.forget_waiter(key, &notify);
        turn
    }

    /// Keeps `refusal` for followers of `partition` on other replicas.
    pub async fn share_refusal(&self, key: &CacheKey, partition: &Partition, refusal: &Refusal) {
        let ms = REFUSAL_KEPT.as_millis() as u64;
        self.set_px(
            self.refusal_name(key, partition),
            codec::encode_refusal(refusal),
            ms,
        )
        .await;
    }

    async fn refusal(&self, key: &CacheKey, partition: &Partition) -> Result<Option<Refusal>, ()> {
        let name = self.refusal_name(key, partition);
        let bytes: Option<Vec<u8>> = self
            .call("get", |mut c| async move { c.get(name).await })
            .await?;
        Ok(bytes.and_then(|b| codec::decode_refusal(&b)))
    }

    async fn lease_exists(&self, key: &CacheKey) -> Result<bool, ()> {
        let name = self.lease_name(key);
        self.call("lease", |mut c| async move { c.exists(name).await })
            .await
    }

    /// Takes the lease on `key` if nobody holds it. Taking it also removes the stream an
    /// earlier flight of the key relayed (kept a minute after its end), in the same step, so
    /// that no waiter follows an old stream as if it were this flight's.
    async fn try_lease(&self, key: &CacheKey) -> Result<bool, ()> {
        let (lease, stream) = (self.lease_name(key), self.stream_name(key));
        let me = self.inner.replica.clone();
        let ms = LEASE.as_millis() as u64;
        let taken: i64 = self
            .run_script("lease", &TAKE_LEASE, |s| {
                s.key(lease).key(stream).arg(me).arg(ms);
            })
            .await?;
        Ok(taken == 1)
    }

    /// Runs `script` on the lease of `key` if this replica still holds it.
    async fn on_own_lease(&self, key: &CacheKey, script: &'static LazyLock<redis::Script>) {
        let (name, me) = (self.lease_name(key), self.inner.replica.clone());
        let ms = LEASE.as_millis() as u64;
        let _: Result<i64, ()> = self
            .run_script("lease", script, |s| {
                s.key(name).arg(me).arg(ms);
            })
            .await;
    }

    fn publish(&self, what: String) {
        let fleet = self.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let channel = fleet.channel();
            let message = format!("{} {what}", fleet.inner.replica);
            let _: Result<i64, ()> = fleet
                .call("publish", |mut c| async move {
                    c.publish(channel, message).await
                })
                .await;
        });
    }

    /// Starts listening to the fleet's events, once.
    fn subscribe(&self) {
        if self.inner.subscribed.load(Ordering::Relaxed)
            || self.inner.subscribed.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.subscribed.store(false, Ordering::SeqCst);
            return;
        };
        // Weak: the task ends when the last handle on the fleet is gone.
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            use futures_util::StreamExt;
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let fleet = Fleet { inner };
                let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
                    let mut pubsub = fleet.inner.client.get_async_pubsub().await?;
                    pubsub.subscribe(fleet.channel()).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                })
                .await;
                let mut pubsub = match connected {
                    Ok(Ok(pubsub)) => pubsub,
                    Ok(Err(e)) => {
                        fleet.failed("subscribe", &e.to_string());
                        drop(fleet);
                        tokio::time::sleep(BACKOFF).await;
                        continue;
                    }
                    Err(_) => {
                        fleet.failed("subscribe", "timed out");
                        drop(fleet);
                        tokio::time::sleep(BACKOFF).await;
                        continue;
                    }
                };
                let weak_inner = Arc::downgrade(&fleet.inner);
                drop(fleet);
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let Some(inner) = weak_inner.upgrade() else {
                        return;
                    };
                    let payload: String = message.get_payload().unwrap_or_default();
                    Fleet { inner }.heard(&payload);
                }
                // The connection dropped: every waiter looks again, then we reconnect.
                if let Some(inner) = weak.upgrade() {
                    Fleet { inner }.wake_all();
                }
                tokio::time::sleep(BACKOFF).await;
            }
        });
    }

    /// Handles one event message.
    fn heard(&self, payload: &str) {
        let mut words = payload.split(' ');
        let (Some(from), Some(kind), Some(arg)) = (words.next(), words.next(), words.next()) else {
            return;
        };
        let key = CacheKey::from_hex(arg);
        if kind == "done" || kind == "live" {
            if let Some(key) = key {
                let waiter = self
                    .inner
                    .waiters
                    .lock()
                    .ok()
                    .and_then(|w| w.get(&key).cloned());
                if let Some(waiter) = waiter {
                    waiter.notify_waiters();
                }
            }
            return;
        }
        if from == self.inner.replica {
            return;
        }
        let event = match (kind, arg, key) {
            ("replaced", _, Some(key)) => Event::Replaced(key),
            ("purge", "all", _) => Event::PurgedAll,
            ("purge", _, Some(key)) => Event::Purged(key),
            _ => return,
        };
        if let Some(listener) = self.inner.listener.get() {
            listener(event);
        }
    }

    fn wake_all(&self) {
        if let Ok(waiters) = self.inner.waiters.lock() {
            for waiter in waiters.values() {
                waiter.notify_waiters();
            }
        }
    }

    fn waiter(&self, key: &CacheKey) -> Arc<Notify> {
        let mut waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters.entry(*key).or_default().clone()
    }

    fn forget_waiter(&self, key: &CacheKey, notify: &Arc<Notify>) {
        let mut waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        // Two references: the map's and ours; nobody else waits on this key.
        if waiters.get(key).is_some_and(|n| Arc::ptr_eq(n, notify))
            && Arc::strong_count(notify) == 2
        {
            waiters.remove(key);
        }
    }

    /// An entry read from Redis, if it decodes and has not expired.
    fn fresh(&self, key: CacheKey, bytes: &[u8]) -> Option<StoredAnswer> {
        let entry = decode_entry(key, bytes);
        if entry.is_none() {
            self.failed(
                "decode",
                "an entry in Redis could not be read; treated as a miss",
            );
        }
        entry.filter(|e| e.is_fresh(SystemTime::now()))
    }

    /// Runs one Redis call with the connection, under [`OP_TIMEOUT`]; a failure is counted,
    /// logged at most once a minute, and turns Redis off for [`BACKOFF`].
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ()>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        // Whoever uses the fleet's tier hears what the other replicas replace or purge.
        self.subscribe();
        let conn = self.connection().await?;
        match tokio::time::timeout(OP_TIMEOUT, f(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.failed(what, &e.to_string());
                Err(())
            }
            Err(_) => {
                self.failed(what, "timed out");
                Err(())
            }
        }
    }

    /// Runs `script` (its hash computed once) with the keys and arguments `fill` adds, as one
    /// call under the rules of [`Fleet::call`].
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &'static LazyLock<redis::Script>,
        fill: impl FnOnce(&mut redis::ScriptInvocation<'static>),
    ) -> Result<T, ()> {
        let mut invocation = script.prepare_invoke();
        fill(&mut invocation);
        self.call(what, |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    async fn connection(&self) -> Result<ConnectionManager, ()> {
        let down = self.inner.down_until.lock().ok().and_then(|d| *d);
        if down.is_some_and(|until| Instant::now() < until) {
            return Err(());
        }
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1);
        let made = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.inner.client.get_connection_manager_with_config(config),
        )
        .await;
        match made {
            Ok(Ok(conn)) => {
                *slot = Some(conn.clone());
                Ok(conn)
            }
            Ok(Err(e)) => {
                self.failed("connect", &e.to_string());
                Err(())
            }
            Err(_) => {
                self.failed("connect", "timed out");
                Err(())
            }
        }
    }

    fn failed(&self, what: &str, error: &str) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut down) = self.inner.down_until.lock() {
            *down = Some(Instant::now() + BACKOFF);
        }
        if let Some(held) = self.inner.gate.open() {
            tracing::warn!(
                call = what,
                error,
                failures_since_last_line = held,
                "Redis call failed; this replica uses its own tiers, flights and budget until \
                 Redis answers again"
            );
        }
    }

    fn entry_name(&self, key: &CacheKey) -> String {
        format!("{}e:{}", self.inner.prefix, key.to_hex())
    }

    fn lease_name(&self, key: &CacheKey) -> String {
        format!("{}lease:{}", self.inner.prefix, key.to_hex())
    }

    fn refusal_name(&self, key: &CacheKey, partition: &Partition) -> String {
        let partition = blake3::Hash::from_bytes(*partition.as_bytes()).to_hex();
        format!("{}err:{}:{}", self.inner.prefix, key.to_hex(), partition)
    }

    fn channel(&self) -> String {
        format!("{}events", self.inner.prefix)
    }
}

/// Takes a free lease (`KEYS[1]`) and drops the key's old relayed stream (`KEYS[2]`).
static TAKE_LEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then \
           redis.call('DEL', KEYS[2]) return 1 else return 0 end",
    )
});

/// Renews the lease while it lives.
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end",
    )
});

/// Deletes the lease if it is still ours.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           return redis.call('DEL', KEYS[1]) else return 0 end",
    )
});

/// This replica's lease on one key: renewed in the background until [`Lease::finish`] (or
/// until it is dropped, when the leader died: the lease then expires and another replica
/// takes over).
pub struct Lease {
    fleet: Fleet,
    key: CacheKey,
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    fn start(fleet: Fleet, key: CacheKey) -> Lease {
        let renewing = fleet.clone();
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                renewing.on_own_lease(&key, &RENEW).await;
            }
        });
        Lease {
            fleet,
            key,
            renewer,
        }
    }

    /// Ends the lease and tells the waiters on other replicas to look.
    pub async fn finish(self) {
        self.renewer.abort();
        self.fleet.on_own_lease(&self.key, &RELEASE).await;
        self.fleet.publish(format!("done {}", self.key.to_hex()));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
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
