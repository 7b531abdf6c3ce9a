//! The engine: one request's path from classification to answer.
//!
//! This module owns the request path of the design; the proxy and library users both go
//! through [`Dedup`], and no caching decision is made anywhere else. [`Dedup::send`] reads top
//! down, one phase a file:
//!
//! 1. `classify`: the route, the request's cache controls, its body; stateful requests and
//!    requests on no cacheable route are passed through (`bypass`).
//! 2. `lookup` (the shortcut): a repeat this thread answered from memory before, recognised
//!    by its bytes: no key, no lookup.
//! 3. `keying`: the key of the request, remembered per exact request so a byte-identical
//!    repeat skips parsing; the credential partition. Large bodies are keyed off the async
//!    threads.
//! 4. `lookup`: the memory tier. (Beyond it, the fleet's Redis with `--redis`, then disk:
//!    `lookup_shared_then_disk`; `store` on the way back.) With a shared cache, `verified`
//!    says which callers may be answered with what others fetched.
//! 5. `flight`: join an identical request in flight, or lead one: a [`leader::Leader`] whose
//!    task resolves it top down (`leader.rs`: the cache again, the fleet's turn, the call
//!    through `govern`, then `stream` or store, and completion). A stream another replica
//!    receives is followed (`follow`), its rest read from that replica if Redis goes away
//!    (`peer`).
//! 6. `render` and `count`: the answer each waiter gets, and what it adds to the counters.
//!
//! Embeddings take their own path after classification (`embed`): per input, with inputs of
//! concurrent requests merged into shared upstream calls.
//!
//! The methods of the request path are on `Engine`, next to the others of its phase, and a
//! leader's on its `Leader`; a [`Dedup`] is a handle on one `Engine`, and `Dedup::send` only
//! strings the phases together.
//!
//! # Architecture invariants kept here
//!
//! - A cache hit never waits on the network or the disk writer: a memory hit awaits nothing
//!   but moka, and stores are only enqueued.
//! - The upstream call of a flight runs in its own task: the request that started it can go
//!   away without cancelling it.
//! - Only complete 2xx answers are stored; every other answer is handed to the waiters of its
//!   flight and forgotten.
//! - No request header is ever stored or logged; credentials only enter the key through a
//!   salted hash.

mod bucket;
mod builder;
mod bypass;
mod classify;
mod count;
mod embed;
mod figures;
mod flight;
mod follow;
mod govern;
mod joining;
mod keying;
mod leader;
mod lookup;
mod peer;
pub(crate) mod prefixes;
mod render;
mod stream;
#[cfg(test)]
mod tests;
mod verified;

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::Request;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use builder::DedupBuilder;
pub use figures::LiveFigures;
#[cfg(feature = "server")]
pub(crate) use peer::PeerRefused;
pub use prefixes::DEFAULT_PREFIX_WAIT;
pub use verified::DEFAULT_VERIFY_WINDOW;

use crate::answer::{Answer, CacheStatus};
use crate::error::Error;
use crate::fleet::Fleet;
use crate::governor::Governor;
use crate::inflight::InFlight;
use crate::key::{CacheKey, CredentialHeaders, KeyHeaders, KeyPolicy};
use crate::live::HeldBytes;
use crate::memory::MemoryTier;
use crate::metrics::{Levels, Metrics};
use crate::prices::{PriceTable, PricesInfo};
use crate::series::{Outcome, Series, SeriesSnapshot};
use crate::store::DiskStore;
use crate::upstream::Upstream;

use crate::controls::CacheControls;
use crate::memory::ExactRequest;
use crate::route::{BypassReason, Route};
use classify::{Class, Outbound};
use flight::Led;
use keying::{KnownKeys, Prepared};
use verified::Verified;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The caching, coalescing engine. Cheap to clone; clones share everything.
///
/// # Sharing
///
/// Clones share the memory tier, the in-flight table, the governor and the database writer,
/// so one engine serves every task of a program. Two engines never share anything.
#[derive(Clone)]
pub struct Dedup {
    engine: Arc<Engine>,
}

/// What every request of one engine shares.
struct Engine {
    upstream: Upstream,
    memory: MemoryTier,
    disk: Option<DiskStore>,
    flights: InFlight<CacheKey, Led>,
    /// The salt of credential partitions (the database's, or random without one).
    salt: [u8; 32],
    /// The request headers that tell callers apart.
    credentials: CredentialHeaders,
    /// The request headers that change an answer.
    key_headers: KeyHeaders,
    /// The upstream as the key names it: its base URL, and a keyed hash of the credentials
    /// in it (a gateway may route or bill by them).
    upstream_identity: String,
    shared_cache: bool,
    /// With a shared cache, the partitions it may answer.
    verified: Option<Verified>,
    /// The tier shared by the replicas of a fleet (`--redis`), when there is one.
    fleet: Option<Fleet>,
    ttl: std::time::Duration,
    max_body: usize,
    max_stream_bytes: usize,
    key_policy: KeyPolicy,
    governor: Governor,
    metrics: Metrics,
    /// Keys of requests seen before, by their exact bytes.
    known_keys: KnownKeys,
    /// Embedding inputs on their way upstream, each in some merged call.
    inputs: InFlight<CacheKey, embed::InputOutcome>,
    /// Embedding inputs waiting to be merged into an upstream call.
    batcher: embed::Batcher,
    /// Every task that calls the upstream, so `close` can wait for them.
    tasks: TaskTracker,
    /// Cancelled when a shutdown's deadline passes: the flights still running fail.
    stopping: CancellationToken,
    /// Requests waiting on a flight in the in-flight table.
    waiting: std::sync::atomic::AtomicUsize,
    /// Large bodies being keyed off the async threads, at most one a core.
    keying: Arc<tokio::sync::Semaphore>,
    /// Bytes held by the buffers of streams in flight.
    stream_bytes: HeldBytes,
    /// What answers are worth, to count what the cache saved.
    prices: PriceTable,
    /// Requests per minute by outcome, for the live page.
    series: Series,
    /// The prefixes requests write in the provider's cache, and those written.
    prefixes: prefixes::PrefixTable,
    /// The longest a request waits while another writes a prefix it shares (`--prefix-wait`;
    /// zero: never).
    prefix_wait: std::time::Duration,
    /// Answers kept under one key for sampled requests (`--bucket`; 1: one per key).
    bucket: u8,
    /// Which answer of each bucket was served last.
    served: bucket::Served,
    /// Failures injected by tests.
    #[cfg(test)]
    faults: tests::Faults,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field("upstream", &self.engine.upstream.base())
            .field("database", &self.engine.disk.is_some())
            .field("fleet", &self.engine.fleet.is_some())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Dedup {
    /// A builder with every setting at its default.
    pub fn builder() -> DedupBuilder {
        DedupBuilder::default()
    }

    /// The upstream base URL (without any password).
    pub fn upstream(&self) -> &str {
        self.engine.upstream.base()
    }

    /// The path and query of an absolute `url` relative to the upstream base URL, if `url`
    /// lies under it; `None` for any other host or path.
    #[cfg_attr(not(feature = "middleware"), allow(dead_code))]
    pub(crate) fn relative_to_upstream(&self, url: &reqwest::Url) -> Option<String> {
        self.engine.upstream.relative(url)
    }

    /// Answers one request: from the cache, from an identical request in flight, or from the
    /// upstream. Requests that are not cacheable pass through, their bodies streamed both ways.
    ///
    /// This is the request path, top down. Only a repeat this thread answered from memory
    /// before is answered without boxing: every other path is boxed, so the future of the
    /// common case stays small (it is moved on every request).
    pub async fn send<B>(&self, request: Request<B>) -> Result<Answer, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let answer = self.answer(request).await;
        let outcome = match &answer {
            Ok(a) if a.status.is_client_error() || a.status.is_server_error() => Outcome::Error,
            Ok(a) => match a.cache {
                CacheStatus::Hit => Outcome::Hit,
                CacheStatus::Coalesced => Outcome::Coalesced,
                CacheStatus::Partial => Outcome::Partial,
                CacheStatus::Miss => Outcome::Miss,
                CacheStatus::Bypass => Outcome::Bypass,
            },
            Err(_) => Outcome::Error,
        };
        self.engine.series.record(outcome, SystemTime::now());
        answer
    }

    /// The request path of [`Dedup::send`].
    async fn answer<B>(&self, request: Request<B>) -> Result<Answer, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let engine = &self.engine;
        let (head, body) = request.into_parts();
        // 1. Classify: may the cache answer this request at all?
        let (route, controls) = match engine.classify(&head)? {
            Class::Cacheable(route, controls) => (route, controls),
            Class::Bypass(reason) => {
                let bypassed = engine.bypassed(head, body, reason);
                return Box::pin(engine.pass_through(bypassed)).await;
            }
        };
        let body = engine.read_body(body).await?;
        let out = Outbound::new(head, body);
        let exact = engine.exact_request(&out, &controls.namespace);
        // 2. A repeat this thread answered from memory before: no key, no lookup. (Not with a
        // shared cache: whether the caller may be answered depends on its partition.)
        let now = SystemTime::now();
        if !engine.shared_cache
            && controls.bucket.is_none_or(|n| n <= 1)
            && let Some(entry) = engine.recall(&exact, &controls, now)
        {
            return Ok(engine.hit(&entry, now));
        }
        // 3 to 6: key, memory, flight (disk and upstream), render.
        Box::pin(engine.answer_keyed(out, route, controls, exact)).await
    }

    /// Waits for every upstream call in progress to finish and its answer to be stored, then
    /// commits everything queued for the database and stops its writer. Requests sent after
    /// `close` still work, but their answers are kept in memory only.
    pub async fn close(&self) -> Result<(), Error> {
        self.engine.tasks.close();
        self.engine.tasks.wait().await;
        if let Some(disk) = &self.engine.disk {
            disk.close().await?;
        }
        Ok(())
    }

    /// As [`Dedup::close`], within `deadline`: the upstream calls still running when it passes
    /// fail (their waiters get an error, nothing of them is stored), and what was stored
    /// before is committed all the same. What a stop of the proxy does after its drain.
    pub async fn shutdown(&self, deadline: std::time::Duration) -> Result<(), Error> {
        let engine = &self.engine;
        engine.tasks.close();
        if tokio::time::timeout(deadline, engine.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.in_flight(),
                "upstream calls still running at the shutdown deadline: failed, nothing of them \
                 stored"
            );
            engine.stopping.cancel();
            engine.tasks.wait().await;
        }
        if let Some(disk) = &engine.disk {
            disk.close().await?;
        }
        Ok(())
    }

    /// Waits until every answer stored so far is committed to the database.
    pub async fn flush(&self) -> Result<(), Error> {
        if let Some(disk) = &self.engine.disk {
            disk.flush().await?;
        }
        Ok(())
    }

    /// The engine's metrics in Prometheus text format. Settles the memory tier's pending
    /// bookkeeping first, so its gauges are exact.
    pub async fn metrics_text(&self) -> String {
        let engine = &self.engine;
        engine.memory.run_pending_tasks().await;
        let (memory_bytes, memory_entries) = self.memory_usage();
        engine.metrics.render(Levels {
            memory_bytes,
            memory_entries,
            write_queue: engine.disk.as_ref().map_or(0, DiskStore::queue_depth),
            in_flight: self.in_flight(),
            stream_buffer_bytes: engine
                .stream_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            store_errors: engine.disk.as_ref().map_or(0, DiskStore::write_errors),
            redis_errors: engine.fleet.as_ref().map_or(0, Fleet::errors),
            redis_rejected: engine
                .fleet
                .as_ref()
                .map(|f| f.rejections().to_vec())
                .unwrap_or_default(),
        })
    }

    /// Requests per minute by outcome over the last `minutes` minutes (at most a day), the
    /// current minute last.
    pub fn series(&self, minutes: usize) -> SeriesSnapshot {
        self.engine.series.snapshot(minutes, SystemTime::now())
    }

    /// What the engine is doing now: requests in flight, the memory tier against its bound,
    /// and the time requests have waited for upstream budget.
    pub async fn live(&self) -> LiveFigures {
        let engine = &self.engine;
        engine.memory.run_pending_tasks().await;
        let (memory_bytes, memory_entries) = self.memory_usage();
        let (budget_waits, waited) = engine.metrics.waited();
        LiveFigures {
            in_flight: self.in_flight() as u64,
            memory_bytes,
            memory_max_bytes: engine.memory.max_bytes(),
            memory_entries,
            budget_waits,
            budget_wait_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The price table's date and size.
    pub fn prices(&self) -> &PricesInfo {
        self.engine.prices.info()
    }

    /// The database file, when the engine has one.
    pub fn database(&self) -> Option<&std::path::Path> {
        self.engine.disk.as_ref().map(DiskStore::path)
    }

    /// Number of distinct requests waiting on an upstream call right now (each may have
    /// many waiters).
    pub fn in_flight(&self) -> usize {
        self.engine.flights.len()
    }

    /// The figures the proxy's edge moves, registered with this engine's metrics.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn edge_figures(&self) -> crate::metrics::EdgeFigures {
        self.engine.metrics.edge.clone()
    }

    /// Number of requests waiting right now on the outcome of an upstream call, their own
    /// or an identical request's (joined in the in-flight table).
    pub fn waiting(&self) -> usize {
        self.engine
            .waiting
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes and entries held by the memory tier (approximate).
    pub fn memory_usage(&self) -> (u64, u64) {
        (
            self.engine.memory.weighted_bytes(),
            self.engine.memory.entry_count(),
        )
    }
}

impl Engine {
    /// The path of a cacheable request past this thread's shortcuts.
    async fn answer_keyed(
        self: &Arc<Self>,
        mut out: Outbound,
        route: Route,
        controls: CacheControls,
        exact: ExactRequest,
    ) -> Result<Answer, Error> {
        // 3. Key: remembered for these exact bytes, or parsed and canonicalized.
        let keyed = match self.known_keys.get(&exact) {
            Some(keyed) => keyed,
            None => match self.prepare(route, out, &controls, &exact).await? {
                Prepared::Keyed(prepared, keyed) => {
                    out = prepared;
                    keyed
                }
                Prepared::Bypass(bypassed) => return Box::pin(self.pass_through(bypassed)).await,
                Prepared::Embeddings(request) => {
                    return Box::pin(self.embeddings(request, &controls)).await;
                }
            },
        };
        out.partition = keyed.partition;
        out.estimate = keyed.estimate;
        // An answer that follows state the provider can change is cached only when the
        // caller asked for a lifetime.
        if keyed.mutable && !controls.asks_lifetime() {
            let model = keyed.model.clone();
            let bypassed = out.bypassed(Some(route), model, BypassReason::Mutable);
            return Box::pin(self.pass_through(bypassed)).await;
        }
        let meta = keyed.meta(route, &controls, self.ttl);
        // A sampled request may ask for several answers under its key (`bucket.rs`).
        let bucket = self.bucket_size(&controls, keyed.sampled);
        if bucket > 1 {
            return Box::pin(self.from_bucket(out, meta, &controls, bucket)).await;
        }
        // 4. Memory, for callers the cache may answer. (No shortcut for these bytes when a
        // header turned `--bucket` off for them: without it, they would ask for a bucket.)
        let shortcut = controls.bucket.is_none() || self.bucket == 1 || !keyed.sampled;
        if self.may_share(&out.partition)
            && let Some(hit) = self
                .memory_hit(shortcut.then_some(&exact), &keyed.key, &controls)
                .await
        {
            return Ok(hit);
        }
        // 5. An identical request in flight, or a flight of its own: beyond memory, the
        // fleet's Redis and disk, then the upstream.
        Box::pin(self.beyond_memory(out, meta, &controls)).await
    }
}
