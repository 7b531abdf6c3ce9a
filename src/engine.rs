//! The engine: one request's path from classification to answer.
//!
//! This module owns the request path of the design: classify, key, memory tier, disk tier,
//! in-flight table, upstream, store. The proxy and library users both go through [`Dedup`];
//! no caching decision is made anywhere else.
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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream::BoxStream};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

mod embed;

use crate::controls::CacheControls;
use crate::embeddings::{self, EmbedSettings};
use crate::entry::{EntryMeta, StoredAnswer, Usage};
use crate::error::{Error, ErrorKind};
use crate::governor::{self, Disposition, Governor, GovernorSettings};
use crate::inflight::{Flight, InFlight, Role};
use crate::key::{
    BEHAVIOUR_HEADERS, CREDENTIAL_HEADERS, CacheKey, CanonicalBody, CredentialFingerprint,
    KeyParts, KeyPolicy,
};
use crate::live::LiveStream;
use crate::memory::{ExactRequest, MemoryTier};
use crate::metrics::{Levels, Metrics};
use crate::route::{self, BypassReason, Route};
use crate::sse::{Completion, EventSplitter, Verdict};
use crate::store::{Counts, DiskStore, StoreLimits};
use crate::upstream::{self, Timeouts, Upstream};

/// Response header naming how the answer was produced.
pub const CACHE_HEADER: HeaderName = HeaderName::from_static("llm-dedup-cache");
/// Response header carrying the cache key.
pub const KEY_HEADER: HeaderName = HeaderName::from_static("llm-dedup-key");

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How an answer was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheStatus {
    /// Served from the cache; the upstream was not called.
    Hit,
    /// This request's upstream call produced the answer.
    Miss,
    /// An identical request in flight at the same moment produced the answer.
    Coalesced,
    /// Embeddings only: some inputs were answered from the cache, the others by the upstream.
    Partial,
    /// The cache was not used (not cacheable, streamed, stateful, or `no-store`).
    Bypass,
}

impl CacheStatus {
    /// The value of the `llm-dedup-cache` header.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Partial => "partial",
            CacheStatus::Bypass => "bypass",
        }
    }
}

/// The body of an [`Answer`].
pub enum AnswerBody {
    /// A complete body.
    Full(Bytes),
    /// A body passed through as it arrives from the upstream.
    Stream(BoxStream<'static, Result<Bytes, Error>>),
}

impl std::fmt::Debug for AnswerBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnswerBody::Full(b) => f.debug_tuple("Full").field(&b.len()).finish(),
            AnswerBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// An answer to one request. Its headers already carry `llm-dedup-cache`, `llm-dedup-key`
/// (when the request had a key) and `age` (on hits).
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: AnswerBody,
    /// How it was produced.
    pub cache: CacheStatus,
    /// The request's cache key, when it had one.
    pub key: Option<CacheKey>,
}

impl Answer {
    /// The complete body, reading a streamed one to its end.
    pub async fn into_bytes(self) -> Result<Bytes, Error> {
        match self.body {
            AnswerBody::Full(b) => Ok(b),
            AnswerBody::Stream(s) => {
                let chunks: Vec<Bytes> = s.try_collect().await?;
                Ok(chunks.concat().into())
            }
        }
    }
}

/// Builds a [`Dedup`] engine.
#[derive(Debug, Clone)]
#[must_use]
pub struct DedupBuilder {
    upstream: String,
    database: Option<PathBuf>,
    memory_bytes: u64,
    ttl: Duration,
    max_body: usize,
    max_stream_bytes: usize,
    shared_cache: bool,
    key_policy: KeyPolicy,
    timeouts: Timeouts,
    store_limits: StoreLimits,
    governor: GovernorSettings,
    embeddings: EmbedSettings,
}

impl Default for DedupBuilder {
    fn default() -> Self {
        DedupBuilder {
            upstream: "https://api.openai.com".into(),
            database: None,
            memory_bytes: 256 * 1024 * 1024,
            ttl: Duration::from_secs(30 * 24 * 3600),
            max_body: 64 * 1024 * 1024,
            max_stream_bytes: 32 * 1024 * 1024,
            shared_cache: false,
            key_policy: KeyPolicy::default(),
            timeouts: Timeouts::default(),
            store_limits: StoreLimits::default(),
            governor: GovernorSettings::default(),
            embeddings: EmbedSettings::default(),
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
    /// 30 days.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
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

    /// Which request fields are left out of the key. By default, [`KeyPolicy::default`].
    pub fn key_policy(mut self, policy: KeyPolicy) -> Self {
        self.key_policy = policy;
        self
    }

    /// Largest total size of answers kept in the database; past it, the least recently used
    /// entries are removed at the next sweep. By default, there is no bound.
    pub fn max_disk(mut self, bytes: Option<u64>) -> Self {
        self.store_limits.max_disk = bytes;
        self
    }

    /// How often expired entries are removed from the database and the size bound enforced.
    /// By default, every 60 seconds.
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

    /// Upstream connect and read timeouts. By default, [`Timeouts::default`].
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Opens the database (if any) and builds the engine.
    pub fn build(self) -> Result<Dedup, Error> {
        let upstream = Upstream::new(&self.upstream, self.timeouts)?;
        let disk = self
            .database
            .as_deref()
            .map(|path| DiskStore::open(path, self.store_limits))
            .transpose()?;
        let salt = match &disk {
            Some(d) => *d.salt(),
            // Without a database, entries die with the engine, and so may the salt.
            None => rand::random(),
        };
        let memory = MemoryTier::new(self.memory_bytes);
        if let Some(disk) = &disk {
            // Another process purged entries: drop the memory tier so they stop being served
            // (what is still on disk comes back on the next read).
            let memory = memory.clone();
            disk.on_external_purge(move || memory.clear());
        }
        Ok(Dedup {
            inner: Arc::new(Inner {
                upstream,
                memory,
                disk,
                flights: InFlight::default(),
                salt,
                shared_cache: self.shared_cache,
                ttl: self.ttl,
                max_body: self.max_body,
                max_stream_bytes: self.max_stream_bytes,
                key_policy: self.key_policy,
                known_keys: moka::sync::Cache::new(KNOWN_KEYS),
                metrics: Metrics::new(),
                governor: Governor::new(self.governor),
                inputs: InFlight::default(),
                batcher: embed::Batcher::new(self.embeddings),
                tasks: TaskTracker::new(),
            }),
        })
    }
}

/// The caching, coalescing engine. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Dedup {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: Upstream,
    memory: MemoryTier,
    disk: Option<DiskStore>,
    flights: InFlight<CacheKey, FlightOutcome>,
    salt: [u8; 32],
    shared_cache: bool,
    ttl: Duration,
    max_body: usize,
    max_stream_bytes: usize,
    key_policy: KeyPolicy,
    governor: Governor,
    metrics: Metrics,
    /// Keys of requests seen before, by a digest of their exact bytes: a byte-identical repeat
    /// (the common case: SDK retries, re-run jobs) skips JSON parsing and canonicalization.
    /// A cache of a pure function, so it never needs invalidating.
    known_keys: moka::sync::Cache<[u8; 32], Arc<KnownKey>>,
    /// Embedding inputs on their way upstream, each in some merged call.
    inputs: InFlight<CacheKey, embed::InputOutcome>,
    /// Embedding inputs waiting to be merged into an upstream call.
    batcher: embed::Batcher,
    tasks: TaskTracker,
}

/// What a flight resolved to; every waiter gets a clone.
#[derive(Clone)]
enum FlightOutcome {
    /// A 2xx answer, stored; `fresh_headers` are the upstream's own when it came from upstream.
    Stored {
        entry: Arc<StoredAnswer>,
        fresh_headers: Option<Arc<HeaderMap>>,
    },
    /// A complete non-2xx answer, passed on and never stored.
    Unstored(Arc<(StatusCode, HeaderMap, Bytes)>),
    /// A 2xx streamed answer, shared live while it arrives (stored once complete).
    Live(Arc<LiveStream>),
    /// No answer at all.
    Failed(Error),
}

type LeadFlight = Flight<CacheKey, FlightOutcome>;

/// What the engine remembers about a cacheable request it has keyed before.
struct KnownKey {
    key: CacheKey,
    model: Option<String>,
    estimate: u32,
    /// The credential partition (the digest covers the credential headers).
    partition: [u8; 32],
}

/// Growth of a flight's stream buffer between two updates of its memory reservation.
const RESERVE_STEP: usize = 64 * 1024;

/// Most request digests remembered in [`Inner::known_keys`] (about 100 bytes each).
const KNOWN_KEYS: u64 = 65_536;

/// A request ready to go upstream; cheap to clone.
#[derive(Clone)]
struct Outbound {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
    /// The rate-limit budget it draws on: a salted hash of its credential headers.
    partition: [u8; 32],
    /// Tokens the provider will charge up front, roughly.
    estimate: u32,
}

/// What came back from the upstream through the governor.
enum Upstreamed {
    /// A 2xx (or 3xx) answer, body not yet read (it may be a stream).
    Success(reqwest::Response),
    /// Any other answer, read whole. When waiting cannot fix it, its headers carry
    /// `x-should-retry: false`: the official SDKs would retry some of these.
    Refused {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

impl Dedup {
    /// A builder with every setting at its default.
    pub fn builder() -> DedupBuilder {
        DedupBuilder::default()
    }

    /// The upstream base URL (without any password).
    pub fn upstream(&self) -> &str {
        self.inner.upstream.base()
    }

    /// The path and query of an absolute `url` relative to the upstream base URL, if `url`
    /// lies under it; `None` for any other host or path.
    pub fn relative_to_upstream(&self, url: &reqwest::Url) -> Option<String> {
        self.inner.upstream.relative(url)
    }

    /// Answers one request: from the cache, from an identical request in flight, or from the
    /// upstream. Requests that are not cacheable pass through, their bodies streamed both ways.
    pub async fn send<B>(&self, request: Request<B>) -> Result<Answer, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        let controls = CacheControls::from_headers(&parts.headers)
            .map_err(|m| Error::new(ErrorKind::InvalidRequest, m))?;
        let route = Route::classify(&parts.method, parts.uri.path());
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.inner.max_body as u64) {
            return Err(self.too_large());
        }
        let route = match (route, controls.no_store) {
            (Some(route), false) => route,
            (route, _) => {
                let reason = if route.is_some() {
                    BypassReason::NoStore
                } else {
                    BypassReason::NotCacheable
                };
                let stream = Limited::new(body, self.inner.max_body).into_data_stream();
                let partition = self.partition(&parts.headers);
                let outbound = (parts.method, path_and_query, parts.headers, partition);
                let body = reqwest::Body::wrap_stream(stream);
                let passed = self.pass_through(outbound, body, (route, None, reason));
                return Box::pin(passed).await;
            }
        };

        let body = self.read_body(body).await?;
        let mut outbound = Outbound {
            method: parts.method,
            path_and_query,
            headers: parts.headers,
            body,
            partition: [0; 32],
            estimate: 0,
        };
        let exact = ExactRequest::new(self.exact_bytes(&outbound, &controls.namespace));
        if !controls.no_cache {
            // This thread answered these exact bytes from memory before: no lookup needed.
            let now = SystemTime::now();
            let recalled = self.inner.memory.recall(&exact, now);
            if let Some(entry) = recalled.filter(|e| young_enough(e, controls.max_age)) {
                return Ok(self.inner.hit(&entry, now));
            }
        }
        let ttl = controls.ttl.unwrap_or(self.inner.ttl);
        if let Some(known) = self.inner.known_keys.get(exact.digest()) {
            // These exact bytes were parsed, found cacheable and keyed before.
            outbound.estimate = known.estimate;
            outbound.partition = known.partition;
            let meta = || EntryMeta {
                key: known.key,
                namespace: controls.namespace.clone(),
                route,
                model: known.model.clone(),
                ttl,
            };
            // Boxed, like every path past the shortcut: the future of a repeat stays small.
            let known = self.cached_or_fetched(outbound, (&exact, known.key), meta, &controls);
            return Box::pin(known).await;
        }
        // A request seen for the first time takes the long path, boxed: the future of a
        // repeat stays small (it is moved on every request).
        Box::pin(self.first_seen(outbound, route, &controls, &exact)).await
    }

    /// Reads a whole request body of at most `--max-body` bytes. A body that arrives in one
    /// piece, as a small one does, is returned as it is, without copying (`http_body_util`'s
    /// `collect` cost the hit path more than the rest of reading the request).
    async fn read_body<B>(&self, body: B) -> Result<Bytes, Error>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let mut body = std::pin::pin!(body);
        let mut first = Bytes::new();
        let mut joined = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                let e: BoxError = e.into();
                Error::new(
                    ErrorKind::InvalidRequest,
                    format!("could not read the request body: {e}"),
                )
            })?;
            // Trailers carry nothing a cache key or an upstream call uses.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if first.len() + joined.len() + data.len() > self.inner.max_body {
                return Err(self.too_large());
            }
            if first.is_empty() && joined.is_empty() {
                first = data;
            } else {
                if joined.is_empty() {
                    joined.extend_from_slice(&std::mem::take(&mut first));
                }
                joined.extend_from_slice(&data);
            }
        }
        Ok(if joined.is_empty() {
            first
        } else {
            joined.into()
        })
    }

    /// The path of a cacheable request whose exact bytes are new: parse, classify, key.
    async fn first_seen(
        &self,
        mut outbound: Outbound,
        route: Route,
        controls: &CacheControls,
        exact: &ExactRequest,
    ) -> Result<Answer, Error> {
        let ttl = controls.ttl.unwrap_or(self.inner.ttl);
        outbound.partition = self.partition(&outbound.headers);
        let value: Value = serde_json::from_slice(&outbound.body).map_err(|e| {
            Error::new(
                ErrorKind::InvalidRequest,
                format!("the request body is not valid JSON: {e}"),
            )
        })?;
        if !value.is_object() {
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                "the request body must be a JSON object",
            ));
        }
        outbound.estimate = governor::estimate_tokens(outbound.body.len(), &value);
        if let Some(reason) = route::bypass_reason(route, &value) {
            let triple = (
                outbound.method,
                outbound.path_and_query,
                outbound.headers,
                outbound.partition,
            );
            let why = (Some(route), route::model_of(&triple.1, &value), reason);
            return Box::pin(self.pass_through(triple, outbound.body.into(), why)).await;
        }
        if route == Route::Embeddings {
            // Cached and sent per input; a request whose `input` is not one the API accepts
            // is cached whole below, and the provider says what is wrong with it.
            if let Some((kind, inputs)) = embeddings::split(value.get("input")) {
                let request = embed::Request {
                    out: outbound,
                    body: value,
                    kind,
                    inputs,
                    ttl,
                };
                return Box::pin(self.embeddings(request, controls)).await;
            }
        }
        let meta = EntryMeta {
            key: self.key(
                route,
                &outbound,
                &value,
                &controls.namespace,
                outbound.body.len(),
            ),
            namespace: controls.namespace.clone(),
            route,
            model: route::model_of(&outbound.path_and_query, &value),
            ttl,
        };
        self.inner.known_keys.insert(
            *exact.digest(),
            Arc::new(KnownKey {
                key: meta.key,
                model: meta.model.clone(),
                estimate: outbound.estimate,
                partition: outbound.partition,
            }),
        );
        let key = meta.key;
        self.cached_or_fetched(outbound, (exact, key), || meta, controls)
            .await
    }

    /// Everything that goes into a request's cache key, as received (headers in the order
    /// sent, body unparsed), each part prefixed by its length. Equal bytes mean equal keys;
    /// the converse does not hold, and need not: a request not recognised takes the full path.
    fn exact_bytes(&self, out: &Outbound, namespace: &str) -> Vec<u8> {
        let mut preimage = Vec::with_capacity(out.body.len() + 256);
        let mut part = |bytes: &[u8]| {
            preimage.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            preimage.extend_from_slice(bytes);
        };
        part(b"llm-dedup exact request");
        part(namespace.as_bytes());
        part(out.method.as_str().as_bytes());
        part(out.path_and_query.as_bytes());
        for (name, value) in &out.headers {
            let name = name.as_str();
            if CREDENTIAL_HEADERS.contains(&name) || BEHAVIOUR_HEADERS.contains(&name) {
                part(name.as_bytes());
                part(value.as_bytes());
            }
        }
        part(&out.body);
        preimage
    }

    /// The rate-limit budget a request draws on: its credential headers, salted and hashed
    /// (providers count limits per key, organization and project, whether or not the cache is
    /// shared).
    fn partition(&self, headers: &HeaderMap) -> [u8; 32] {
        let credentials = headers
            .iter()
            .filter(|(name, _)| CREDENTIAL_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| (name.as_str(), value.as_bytes()));
        CredentialFingerprint::new(&self.inner.salt, credentials).bytes()
    }

    /// The cache key of a request with this route, body and namespace; `size_hint` is about
    /// the size of `body` as JSON.
    fn key(
        &self,
        route: Route,
        out: &Outbound,
        body: &Value,
        namespace: &str,
        size_hint: usize,
    ) -> CacheKey {
        let mut behaviour: Vec<(&str, &[u8])> = out
            .headers
            .iter()
            .filter(|(name, _)| BEHAVIOUR_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
            .collect();
        // A stable order whatever order the client sent them in (values of one name keep theirs).
        behaviour.sort_by_key(|(name, _)| *name);
        // The partition is the credential's salted fingerprint, computed once per request.
        let credential = if self.inner.shared_cache {
            CredentialFingerprint::SHARED
        } else {
            CredentialFingerprint::from_bytes(out.partition)
        };
        let canonical =
            CanonicalBody::with_capacity(route, body, &self.inner.key_policy, size_hint);
        KeyParts {
            namespace,
            upstream: self.inner.upstream.base(),
            method: out.method.as_str(),
            path_and_query: &out.path_and_query,
            credential,
            behaviour: &behaviour,
            body: &canonical,
        }
        .key()
    }

    /// Answers a cacheable request, received as `exact` and keyed `key`, from memory
    /// (leaving a shortcut for its next repeat on this thread), or else through
    /// [`Dedup::beyond_memory`]; `meta` is only built (allocating) when memory has no answer.
    async fn cached_or_fetched(
        &self,
        out: Outbound,
        (exact, key): (&ExactRequest, CacheKey),
        meta: impl FnOnce() -> EntryMeta,
        controls: &CacheControls,
    ) -> Result<Answer, Error> {
        if !controls.no_cache {
            let found = self.inner.memory.get_via(exact, &key).await;
            if let Some(entry) = found.filter(|e| young_enough(e, controls.max_age)) {
                return Ok(self.inner.hit(&entry, SystemTime::now()));
            }
        }
        // Everything past a memory hit is boxed, so the hit path's future stays small (its
        // size is copied on every request).
        Box::pin(self.beyond_memory(out, meta(), controls)).await
    }

    /// The path of a request that memory could not answer: disk, flight, upstream.
    async fn beyond_memory(
        &self,
        out: Outbound,
        meta: EntryMeta,
        controls: &CacheControls,
    ) -> Result<Answer, Error> {
        let key = meta.key;
        if controls.only_if_cached {
            if !controls.no_cache {
                if let Some(entry) = self.inner.lookup_disk(&key, controls.max_age).await {
                    return Ok(self.inner.hit(&entry, SystemTime::now()));
                }
            }
            return Err(Error::new(
                ErrorKind::NotCached,
                format!("no cached answer for key {key} (only-if-cached)"),
            ));
        }
        if controls.no_cache {
            // A refresh: its own upstream call, whose answer replaces the stored one.
            return self.refresh(out, meta).await;
        }
        // A leader that vanished without an outcome frees the key; a new leader is elected.
        for _ in 0..3 {
            let (waiter, role) = match self.inner.flights.join(&key) {
                Role::Leader(flight) => {
                    let waiter = flight.waiter();
                    let inner = self.inner.clone();
                    let (out, meta, max_age) = (out.clone(), meta.clone(), controls.max_age);
                    self.inner.tasks.spawn(async move {
                        let outcome = inner.resolve(&out, &meta, max_age, &flight).await;
                        flight.complete(outcome);
                    });
                    (waiter, CacheStatus::Miss)
                }
                Role::Follower(waiter) => (waiter, CacheStatus::Coalesced),
            };
            let Ok(outcome) = waiter.wait().await else {
                continue;
            };
            if let FlightOutcome::Stored {
                entry,
                fresh_headers: None,
            } = &outcome
            {
                // The flight found the answer in the cache; a follower with a stricter
                // max-age than the leader's may need a fresher one.
                if controls
                    .max_age
                    .is_some_and(|max| entry.age(SystemTime::now()) > max)
                {
                    return self.refresh(out, meta).await;
                }
            }
            return self.inner.render(outcome, role, &meta);
        }
        Err(Error::new(
            ErrorKind::Abandoned,
            "the upstream call for this request was abandoned repeatedly",
        ))
    }

    /// Fetches a fresh answer outside the in-flight table and stores it.
    async fn refresh(&self, out: Outbound, meta: EntryMeta) -> Result<Answer, Error> {
        // A flight of its own, outside the shared table: nobody joins a refresh.
        let flight = InFlight::detached(meta.key);
        let waiter = flight.waiter();
        let inner = self.inner.clone();
        let task_meta = meta.clone();
        self.inner.tasks.spawn(async move {
            let outcome = inner.fetch(&out, &task_meta, &flight).await;
            flight.complete(outcome);
        });
        let outcome = waiter.wait().await.map_err(|_| {
            Error::new(
                ErrorKind::Abandoned,
                "the upstream call for this refresh was abandoned",
            )
        })?;
        self.inner.render(outcome, CacheStatus::Miss, &meta)
    }

    async fn pass_through(
        &self,
        (method, path_and_query, headers, partition): (Method, String, HeaderMap, [u8; 32]),
        body: reqwest::Body,
        (route, model, reason): (Option<Route>, Option<String>, BypassReason),
    ) -> Result<Answer, Error> {
        tracing::debug!(path = %path_and_query.split('?').next().unwrap_or(""), reason = reason.as_str(), "bypassing the cache");
        // Paced like everything else, but sent once: its body may be a stream that cannot be
        // sent again.
        let inner = &self.inner;
        let deadline = Instant::now() + inner.governor.settings().max_queue_wait;
        let permit = inner
            .governor
            .acquire(&partition, 0, deadline)
            .await
            .map_err(Error::queue_full)?;
        let sent = inner
            .upstream
            .send(&method, &path_and_query, &headers, body)
            .await;
        if let Ok(response) = &sent {
            inner.governor.observe(&partition, response.headers());
        }
        drop(permit);
        let status = sent.as_ref().ok().map(|r| r.status());
        self.inner.upstream_called(route, model.as_deref(), status);
        let response = sent?;
        let status = response.status();
        if status.is_client_error() || status.is_server_error() {
            tracing::info!(
                route = route_name(route),
                status = status.as_u16(),
                "upstream refused the request; passed on (not cacheable, not retried)"
            );
        }
        self.inner.record(
            route,
            model.as_deref(),
            CacheStatus::Bypass,
            Usage::default(),
        );
        let mut headers = upstream::response_headers(response.headers());
        headers.insert(
            CACHE_HEADER,
            HeaderValue::from_static(CacheStatus::Bypass.as_str()),
        );
        let upstream = self.inner.upstream.clone();
        let body = response
            .bytes_stream()
            .map(move |chunk| chunk.map_err(|e| upstream.error(e)))
            .boxed();
        Ok(Answer {
            status,
            headers,
            body: AnswerBody::Stream(body),
            cache: CacheStatus::Bypass,
            key: None,
        })
    }

    fn too_large(&self) -> Error {
        Error::new(
            ErrorKind::BodyTooLarge,
            format!(
                "the request body is larger than the limit of {} bytes",
                self.inner.max_body
            ),
        )
    }

    /// Waits for every upstream call in progress to finish and its answer to be stored, then
    /// commits everything queued for the database and stops its writer. Requests sent after
    /// `close` still work, but their answers are kept in memory only.
    pub async fn close(&self) -> Result<(), Error> {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        if let Some(disk) = &self.inner.disk {
            disk.close().await?;
        }
        Ok(())
    }

    /// Waits until every answer stored so far is committed to the database.
    pub async fn flush(&self) -> Result<(), Error> {
        if let Some(disk) = &self.inner.disk {
            disk.flush().await?;
        }
        Ok(())
    }

    /// The engine's metrics in Prometheus text format. Settles the memory tier's pending
    /// bookkeeping first, so its gauges are exact.
    pub async fn metrics_text(&self) -> String {
        self.inner.memory.run_pending_tasks().await;
        let (memory_bytes, memory_entries) = self.memory_usage();
        self.inner.metrics.render(Levels {
            memory_bytes,
            memory_entries,
            write_queue: self.inner.disk.as_ref().map_or(0, DiskStore::queue_depth),
            in_flight: self.in_flight(),
        })
    }

    /// The database file, when the engine has one.
    pub fn database(&self) -> Option<&std::path::Path> {
        self.inner.disk.as_ref().map(DiskStore::path)
    }

    /// Number of distinct requests waiting on an upstream call right now (each may have
    /// many waiters).
    pub fn in_flight(&self) -> usize {
        self.inner.flights.len()
    }

    /// Bytes and entries held by the memory tier (approximate).
    pub fn memory_usage(&self) -> (u64, u64) {
        (
            self.inner.memory.weighted_bytes(),
            self.inner.memory.entry_count(),
        )
    }
}

impl Inner {
    async fn lookup_memory(
        &self,
        key: &CacheKey,
        max_age: Option<Duration>,
    ) -> Option<Arc<StoredAnswer>> {
        let entry = self.memory.get(key).await?;
        young_enough(&entry, max_age).then_some(entry)
    }

    /// The database's entry for `key`, if any (see [`Inner::lookup_disk_many`]).
    async fn lookup_disk(
        &self,
        key: &CacheKey,
        max_age: Option<Duration>,
    ) -> Option<Arc<StoredAnswer>> {
        self.lookup_disk_many(vec![*key], max_age)
            .await
            .pop()
            .flatten()
    }

    /// Stores an answer in memory, then queues it for the database. Call it before the flight
    /// that fetched the answer ends: once it has, later requests must find the answer in memory.
    async fn store(&self, entry: Arc<StoredAnswer>) {
        self.memory.insert(entry.clone()).await;
        if let Some(disk) = &self.disk {
            let key = entry.key;
            if let Err(e) = disk.put(entry) {
                tracing::warn!(key = %key, error = %crate::error::describe_chain(&e), "answer kept in memory only");
            }
        }
    }

    /// The database's entries for `keys`, read in one trip. Each entry found is also put in
    /// memory; one older than `max_age` is not returned. A database that cannot be read is
    /// logged and treated as holding nothing.
    async fn lookup_disk_many(
        &self,
        keys: Vec<CacheKey>,
        max_age: Option<Duration>,
    ) -> Vec<Option<Arc<StoredAnswer>>> {
        let count = keys.len();
        let Some(disk) = &self.disk else {
            return vec![None; count];
        };
        match disk.get_many(keys).await {
            Ok(entries) => {
                let mut found = Vec::with_capacity(count);
                for entry in entries {
                    let entry = match entry {
                        Some(e) => Arc::new(e),
                        None => {
                            found.push(None);
                            continue;
                        }
                    };
                    self.memory.insert(entry.clone()).await;
                    found.push(young_enough(&entry, max_age).then_some(entry));
                }
                found
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::describe_chain(&e), "reading the cache database failed; treating as misses");
                vec![None; count]
            }
        }
    }

    /// Resolves a flight: the cache again (closing the race with a flight that just ended),
    /// then the upstream.
    async fn resolve(
        &self,
        out: &Outbound,
        meta: &EntryMeta,
        max_age: Option<Duration>,
        flight: &LeadFlight,
    ) -> FlightOutcome {
        let cached = match self.lookup_memory(&meta.key, max_age).await {
            Some(entry) => Some(entry),
            None => self.lookup_disk(&meta.key, max_age).await,
        };
        match cached {
            Some(entry) => FlightOutcome::Stored {
                entry,
                fresh_headers: None,
            },
            None => self.fetch(out, meta, flight).await,
        }
    }

    /// Calls the upstream and stores a complete 2xx answer. A streamed answer is published
    /// on `flight` as soon as it starts, and the flight stays open until it ends, so that
    /// identical requests arriving meanwhile join it live.
    async fn fetch(&self, out: &Outbound, meta: &EntryMeta, flight: &LeadFlight) -> FlightOutcome {
        let response = match self.send_governed(out, meta).await {
            Ok(Upstreamed::Success(r)) => r,
            Ok(Upstreamed::Refused {
                status,
                headers,
                body,
            }) => {
                tracing::debug!(key = %meta.key, status = status.as_u16(), "upstream answer not stored");
                return FlightOutcome::Unstored(Arc::new((status, headers, body)));
            }
            Err(e) => return FlightOutcome::Failed(e),
        };
        let status = response.status();
        let headers = upstream::response_headers(response.headers());
        if status.is_success() && is_event_stream(&headers) {
            let live = LiveStream::new(status, headers);
            flight.publish(FlightOutcome::Live(live.clone()));
            self.pump(response, &live, meta, out).await;
            return FlightOutcome::Live(live);
        }
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => return FlightOutcome::Failed(self.upstream.error(e)),
        };
        if !status.is_success() {
            return FlightOutcome::Unstored(Arc::new((status, headers, body)));
        }
        let entry = Arc::new(StoredAnswer::from_upstream(meta, status, &headers, body));
        self.governor
            .settle(&out.partition, out.estimate, entry.usage.total_tokens);
        self.store(entry.clone()).await;
        FlightOutcome::Stored {
            entry,
            fresh_headers: Some(Arc::new(headers)),
        }
    }

    /// Sends a request through the governor: waits in line for budget, learns the budget from
    /// the answer, and waits out refusals worth waiting out (pausing the whole budget) until
    /// the retry budget is spent; then the last answer is handed on as it came.
    async fn send_governed(&self, out: &Outbound, meta: &EntryMeta) -> Result<Upstreamed, Error> {
        let settings = *self.governor.settings();
        let (route, model) = (Some(meta.route), meta.model.as_deref());
        let mut waited = Duration::ZERO;
        let mut attempt = 0u32;
        loop {
            let queued = Instant::now();
            let deadline = queued + settings.max_queue_wait;
            let permit = self
                .governor
                .acquire(&out.partition, out.estimate, deadline)
                .await
                .map_err(Error::queue_full)?;
            self.metrics.queue_wait(queued.elapsed());
            let sent = self
                .upstream
                .send(
                    &out.method,
                    &out.path_and_query,
                    &out.headers,
                    out.body.clone().into(),
                )
                .await;
            if let Ok(response) = &sent {
                self.governor.observe(&out.partition, response.headers());
            }
            // After observing: a probe holds the line until the budget is known.
            drop(permit);
            self.upstream_called(route, model, sent.as_ref().ok().map(|r| r.status()));
            let (wait, last) = match sent {
                Ok(response) => {
                    let status = response.status();
                    if status.is_success() || status.is_redirection() {
                        return Ok(Upstreamed::Success(response));
                    }
                    let mut headers = upstream::response_headers(response.headers());
                    let body = match response.bytes().await {
                        Ok(b) => b,
                        Err(e) => return Err(self.upstream.error(e)),
                    };
                    let disposition = governor::classify(status, &body);
                    let wait = governor::retry_after(&headers)
                        .unwrap_or_else(|| governor::backoff(attempt));
                    if let Disposition::Final(why) = disposition {
                        tracing::info!(
                            route = route_name(route),
                            status = status.as_u16(),
                            why,
                            "upstream refused the request; passed on, not retried"
                        );
                        headers.insert(
                            HeaderName::from_static("x-should-retry"),
                            HeaderValue::from_static("false"),
                        );
                        return Ok(Upstreamed::Refused {
                            status,
                            headers,
                            body,
                        });
                    }
                    let last = Upstreamed::Refused {
                        status,
                        headers,
                        body,
                    };
                    if disposition == Disposition::Deliver {
                        return Ok(last);
                    }
                    (wait, Ok(last))
                }
                Err(e) => (governor::backoff(attempt), Err(e)),
            };
            // One log line per refusal, saying what is done about it.
            let status = match &last {
                Ok(Upstreamed::Refused { status, .. }) => Some(status.as_u16()),
                _ => None,
            };
            if waited + wait > settings.retry_budget {
                tracing::info!(
                    route = route_name(route),
                    status,
                    waited = ?waited,
                    "upstream refused the request; retry budget spent, passed on"
                );
                return last;
            }
            tracing::info!(
                route = route_name(route),
                status,
                wait = ?wait,
                "upstream refused the request; pausing the budget and retrying"
            );
            let refused_429 = status == Some(429);
            self.refusal_absorbed(route, model, refused_429);
            self.governor.pause(&out.partition, wait);
            waited += wait;
            attempt += 1;
        }
    }

    /// Counts a refusal that will be waited out and retried.
    fn refusal_absorbed(&self, route: Option<Route>, model: Option<&str>, was_429: bool) {
        self.metrics.retried(was_429);
        let counts = Counts {
            upstream_429s: i64::from(was_429),
            ..Counts::default()
        };
        self.persist_counts(route_name(route), model, &counts);
    }

    /// Adds `counts` to the database's counters for `route` and `model`, if there is a
    /// database.
    fn persist_counts(&self, route: &str, model: Option<&str>, counts: &Counts) {
        if let Some(disk) = &self.disk {
            disk.record_counts(route, model.unwrap_or(""), counts);
        }
    }

    /// Receives a streamed answer into `live`, event by event, and stores it if it completed
    /// without error and within the size limit. A cut or failed stream is passed on as it
    /// came and never stored.
    async fn pump(
        &self,
        response: reqwest::Response,
        live: &LiveStream,
        meta: &EntryMeta,
        out: &Outbound,
    ) {
        let mut split = EventSplitter::default();
        let mut completion = Completion::new(meta.route);
        let mut size = 0usize;
        let mut reserved = 0usize;
        let mut body = response.bytes_stream();
        let result = loop {
            match body.next().await {
                Some(Ok(chunk)) => {
                    for event in split.push(&chunk) {
                        completion.observe(&event);
                        size += event.len();
                        live.push(event);
                    }
                    // What the flight buffers counts against the memory bound, refreshed
                    // every RESERVE_STEP bytes (small streams never reserve).
                    if size - reserved >= RESERVE_STEP {
                        reserved = size;
                        self.memory.reserve(meta.key, size as u64).await;
                    }
                }
                Some(Err(e)) => break Err(self.upstream.error(e)),
                None => break Ok(()),
            }
        };
        if let Some(rest) = split.rest() {
            size += rest.len();
            live.push(rest);
        }
        let verdict = completion.verdict();
        self.governor.settle(
            &out.partition,
            out.estimate,
            completion.usage().total_tokens,
        );
        if result.is_ok() && verdict == Verdict::Complete && size <= self.max_stream_bytes {
            let mut entry =
                StoredAnswer::from_upstream(meta, live.status, &live.headers, live.body());
            entry.usage = completion.usage();
            // Before the stream is finished and the flight ends: later requests find it.
            self.store(Arc::new(entry)).await;
        } else {
            tracing::debug!(key = %meta.key, ?verdict, size, cut = result.is_err(), "stream not stored");
            if reserved > 0 {
                self.memory.release(&meta.key).await;
            }
        }
        live.finish(result);
    }

    /// Counts one answered request, in the metrics and in the database's counters.
    fn record(&self, route: Option<Route>, model: Option<&str>, cache: CacheStatus, saved: Usage) {
        self.metrics.outcome(route, cache, saved);
        self.persist_counts(route_name(route), model, &answered(cache, saved));
    }

    /// Counts one upstream call and its status (`None`: no answer).
    fn upstream_called(
        &self,
        route: Option<Route>,
        model: Option<&str>,
        status: Option<StatusCode>,
    ) {
        let route = route_name(route);
        self.metrics.upstream_call(route, status);
        let counts = Counts {
            upstream_calls: 1,
            ..Counts::default()
        };
        self.persist_counts(route, model, &counts);
    }

    /// Answers from a stored entry at `now`, counting the hit.
    fn hit(&self, entry: &StoredAnswer, now: SystemTime) -> Answer {
        let route = Some(entry.route);
        self.metrics.outcome(route, CacheStatus::Hit, entry.usage);
        if let Some(disk) = &self.disk {
            let counts = answered(CacheStatus::Hit, entry.usage);
            let model = entry.model.as_deref().unwrap_or("");
            disk.record_hit(entry.key, route_name(route), model, &counts, now);
        }
        let mut headers = entry.hit_headers.clone();
        // In place: `insert` would first make room for one more header, and a clone has none.
        if let Some(age) = headers.get_mut(http::header::AGE) {
            *age = entry.age(now).as_secs().into();
        }
        answer_with(entry, headers, CacheStatus::Hit)
    }

    fn render(
        &self,
        outcome: FlightOutcome,
        role: CacheStatus,
        meta: &EntryMeta,
    ) -> Result<Answer, Error> {
        // A follower saved the provider the work its leader paid for.
        let record = |usage: Usage| {
            let saved = if role == CacheStatus::Coalesced {
                usage
            } else {
                Usage::default()
            };
            self.record(Some(meta.route), meta.model.as_deref(), role, saved);
        };
        match outcome {
            FlightOutcome::Stored {
                entry,
                fresh_headers: Some(headers),
            } => {
                record(entry.usage);
                Ok(stored_answer(&entry, (*headers).clone(), role))
            }
            FlightOutcome::Stored {
                entry,
                fresh_headers: None,
            } => Ok(self.hit(&entry, SystemTime::now())),
            FlightOutcome::Unstored(answer) => {
                record(Usage::default());
                let (status, headers, body) = answer.as_ref().clone();
                let mut answer = Answer {
                    status,
                    headers,
                    body: AnswerBody::Full(body),
                    cache: role,
                    key: None,
                };
                answer
                    .headers
                    .insert(CACHE_HEADER, HeaderValue::from_static(role.as_str()));
                Ok(answer)
            }
            FlightOutcome::Live(live) => {
                record(Usage::default());
                let mut headers = live.headers.clone();
                headers.insert(CACHE_HEADER, HeaderValue::from_static(role.as_str()));
                set_header(&mut headers, KEY_HEADER, &meta.key.to_hex());
                Ok(Answer {
                    status: live.status,
                    headers,
                    body: AnswerBody::Stream(live.subscribe()),
                    cache: role,
                    key: Some(meta.key),
                })
            }
            FlightOutcome::Failed(e) => Err(e),
        }
    }
}

/// The counters of one answered request.
fn answered(cache: CacheStatus, saved: Usage) -> Counts {
    let one = |status: CacheStatus| i64::from(cache == status);
    let tokens = |n: Option<u64>| n.and_then(|n| i64::try_from(n).ok()).unwrap_or(0);
    Counts {
        requests: 1,
        hits: one(CacheStatus::Hit),
        coalesced: one(CacheStatus::Coalesced),
        partials: one(CacheStatus::Partial),
        misses: one(CacheStatus::Miss),
        bypasses: one(CacheStatus::Bypass),
        saved_prompt_tokens: tokens(saved.prompt_tokens),
        saved_completion_tokens: tokens(saved.completion_tokens),
        ..Counts::default()
    }
}

/// The name counters and metrics use for a route; `other` for requests on no cacheable route.
fn route_name(route: Option<Route>) -> &'static str {
    route.map_or("other", Route::as_str)
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"))
}

/// An answer from `entry` with `headers` and the llm-dedup headers for `cache`.
fn stored_answer(entry: &StoredAnswer, mut headers: HeaderMap, cache: CacheStatus) -> Answer {
    headers.insert(CACHE_HEADER, HeaderValue::from_static(cache.as_str()));
    set_key_header(&mut headers, entry);
    answer_with(entry, headers, cache)
}

/// Sets `llm-dedup-key` to `entry`'s key, from the value made once with its hit headers.
fn set_key_header(headers: &mut HeaderMap, entry: &StoredAnswer) {
    if let Some(key) = entry.hit_headers.get(KEY_HEADER) {
        headers.insert(KEY_HEADER, key.clone());
    }
}

/// An answer from `entry` with `headers` as they are.
fn answer_with(entry: &StoredAnswer, headers: HeaderMap, cache: CacheStatus) -> Answer {
    Answer {
        status: StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK),
        headers,
        body: AnswerBody::Full(entry.body.clone()),
        cache,
        key: Some(entry.key),
    }
}

fn young_enough(entry: &StoredAnswer, max_age: Option<Duration>) -> bool {
    max_age.is_none_or(|max| entry.age(SystemTime::now()) <= max)
}

fn set_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}
