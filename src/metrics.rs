//! What the engine did, as Prometheus metrics.
//!
//! This module owns one engine's registry (no global state: two engines, two registries) and
//! the names of its metrics. It is told about outcomes by the engine and renders the
//! Prometheus text format on demand; it never blocks and never touches the disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::answer::CacheStatus;
use crate::prices::{Saved, Usd};
use crate::route::Route;

/// Routes, plus requests on none (`other`).
const ROUTE_SLOTS: usize = 7;
/// Cache outcomes.
const OUTCOME_SLOTS: usize = 5;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    route: &'static str,
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    route: &'static str,
    status: &'static str,
}

/// Which upstream timeout fired: `connect`, `first_byte`, `idle`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TimeoutLabels {
    pub kind: &'static str,
}

/// Upstream timeouts that fired, by kind (`llm_dedup_upstream_timeouts_total`).
pub(crate) type TimeoutCounters = Family<TimeoutLabels, Counter>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InputLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    /// The model as the price table lists it: bounded by the table, not by clients.
    model: String,
}

/// A counter of US dollars: added to in integer nanodollars (exact), shown in dollars.
#[derive(Clone, Debug, Default)]
struct UsdCounter(Arc<AtomicU64>);

impl UsdCounter {
    fn add(&self, amount: Usd) {
        self.0.fetch_add(amount.nanos(), Ordering::Relaxed);
    }
}

impl TypedMetric for UsdCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for UsdCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let usd = Usd::from_nanos(self.0.load(Ordering::Relaxed)).as_f64();
        encoder.encode_counter::<NoLabelSet, _, u64>(&usd, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// What kind of value read from Redis was not trusted.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabels {
    kind: &'static str,
}

/// Why the proxy's edge turned a client away.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    pub reason: &'static str,
}

/// What the proxy's edge reports, moved by its accept loop as connections open and close and
/// as request bytes arrive and are given back.
#[derive(Clone, Default)]
pub(crate) struct EdgeFigures {
    /// Client connections open.
    pub connections: Gauge,
    /// Bytes of request bodies held.
    pub bytes_held: Gauge,
    /// Clients turned away, by reason: `max_connections`, `max_buffered`, `body_timeout`.
    pub refused: Family<RefusalLabels, Counter>,
}

impl EdgeFigures {
    /// Counts a client turned away for `reason`.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }
}

/// The engine's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    /// The counters of `requests`, by route and outcome, each looked up in the family once:
    /// counting a request is then one atomic add, not a locked map lookup.
    outcome_counters: [[OnceLock<Counter>; OUTCOME_SLOTS]; ROUTE_SLOTS],
    saved_prompt: Counter,
    saved_completion: Counter,
    saved_usd: Family<ModelLabels, UsdCounter>,
    upstream: Family<UpstreamLabels, Counter>,
    embedding_inputs: Family<InputLabels, Counter>,
    memory_bytes: Gauge,
    memory_entries: Gauge,
    write_queue: Gauge,
    in_flight: Gauge,
    stream_buffer: Gauge,
    store_errors: Counter,
    redis_errors: Counter,
    redis_rejected: Family<RejectedLabels, Counter>,
    absorbed_429: Counter,
    /// Handed to the upstream client, which counts the timeouts that fire.
    pub(crate) upstream_timeouts: TimeoutCounters,
    /// Handed to the proxy's edge, if it has one.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) edge: EdgeFigures,
    retries: Counter,
    queue_wait: Histogram,
    prefix_hold: Histogram,
    provider_cache_read: Counter,
    provider_cache_write: Counter,
    provider_cache_saved: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    /// The histogram's count and sum, kept again for the live page (the histogram's own are
    /// not readable): requests that waited for budget (a millisecond or more), and
    /// microseconds waited in all.
    waits: AtomicU64,
    waited_us: AtomicU64,
}

/// Gauges read at scrape time.
pub(crate) struct Levels {
    pub memory_bytes: u64,
    pub memory_entries: u64,
    pub write_queue: usize,
    pub in_flight: usize,
    pub stream_buffer_bytes: u64,
    /// The store's count of failed writes, since it opened.
    pub store_errors: u64,
    /// Redis calls that failed or timed out so far.
    pub redis_errors: u64,
    /// Values read from Redis and not trusted so far, by kind.
    pub redis_rejected: Vec<(&'static str, u64)>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("llm_dedup");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and cache outcome (hit, miss, coalesced, partial, bypass)",
            requests.clone(),
        );
        let upstream = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_calls",
            "Calls made to the upstream, by route and status class (2xx, 4xx, 5xx, error)",
            upstream.clone(),
        );
        let tokens_saved = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens_saved",
            "Tokens the provider did not process thanks to the cache (prompt, completion)",
            tokens_saved.clone(),
        );
        let saved_usd = Family::<ModelLabels, UsdCounter>::default();
        registry.register(
            "cost_saved_usd",
            "What the provider would have charged for the answers the cache gave, in US dollars, by the model they are priced as",
            saved_usd.clone(),
        );
        let memory_bytes = Gauge::default();
        registry.register(
            "memory_tier_bytes",
            "Bytes held by the memory tier",
            memory_bytes.clone(),
        );
        let memory_entries = Gauge::default();
        registry.register(
            "memory_tier_entries",
            "Entries held by the memory tier",
            memory_entries.clone(),
        );
        let write_queue = Gauge::default();
        registry.register(
            "write_queue_depth",
            "Answers waiting to be written to the database",
            write_queue.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight",
            "Distinct requests waiting on an upstream call",
            in_flight.clone(),
        );
        let stream_buffer = Gauge::default();
        registry.register(
            "stream_buffer_bytes",
            "Bytes held by the buffers of streamed answers in flight",
            stream_buffer.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Writes to the cache database that failed (retried with the next batch) or were refused because too many answers were waiting",
            store_errors.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Calls to the fleet's Redis that failed or timed out (the replica went on alone)",
            redis_errors.clone(),
        );
        let redis_rejected = Family::<RejectedLabels, Counter>::default();
        registry.register(
            "redis_rejected",
            "Values read from the fleet's Redis and not trusted, by kind (entry, refusal, lease, \
             stream, message, peer_token: not sealed with the fleet secret; malformed: not \
             readable); each is ignored, and Redis stays on",
            redis_rejected.clone(),
        );
        let upstream_timeouts = TimeoutCounters::default();
        registry.register(
            "upstream_timeouts",
            "Upstream calls that ran past a timeout, by which (connect, first_byte, idle)",
            upstream_timeouts.clone(),
        );
        let edge = EdgeFigures::default();
        registry.register(
            "connections_open",
            "Client connections open (bounded by --max-connections)",
            edge.connections.clone(),
        );
        registry.register(
            "request_bytes_held",
            "Bytes of request bodies held in memory (bounded by --max-buffered)",
            edge.bytes_held.clone(),
        );
        registry.register(
            "clients_refused",
            "Requests and connections the proxy turned away, by reason (max_connections: \
             answered 503; max_buffered: 503; body_timeout: 408)",
            edge.refused.clone(),
        );
        let absorbed_429 = Counter::default();
        registry.register(
            "upstream_429_absorbed",
            "Upstream 429 answers waited out and retried instead of passed on (governor)",
            absorbed_429.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "upstream_retries",
            "Upstream calls retried (governor)",
            retries.clone(),
        );
        let embedding_inputs = Family::<InputLabels, Counter>::default();
        registry.register(
            "embedding_inputs",
            "Embedding inputs answered, by where their embedding came from (cache, coalesced: \
             an identical input in flight or earlier in the request, upstream)",
            embedding_inputs.clone(),
        );
        let queue_wait = Histogram::new([0.001, 0.01, 0.1, 1.0, 10.0, 60.0]);
        registry.register(
            "queue_wait_seconds",
            "Time requests waited for upstream budget (governor)",
            queue_wait.clone(),
        );
        let prefix_hold = Histogram::new([0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0]);
        registry.register(
            "prefix_hold_seconds",
            "Time upstream calls waited while another request wrote a prompt prefix they share \
             in the provider's cache (--prefix-wait)",
            prefix_hold.clone(),
        );
        let provider_cache = Family::<TokenLabels, Counter>::default();
        registry.register(
            "provider_cache_tokens",
            "Prompt tokens of upstream calls the provider read from its own prompt cache, or \
             wrote to it (kind: read, write), as its answers report them",
            provider_cache.clone(),
        );
        let provider_cache_saved = Family::<ModelLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "provider_cache_saved_usd",
            "What the provider's own prompt cache saved on upstream calls against the plain \
             input price, in US dollars, by the model they are priced as (writes cost more than \
             plain input, so this can fall)",
            provider_cache_saved.clone(),
        );
        // Each in a statement of its own: the family's read guard lives to the end of one.
        let provider_cache_read = provider_cache
            .get_or_create(&TokenLabels { kind: "read" })
            .clone();
        let provider_cache_write = provider_cache
            .get_or_create(&TokenLabels { kind: "write" })
            .clone();
        let saved_prompt = tokens_saved
            .get_or_create(&TokenLabels { kind: "prompt" })
            .clone();
        let saved_completion = tokens_saved
            .get_or_create(&TokenLabels { kind: "completion" })
            .clone();
        Metrics {
            upstream_timeouts,
            edge,
            outcome_counters: Default::default(),
            saved_prompt,
            saved_completion,
            saved_usd,
            absorbed_429,
            retries,
            queue_wait,
            prefix_hold,
            provider_cache_read,
            provider_cache_write,
            provider_cache_saved,
            waits: AtomicU64::new(0),
            waited_us: AtomicU64::new(0),
            registry,
            requests,
            upstream,
            embedding_inputs,
            memory_bytes,
            memory_entries,
            write_queue,
            in_flight,
            stream_buffer,
            store_errors,
            redis_errors,
            redis_rejected,
        }
    }

    /// Counts one answered request.
    pub(crate) fn outcome(&self, route: Option<Route>, cache: CacheStatus, saved: &Saved<'_>) {
        let labels = || OutcomeLabels {
            route: route.map_or("other", Route::as_str),
            cache: cache.as_str(),
        };
        let slot = route.map_or(0, |r| r as usize + 1);
        match self
            .outcome_counters
            .get(slot)
            .and_then(|row| row.get(cache as usize))
        {
            Some(counter) => counter
                .get_or_init(|| self.requests.get_or_create(&labels()).clone())
                .inc(),
            None => self.requests.get_or_create(&labels()).inc(),
        };
        for (counter, n) in [
            (&self.saved_prompt, saved.usage.prompt_tokens),
            (&self.saved_completion, saved.usage.completion_tokens),
        ] {
            if let Some(n) = n.filter(|n| *n > 0) {
                counter.inc_by(n);
            }
        }
        if let Some((model, usd)) = saved.priced.filter(|(_, usd)| usd.nanos() > 0) {
            let labels = ModelLabels {
                model: model.to_owned(),
            };
            self.saved_usd.get_or_create(&labels).add(usd);
        }
    }

    /// Counts the inputs of one embeddings request by where their embeddings came from.
    pub(crate) fn embedding_inputs(&self, cached: u64, coalesced: u64, upstream: u64) {
        for (source, n) in [
            ("cache", cached),
            ("coalesced", coalesced),
            ("upstream", upstream),
        ] {
            if n > 0 {
                self.embedding_inputs
                    .get_or_create(&InputLabels { source })
                    .inc_by(n);
            }
        }
    }

    /// Records how long a request waited in line for upstream budget.
    pub(crate) fn queue_wait(&self, waited: std::time::Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
        // The page counts requests that really waited: most pass the line at once.
        if waited >= std::time::Duration::from_millis(1) {
            self.waits.fetch_add(1, Ordering::Relaxed);
            let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
            self.waited_us.fetch_add(us, Ordering::Relaxed);
        }
    }

    /// Records how long an upstream call waited while another request wrote a prefix.
    pub(crate) fn prefix_held(&self, held: std::time::Duration) {
        self.prefix_hold.observe(held.as_secs_f64());
    }

    /// Counts what the provider's own prompt cache did for one upstream call: tokens read
    /// and written, and what it saved for the model priced as `saved.0` (nanodollars).
    pub(crate) fn provider_cache(&self, read: u64, written: u64, saved: Option<(&str, i64)>) {
        self.provider_cache_read.inc_by(read);
        self.provider_cache_write.inc_by(written);
        if let Some((model, nanos)) = saved {
            self.provider_cache_saved
                .get_or_create(&ModelLabels {
                    model: model.to_owned(),
                })
                .inc_by(nanos as f64 / 1e9);
        }
    }

    /// Requests that waited in line for budget so far, and the time they waited in all.
    pub(crate) fn waited(&self) -> (u64, std::time::Duration) {
        let us = self.waited_us.load(Ordering::Relaxed);
        (
            self.waits.load(Ordering::Relaxed),
            std::time::Duration::from_micros(us),
        )
    }

    /// Counts a refusal that will be waited out and retried.
    pub(crate) fn retried(&self, was_429: bool) {
        self.retries.inc();
        if was_429 {
            self.absorbed_429.inc();
        }
    }

    /// Counts one upstream call and how it ended (`None`: no answer at all).
    pub(crate) fn upstream_call(&self, route: &'static str, status: Option<http::StatusCode>) {
        let status = match status.map(|s| s.as_u16()) {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(_) => "5xx",
            None => "error",
        };
        self.upstream
            .get_or_create(&UpstreamLabels { route, status })
            .inc();
    }

    /// The metrics in Prometheus text format, with gauges set to `levels`.
    pub(crate) fn render(&self, levels: Levels) -> String {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.memory_bytes.set(clamp(levels.memory_bytes));
        self.memory_entries.set(clamp(levels.memory_entries));
        self.write_queue.set(clamp(levels.write_queue as u64));
        self.in_flight.set(clamp(levels.in_flight as u64));
        self.stream_buffer.set(clamp(levels.stream_buffer_bytes));
        // The store keeps the count; the counter catches up with it (it only grows).
        let behind = levels.store_errors.saturating_sub(self.store_errors.get());
        self.store_errors.inc_by(behind);
        let behind = levels.redis_errors.saturating_sub(self.redis_errors.get());
        self.redis_errors.inc_by(behind);
        for (kind, n) in levels.redis_rejected {
            let counter = self.redis_rejected.get_or_create(&RejectedLabels { kind });
            counter.inc_by(n.saturating_sub(counter.get()));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
