//! Building an engine: every setting with its default, and what `build` opens.

#[cfg(feature = "sqlite")]
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::joining::{FleetOptions, Joined};
use super::{
    DEFAULT_PREFIX_WAIT, DEFAULT_VERIFY_WINDOW, Dedup, Engine, KnownKeys, Verified, bucket, embed,
};
use crate::embeddings::EmbedSettings;
use crate::error::{Error, ErrorKind};
use crate::fleet::Event;
#[cfg(feature = "redis")]
use crate::fleet::{FleetSecret, RedisMode};
use crate::governor::{Governor, GovernorSettings};
use crate::inflight::InFlight;
use crate::key::{CredentialHeaders, KeyHeaders, KeyPolicy, MAX_BUCKET};
use crate::memory::MemoryTier;
use crate::metrics::Metrics;
use crate::prices::PriceTable;
use crate::store::DiskStore;
#[cfg(feature = "sqlite")]
use crate::store::StoreLimits;
use crate::upstream::{Timeouts, Upstream};

/// Builds a [`Dedup`] engine. Its `Debug` form names the upstream and Redis without any
/// user or password in their URLs, and never the fleet secret.
#[derive(Clone)]
#[must_use]
pub struct DedupBuilder {
    upstream: String,
    #[cfg(feature = "sqlite")]
    database: Option<PathBuf>,
    memory_bytes: u64,
    ttl: Duration,
    max_body: usize,
    max_stream_bytes: usize,
    shared_cache: bool,
    credentials: CredentialHeaders,
    key_headers: KeyHeaders,
    verify_window: Duration,
    key_policy: KeyPolicy,
    timeouts: Timeouts,
    #[cfg(feature = "sqlite")]
    store_limits: StoreLimits,
    governor: GovernorSettings,
    embeddings: EmbedSettings,
    fleet: FleetOptions,
    prefix_wait: Duration,
    bucket: u8,
    prices: PriceTable,
}

/// `url` without the user and password it may hold (as logs and debug output may show it);
/// a text that is no URL is not shown at all.
pub(super) fn without_credentials(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => "(not a URL)".to_owned(),
    }
}

impl std::fmt::Debug for DedupBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = f.debug_struct("DedupBuilder");
        shown.field("upstream", &without_credentials(&self.upstream));
        #[cfg(feature = "sqlite")]
        shown.field("database", &self.database);
        shown
            .field("memory_bytes", &self.memory_bytes)
            .field("ttl", &self.ttl)
            .field("max_body", &self.max_body)
            .field("max_stream_bytes", &self.max_stream_bytes)
            .field("shared_cache", &self.shared_cache)
            .field("credentials", &self.credentials)
            .field("key_headers", &self.key_headers)
            .field("verify_window", &self.verify_window)
            .field("timeouts", &self.timeouts)
            .field("governor", &self.governor)
            .field("embeddings", &self.embeddings)
            .field("fleet", &self.fleet)
            .field("prefix_wait", &self.prefix_wait)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl Default for DedupBuilder {
    fn default() -> Self {
        DedupBuilder {
            upstream: "https://api.openai.com".into(),
            #[cfg(feature = "sqlite")]
            database: None,
            memory_bytes: 256 * 1024 * 1024,
            ttl: Duration::from_secs(30 * 24 * 3600),
            max_body: 64 * 1024 * 1024,
            max_stream_bytes: 32 * 1024 * 1024,
            shared_cache: false,
            credentials: CredentialHeaders::default(),
            key_headers: KeyHeaders::default(),
            verify_window: DEFAULT_VERIFY_WINDOW,
            key_policy: KeyPolicy::default(),
            timeouts: Timeouts::default(),
            #[cfg(feature = "sqlite")]
            store_limits: StoreLimits::default(),
            governor: GovernorSettings::default(),
            embeddings: EmbedSettings::default(),
            fleet: FleetOptions::default(),
            prefix_wait: DEFAULT_PREFIX_WAIT,
            bucket: 1,
            prices: PriceTable::built_in(),
        }
    }
}

impl DedupBuilder {
    /// The upstream base URL. By default, `https://api.openai.com`.
    pub fn upstream(mut self, url: impl Into<String>) -> Self {
        self.upstream = url.into();
        self
    }

    /// Keep answers in the SQLite database at `path` as well as in memory. By default, there
    /// is no database: answers live in memory only and are gone when the engine is.
    #[cfg(feature = "sqlite")]
    pub fn database(mut self, path: impl Into<PathBuf>) -> Self {
        self.database = Some(path.into());
        self
    }

    /// Bound of the memory tier in bytes. By default, 256 MiB.
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes;
        self
    }

    /// How long a stored answer is served, unless a request sets `llm-dedup-ttl`. By default,
    /// 30 days; longer than [`MAX_TTL`](crate::MAX_TTL) (ten years) is read as that.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.min(crate::controls::MAX_TTL);
        self
    }

    /// Largest request body accepted, in bytes. By default, 64 MiB.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Largest streamed answer stored, in bytes; a longer stream is passed on live but not
    /// stored. By default, 32 MiB.
    pub fn max_stream_bytes(mut self, bytes: usize) -> Self {
        self.max_stream_bytes = bytes;
        self
    }

    /// Share one cache between all credentials. By default, this is disabled: each
    /// credential (API key, organization, project) has its own entries.
    pub fn shared_cache(mut self, shared: bool) -> Self {
        self.shared_cache = shared;
        self
    }

    /// With a shared cache, how long an upstream 2xx answer to a request of one credential
    /// lets that credential be answered from the cache (see [`Dedup`]'s "Shared cache"). By
    /// default, [`DEFAULT_VERIFY_WINDOW`] (10 minutes).
    pub fn verify_window(mut self, window: Duration) -> Self {
        self.verify_window = window;
        self
    }

    /// The longest an upstream call waits while another request in flight writes a prompt
    /// prefix it shares in the provider's cache (until that request's answer starts, or it
    /// fails): see README, "Prefixes the provider caches". Zero turns the waits off. By
    /// default, [`DEFAULT_PREFIX_WAIT`] (2 seconds).
    pub fn prefix_wait(mut self, wait: Duration) -> Self {
        self.prefix_wait = wait;
        self
    }

    /// How many answers to keep under one key for *sampled* requests (a `temperature` absent
    /// or above 0, a `top_p` below 1, or `n` above 1), 1 to [`MAX_BUCKET`]: while a key holds
    /// fewer, a request goes upstream and its answer is added; once it holds that many, a
    /// request is answered with one of them at random. A request's `llm-dedup-bucket` header
    /// overrides it. By default 1: one answer per key, whatever the request.
    pub fn bucket(mut self, answers: u8) -> Self {
        self.bucket = answers;
        self
    }

    /// The request headers that identify a caller, hashed into its credential partition. By
    /// default, [`CredentialHeaders::default`].
    pub fn credential_headers(mut self, headers: CredentialHeaders) -> Self {
        self.credentials = headers;
        self
    }

    /// The request headers whose values change the answer, so they enter the key. By
    /// default, [`KeyHeaders::default`].
    pub fn key_headers(mut self, headers: KeyHeaders) -> Self {
        self.key_headers = headers;
        self
    }

    /// Which request fields are left out of the key. By default, [`KeyPolicy::default`].
    pub fn key_policy(mut self, policy: KeyPolicy) -> Self {
        self.key_policy = policy;
        self
    }

    /// Largest total size of answers kept in the database; past it, the least recently used
    /// entries are removed at the next sweep. By default, there is no bound.
    #[cfg(feature = "sqlite")]
    pub fn max_disk(mut self, bytes: Option<u64>) -> Self {
        self.store_limits.max_disk = bytes;
        self
    }

    /// How often expired entries are removed from the database and the size bound enforced.
    /// By default, every 60 seconds.
    #[cfg(feature = "sqlite")]
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.store_limits.sweep_interval = every;
        self
    }

    /// Pacing under the provider's limits and retries of its refusals. By default,
    /// [`GovernorSettings::default`]: budgets learned from the upstream's headers.
    pub fn governor(mut self, settings: GovernorSettings) -> Self {
        self.governor = settings;
        self
    }

    /// How embedding requests are merged into upstream calls. By default,
    /// [`EmbedSettings::default`]: a 5 ms window, at most 2048 inputs and 300,000 tokens a call.
    pub fn embeddings(mut self, settings: EmbedSettings) -> Self {
        self.embeddings = settings;
        self
    }

    /// Share answers, flights and purges with the other replicas using the Redis (or Valkey)
    /// at `url` (`redis://`, `rediss://`): see README, "Several replicas". By default, there is none.
    #[cfg(feature = "redis")]
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.fleet.redis = Some(url.into());
        self
    }

    /// Where the other replicas of the fleet reach this engine's proxy (`http://10.0.0.5:8080`),
    /// with [`DedupBuilder::redis`] and [`DedupBuilder::fleet_secret`]. A replica following a
    /// stream this one receives, relayed through Redis, reads the rest of it from there if
    /// Redis goes away mid-stream, with a token made with the fleet secret (never the
    /// client's request). By default, none: such a stream is cut for those followers.
    #[cfg(feature = "redis")]
    pub fn advertise(mut self, url: impl Into<String>) -> Self {
        self.fleet.advertise = Some(url.into());
        self
    }

    /// The secret every replica of the fleet shares, with [`DedupBuilder::redis`]: what this
    /// engine writes to Redis is sealed with it, and only what holds its seal is trusted
    /// (answers, error answers, leases, relayed streams, messages); the credential salt is
    /// derived from it rather than kept in Redis, and a replica reads a stream's rest from
    /// the replica receiving it (if Redis goes away) with a token made with it. By default
    /// there is none, and Redis is trusted entirely: see README, "What the fleet trusts".
    #[cfg(feature = "redis")]
    pub fn fleet_secret(mut self, secret: FleetSecret) -> Self {
        self.fleet.secret = Some(secret);
        self
    }

    /// Whether the Redis of [`DedupBuilder::redis`] is a single node or a node of a cluster
    /// (Redis Cluster, Valkey cluster). By default [`RedisMode::Auto`]: the node is asked at
    /// the first connection (`INFO cluster`).
    #[cfg(feature = "redis")]
    pub fn redis_mode(mut self, mode: RedisMode) -> Self {
        self.fleet.mode = mode;
        self
    }

    /// The prices that value what the cache saves. By default, [`PriceTable::built_in`].
    pub fn prices(mut self, prices: PriceTable) -> Self {
        self.prices = prices;
        self
    }

    /// Upstream timeouts: to connect, to an answer's first byte, and of silence within an
    /// answer. By default, [`Timeouts::default`].
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// As [`DedupBuilder::build`], for async code (within a Tokio runtime): opening and
    /// migrating the database and the first calls to Redis run on a blocking thread, never on
    /// the caller's, and with `DedupBuilder::redis` the build fails when Redis cannot be
    /// reached or its credential salt cannot be read (`build` starts anyway, keying alone
    /// until Redis is back, as the proxy does).
    pub async fn build_async(self) -> Result<Dedup, Error> {
        let redis = self.fleet.shown();
        let (dedup, salted) = tokio::task::spawn_blocking(move || self.assemble())
            .await
            .map_err(|e| Error::with_source(ErrorKind::Cache, "building the engine failed", e))??;
        if let (Some(fleet), Some(redis)) = (&dedup.engine.fleet, redis)
            && (!salted || fleet.connect().await.is_err())
        {
            return Err(Error::new(
                ErrorKind::Cache,
                format!("Redis at {redis} cannot be reached (the log says why)"),
            ));
        }
        Ok(dedup)
    }

    /// Opens the database (if any) and builds the engine. It blocks while it does (in async
    /// code, [`DedupBuilder::build_async`] does not); with a Redis that cannot be reached it
    /// logs a warning and builds an engine that goes on alone until Redis is back.
    pub fn build(self) -> Result<Dedup, Error> {
        self.assemble().map(|(dedup, _)| dedup)
    }

    /// Opens the database, if one was given.
    #[cfg(feature = "sqlite")]
    fn open_disk(&self) -> Result<Option<DiskStore>, Error> {
        // Answers waiting for the disk count on top of the memory bound: an eighth of it.
        let limits = StoreLimits {
            max_queued_bytes: (self.memory_bytes / 8).max(4 * 1024 * 1024),
            ..self.store_limits
        };
        let Some(path) = &self.database else {
            return Ok(None);
        };
        Ok(Some(DiskStore::open(path, limits)?))
    }

    /// Without the `sqlite` feature there is no database: answers live in memory.
    #[cfg(not(feature = "sqlite"))]
    fn open_disk(&self) -> Result<Option<DiskStore>, Error> {
        Ok(None)
    }

    /// Builds the engine, saying whether it keys requests as the fleet does (it read the
    /// fleet's credential salt, or has no fleet).
    fn assemble(self) -> Result<(Dedup, bool), Error> {
        if !(1..=MAX_BUCKET).contains(&self.bucket) {
            return Err(Error::new(
                ErrorKind::Cache,
                format!(
                    "a bucket holds 1 to {MAX_BUCKET} answers, not {}",
                    self.bucket
                ),
            ));
        }
        let metrics = Metrics::new();
        let upstream = Upstream::new(&self.upstream, self.timeouts)?
            .counting_timeouts(metrics.upstream_timeouts.clone());
        let disk = self.open_disk()?;
        let local_salt = match &disk {
            Some(d) => *d.salt(),
            // Without a database, entries die with the engine, and so may the salt.
            None => rand::random(),
        };
        let Joined {
            fleet,
            salt,
            salted,
        } = self.fleet.join(self.max_stream_bytes as u64, local_salt)?;
        if let (Some(fleet), Ok(runtime)) = (&fleet, tokio::runtime::Handle::try_current()) {
            // Connect now, so that whether the Redis is one node or a cluster is known (and
            // logged) before the first request; a failure is the fault rule's, as any.
            let fleet = fleet.clone();
            runtime.spawn(async move { fleet.connect().await });
        }
        let memory = MemoryTier::new(self.memory_bytes);
        if let Some(fleet) = &fleet {
            // Another replica replaced or purged entries: copies held here are old.
            let (memory, disk) = (memory.clone(), disk.clone());
            fleet.on_event(move |event| forget(&memory, disk.as_ref(), event));
        }
        if let Some(disk) = &disk {
            // Another process purged entries: drop the memory tier so they stop being served
            // (what is still on disk comes back on the next read).
            let memory = memory.clone();
            disk.on_external_purge(move || memory.clear());
        }
        let upstream_identity = upstream.identity(&salt);
        let dedup = Dedup {
            engine: Arc::new(Engine {
                upstream_identity,
                upstream,
                memory,
                disk,
                // A request never waits on a flight longer than a fresh call would take.
                flights: InFlight::stale_after(self.timeouts.first_byte),
                salt,
                credentials: self.credentials,
                key_headers: self.key_headers,
                shared_cache: self.shared_cache,
                fleet,
                verified: self.shared_cache.then(|| Verified::new(self.verify_window)),
                ttl: self.ttl,
                max_body: self.max_body,
                max_stream_bytes: self.max_stream_bytes,
                key_policy: self.key_policy,
                known_keys: KnownKeys::new(self.memory_bytes / 16),
                metrics,
                governor: Governor::new(self.governor),
                inputs: InFlight::default(),
                batcher: embed::Batcher::new(self.embeddings),
                tasks: TaskTracker::new(),
                stopping: Default::default(),
                waiting: Default::default(),
                keying: Arc::new(tokio::sync::Semaphore::new(
                    std::thread::available_parallelism().map_or(2, usize::from),
                )),
                stream_bytes: Default::default(),
                prices: self.prices,
                series: Default::default(),
                prefixes: Default::default(),
                prefix_wait: self.prefix_wait,
                bucket: self.bucket,
                served: bucket::Served::default(),
                #[cfg(test)]
                faults: Default::default(),
            }),
        };
        Ok((dedup, salted))
    }
}

/// Drops what this replica holds of entries another replica replaced or purged.
fn forget(memory: &MemoryTier, disk: Option<&DiskStore>, event: Event) {
    let buckets = matches!(event, Event::Purged(_));
    let keys = match event {
        Event::Replaced(key) => {
            let memory = memory.clone();
            tokio::spawn(async move { memory.remove(&key).await });
            Some(vec![key])
        }
        Event::Purged(key) => {
            // Every answer of its bucket (the disk removes them by the bucket's key).
            let memory = memory.clone();
            tokio::spawn(async move {
                for answer in key.bucket_keys() {
                    memory.remove(&answer).await;
                }
            });
            Some(vec![key])
        }
        Event::PurgedAll => {
            memory.clear();
            None
        }
    };
    if let Some(disk) = disk
        && let Err(e) = disk.remove(keys, buckets)
    {
        tracing::warn!(error = %e, "cannot remove entries another replica replaced or purged");
    }
}

#[cfg(test)]
mod debug_tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_password_nor_the_fleet_secret() {
        let builder = DedupBuilder::default()
            .upstream("https://gateway-user:upstream-pass-123@gateway.internal/v1");
        #[cfg(feature = "redis")]
        let builder = builder
            .redis("rediss://default:redis-pass-456@cache.internal:6380")
            .fleet_secret(FleetSecret::new("fleet-secret-789-sixteen").expect("secret"));
        let shown = format!("{builder:?}");
        for secret in [
            "upstream-pass-123",
            "gateway-user",
            "redis-pass-456",
            "fleet-secret-789",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("gateway.internal"));
        #[cfg(feature = "redis")]
        assert!(shown.contains("cache.internal:6380"));
    }
}
