//! A stored answer: what both cache tiers hold and what a hit replays.
//!
//! This module owns the shape of an entry and the rules for what of an upstream answer is kept:
//! the decoded body, the few response headers worth replaying, and the token usage (so the
//! inspector can report what the cache saved). It never holds a request header, so no
//! credential can reach an entry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::answer::CacheStatus;
use crate::headers::{CACHE_HEADER, KEY_HEADER, REPLAYED_HEADERS, SAVED_HEADER};
use crate::key::CacheKey;
use crate::route::{MAX_MODEL_CHARS, Route};
use crate::sse::{Completion, EventSplitter};
use crate::usage::Usage;

/// Milliseconds since the Unix epoch, the unit of every timestamp in an entry.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// An answer beyond the first of a bucket (several answers kept under one key for sampled
/// requests): the key of its bucket, and its place in it. It is stored under
/// [`CacheKey::slot`] of that key; the first answer of a bucket is stored under the key itself
/// and has no `Slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The key of the bucket (of its first answer).
    pub of: CacheKey,
    /// Its place, 1 to [`crate::key::MAX_BUCKET`] - 1.
    pub index: u8,
}

impl Slot {
    /// Where the answer stored under `key`'s bucket at `index` lies: `None` for the first.
    pub fn at(key: CacheKey, index: u8) -> Option<Slot> {
        (index > 0).then_some(Slot { of: key, index })
    }

    /// Whether `key` is the key this answer is stored under (a file or a Redis value may say
    /// anything: a slot whose key is not derived from its bucket's is not one).
    #[cfg_attr(not(any(feature = "sqlite", feature = "redis")), allow(dead_code))] // The tiers' own.
    pub fn names(&self, key: &CacheKey) -> bool {
        self.index > 0 && self.index < crate::key::MAX_BUCKET && self.of.slot(self.index) == *key
    }
}

/// The key of the request an answer stored under `key` at `bucket` answers: the bucket's
/// key, for every answer of a bucket (what `llm-dedup-key` says, and what `show` and `purge`
/// take for the whole bucket).
pub fn asked_key(key: CacheKey, bucket: Option<Slot>) -> CacheKey {
    bucket.map_or(key, |slot| slot.of)
}

/// What the request side knows about an entry before the answer arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    /// The key the answer will be stored under.
    pub key: CacheKey,
    /// The request's namespace.
    pub namespace: String,
    /// The route.
    pub route: Route,
    /// The model named by the request, if any.
    pub model: Option<String>,
    /// How long the answer lives.
    pub ttl: Duration,
    /// Its place in a bucket, when it is not the first answer of its key.
    pub bucket: Option<Slot>,
}

/// A complete 2xx answer, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    /// The key it is stored under.
    pub key: CacheKey,
    /// The namespace of the request that stored it.
    pub namespace: String,
    /// The route it answers.
    pub route: Route,
    /// The model named by the request, if any.
    pub model: Option<String>,
    /// The HTTP status (always 2xx).
    pub status: u16,
    /// The headers of a hit on it: the replayed response headers (see [`REPLAYED_HEADERS`]),
    /// then `llm-dedup-cache: hit`, `llm-dedup-key` and `age`, made once by [`hit_headers`]
    /// (a hit only sets `age`). The replayed ones alone are [`StoredAnswer::replayed`]; one map
    /// is kept, not two, because each costs hundreds of bytes per entry.
    pub hit_headers: HeaderMap,
    /// The decoded response body.
    pub body: Bytes,
    /// When it was stored, in Unix milliseconds.
    pub created_at: i64,
    /// When it stops being served, in Unix milliseconds.
    pub expires_at: i64,
    /// Token usage read from the body.
    pub usage: Usage,
    /// The model the answer reports, when it differs from the request's (a dated snapshot,
    /// or the model behind an Azure deployment): what the provider billed.
    pub billed_model: Option<String>,
    /// Its place in a bucket, when it is not the first answer of its key.
    pub bucket: Option<Slot>,
}

/// What an answer says of its own cost: its token usage and the model it reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Billing {
    /// The token usage.
    pub usage: Usage,
    /// The model the answer reports.
    pub model: Option<String>,
}

impl Billing {
    /// Reads a parsed JSON answer.
    pub fn of_answer(answer: &serde_json::Value) -> Billing {
        let model = answer.get("model").and_then(serde_json::Value::as_str);
        Billing {
            usage: Usage::of_answer(answer),
            model: model.map(|m| m.chars().take(MAX_MODEL_CHARS).collect()),
        }
    }

    /// Reads a stored body on `route`: a JSON answer, or the events of a stream.
    pub fn of_body(route: Route, body: &[u8]) -> Billing {
        if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            return serde_json::from_slice(body)
                .map_or_else(|_| Billing::default(), |v| Billing::of_answer(&v));
        }
        let mut completion = Completion::new(route);
        let mut split = EventSplitter::default();
        for event in split.push(body).into_iter().chain(split.rest()) {
            completion.observe(&event);
        }
        Billing::of_stream(&completion)
    }

    /// What a stream reported.
    pub fn of_stream(completion: &Completion) -> Billing {
        Billing {
            usage: completion.usage(),
            model: completion.model().map(str::to_owned),
        }
    }
}

/// The headers of a hit on the answer stored under `key` with replayed `headers`: those, the
/// cache status and the key, and `age` and `llm-dedup-saved-usd` to be set by the hit. Made
/// once per answer, so a hit costs one clone and values replaced in place (a clone has no room
/// for another header).
pub fn hit_headers(key: &CacheKey, headers: &HeaderMap) -> HeaderMap {
    let mut all = HeaderMap::with_capacity(headers.len() + 4);
    all.extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    all.insert(CACHE_HEADER, CacheStatus::Hit.header_value());
    if let Ok(hex) = HeaderValue::from_str(&key.to_hex()) {
        all.insert(KEY_HEADER, hex);
    }
    all.insert(http::header::AGE, HeaderValue::from_static("0"));
    all.insert(SAVED_HEADER, HeaderValue::from_static("0"));
    all
}

/// Whether a header of a hit's map is one [`hit_headers`] added, not a replayed one.
#[cfg_attr(not(any(feature = "sqlite", feature = "redis")), allow(dead_code))] // The tiers' own.
fn added_for_hits(name: &HeaderName) -> bool {
    *name == CACHE_HEADER
        || *name == KEY_HEADER
        || name == http::header::AGE
        || *name == SAVED_HEADER
}

/// The memory tier's own bookkeeping per entry, beyond the entry: moka's node, its slot in
/// the concurrent hash table, its place in the access and write queues. Measured with
/// `tests/memory.rs` (a counting allocator: about 1,765 live bytes per entry of a ~330-byte
/// chat answer, of which the rest of [`StoredAnswer::memory_size`] accounts for 1,632), and
/// rounded up.
const TIER_ENTRY_OVERHEAD: usize = 160;

/// What the allocator takes for a request of `n` bytes: glibc adds 8 bytes of bookkeeping and
/// rounds up to 16, never less than 32.
fn allocated(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n + 8).next_multiple_of(16).max(32)
    }
}

/// Heap bytes of a hit's header map: its index and entry tables, and each value's buffer
/// (with the shared header it gets once a hit clones it). Names are `'static` (replayed names
/// are always made with [`HeaderName::from_static`]), and so are the values of
/// `llm-dedup-cache`, `age` and `llm-dedup-saved-usd`.
fn header_map_heap(headers: &HeaderMap) -> usize {
    // http's `Pos` is 4 bytes; a `Bucket` holds a hash, links, a name and a value.
    let raw = headers.capacity().next_power_of_two().max(8);
    let bucket = 24 + std::mem::size_of::<HeaderName>() + std::mem::size_of::<HeaderValue>();
    let tables = allocated(raw * 4) + allocated(headers.capacity() * bucket);
    let values: usize = headers
        .iter()
        .filter(|(name, _)| {
            *name != CACHE_HEADER && *name != http::header::AGE && *name != SAVED_HEADER
        })
        .map(|(_, value)| allocated(value.len()) + allocated(24))
        .sum();
    tables + values
}

/// The replayed headers of an upstream answer's `headers` (see [`REPLAYED_HEADERS`]): what
/// a hit, or a caller of another credential sharing a flight, may see of the answer. The values
/// are copies, so they hold no buffer of the upstream's answer.
pub fn replayed_headers(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for name in REPLAYED_HEADERS {
        for value in headers.get_all(*name) {
            let owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or(value.clone());
            kept.append(HeaderName::from_static(name), owned);
        }
    }
    kept
}

/// What a tier (SQLite or Redis) keeps of an entry, as read back from it.
pub struct KeptEntry {
    /// The key the entry is stored under.
    pub key: CacheKey,
    /// Its place in a bucket, if it is not the key's first answer.
    pub bucket: Option<Slot>,
    /// See [`StoredAnswer::namespace`].
    pub namespace: String,
    /// See [`StoredAnswer::route`].
    pub route: Route,
    /// See [`StoredAnswer::model`].
    pub model: Option<String>,
    /// See [`StoredAnswer::status`].
    pub status: u16,
    /// The replayed headers, as text pairs.
    pub header_pairs: Vec<(String, String)>,
    /// See [`StoredAnswer::body`].
    pub body: Bytes,
    /// See [`StoredAnswer::created_at`].
    pub created_at: i64,
    /// See [`StoredAnswer::expires_at`].
    pub expires_at: i64,
}

impl StoredAnswer {
    /// Keeps the parts of an upstream answer worth replaying, reading its usage and model
    /// from `body` (see [`StoredAnswer::new`] for what `body` must be).
    pub fn from_upstream(
        meta: &EntryMeta,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
    ) -> StoredAnswer {
        let billing = Billing::of_body(meta.route, &body);
        StoredAnswer::new(meta, status, headers, body, billing)
    }

    /// Keeps the parts of an upstream answer worth replaying. `body` must own exactly its
    /// bytes: a slice of a larger buffer (what a network read returns) would keep the whole
    /// buffer alive while the memory bound counts only the slice, so such a body is copied
    /// first ([`Bytes::copy_from_slice`]). Header values are copied here, for the same reason.
    pub fn new(
        meta: &EntryMeta,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        billing: Billing,
    ) -> StoredAnswer {
        let created_at = unix_ms(SystemTime::now());
        // Saturating: a TTL no clock can hold means "as long as the clock goes".
        let ttl_ms = i64::try_from(meta.ttl.as_millis()).unwrap_or(i64::MAX);
        let kept = replayed_headers(headers);
        StoredAnswer {
            key: meta.key,
            namespace: meta.namespace.clone(),
            route: meta.route,
            model: meta.model.clone(),
            status: status.as_u16(),
            hit_headers: hit_headers(&asked_key(meta.key, meta.bucket), &kept),
            usage: billing.usage,
            billed_model: billed_model(meta.model.as_deref(), billing.model),
            body,
            created_at,
            expires_at: created_at.saturating_add(ttl_ms),
            bucket: meta.bucket,
        }
    }

    /// An entry a tier kept, read back: its hit headers made again from its replayed header
    /// pairs, and its usage and billed model read from its body, the record of what the
    /// provider said (the token figures a tier keeps beside it are copies for readers that
    /// do not parse bodies, and cannot disagree with it here).
    #[cfg_attr(not(any(feature = "sqlite", feature = "redis")), allow(dead_code))] // The tiers' own.
    pub fn read_back(kept: KeptEntry) -> StoredAnswer {
        let headers = StoredAnswer::headers_from_pairs(&kept.header_pairs);
        let billing = Billing::of_body(kept.route, &kept.body);
        StoredAnswer {
            key: kept.key,
            namespace: kept.namespace,
            route: kept.route,
            billed_model: billed_model(kept.model.as_deref(), billing.model),
            model: kept.model,
            status: kept.status,
            hit_headers: hit_headers(&asked_key(kept.key, kept.bucket), &headers),
            body: kept.body,
            created_at: kept.created_at,
            expires_at: kept.expires_at,
            usage: billing.usage,
            bucket: kept.bucket,
        }
    }

    /// The model to price this answer as: the one it reports, else the request's.
    pub fn priced_model(&self) -> Option<&str> {
        self.billed_model.as_deref().or(self.model.as_deref())
    }

    /// The replayed response headers (see [`REPLAYED_HEADERS`]).
    #[cfg_attr(not(any(feature = "sqlite", feature = "redis")), allow(dead_code))] // The tiers' own.
    pub fn replayed(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.hit_headers
            .iter()
            .filter(|(name, _)| !added_for_hits(name))
    }

    /// The size counted against the disk bound: body, replayed headers, and a fixed overhead
    /// per row.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))] // The disk tier's own.
    pub fn size(&self) -> u64 {
        let headers: usize = self
            .replayed()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        (self.body.len() + headers + self.namespace.len() + 160) as u64
    }

    /// The bytes the memory tier really holds for this entry, counted against its bound:
    /// the entry in its `Arc`, its heap parts (body, strings, header tables and values) as the
    /// allocator takes them, and the tier's bookkeeping per entry. `tests/memory.rs` checks
    /// that a full tier keeps about this much alive and no more.
    pub fn memory_size(&self) -> u64 {
        let strings = allocated(self.namespace.capacity())
            + [&self.model, &self.billed_model]
                .into_iter()
                .flatten()
                .map(|m| allocated(m.capacity()))
                .sum::<usize>();
        // The body's buffer, and its shared header once a hit clones it.
        let body = allocated(self.body.len()) + allocated(24);
        let entry = allocated(std::mem::size_of::<StoredAnswer>() + 16);
        (entry + body + strings + header_map_heap(&self.hit_headers) + TIER_ENTRY_OVERHEAD) as u64
    }

    /// How long ago it was stored, as of `now`.
    pub fn age(&self, now: SystemTime) -> Duration {
        let ms = unix_ms(now).saturating_sub(self.created_at);
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }

    /// Whether it may still be served at `now`.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        unix_ms(now) < self.expires_at
    }

    /// The replayed headers as `(name, value)` text pairs, the form kept on disk. A value that
    /// is not visible ASCII cannot be written that way and is left out.
    #[cfg_attr(not(any(feature = "sqlite", feature = "redis")), allow(dead_code))] // The tiers' own.
    pub fn header_pairs(&self) -> Vec<(&str, &str)> {
        self.replayed()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
            .collect()
    }

    /// Rebuilds replayed headers from their on-disk form. Only names in [`REPLAYED_HEADERS`]
    /// are kept (whatever a file says, a hit never replays another header), and pairs that
    /// are not valid headers are left out.
    #[cfg_attr(not(any(feature = "sqlite", feature = "redis")), allow(dead_code))] // The tiers' own.
    pub fn headers_from_pairs(pairs: &[(String, String)]) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(pairs.len());
        for (k, v) in pairs {
            let Some(name) = REPLAYED_HEADERS.iter().find(|n| k.eq_ignore_ascii_case(n)) else {
                continue;
            };
            if let Ok(v) = HeaderValue::try_from(v) {
                map.append(HeaderName::from_static(name), v);
            }
        }
        map
    }
}

/// The model an answer reports, kept only when it says more than the request's `requested`.
pub fn billed_model(requested: Option<&str>, reported: Option<String>) -> Option<String> {
    reported.filter(|r| Some(r.as_str()) != requested)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_replayable_headers() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("5"),
        );
        h.insert("set-cookie", HeaderValue::from_static("a=b"));
        let key = CacheKey::from_hex(&"ab".repeat(32)).expect("hex");
        let meta = EntryMeta {
            key,
            namespace: String::new(),
            route: Route::Embeddings,
            model: None,
            ttl: Duration::from_secs(60),
            bucket: None,
        };
        let e = StoredAnswer::from_upstream(&meta, StatusCode::OK, &h, Bytes::from_static(b"{}"));
        assert_eq!(e.header_pairs(), vec![("content-type", "application/json")]);
        let back = StoredAnswer::headers_from_pairs(&[(
            "content-type".to_owned(),
            "application/json".to_owned(),
        )]);
        let replayed: HeaderMap = e.replayed().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(back, replayed);
        assert!(e.is_fresh(SystemTime::now()));
        assert!(!e.is_fresh(SystemTime::now() + Duration::from_secs(61)));

        // A hit's headers: the replayed ones, the cache status, the key, and room for `age`.
        let hit: Vec<(&str, &str)> = e
            .hit_headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().expect("ascii")))
            .collect();
        let hex = key.to_hex();
        assert_eq!(
            hit,
            vec![
                ("content-type", "application/json"),
                ("llm-dedup-cache", "hit"),
                ("llm-dedup-key", hex.as_str()),
                ("age", "0"),
                ("llm-dedup-saved-usd", "0"),
            ]
        );
        // Only memory holds them, and its bound counts them.
        assert!(e.memory_size() >= e.size() + 64 + 15);
    }
}
