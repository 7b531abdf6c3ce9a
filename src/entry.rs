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
use crate::headers::{CACHE_HEADER, KEY_HEADER, REPLAYED_HEADERS};
use crate::key::CacheKey;
use crate::route::Route;
use crate::usage::Usage;

/// Milliseconds since the Unix epoch, the unit of every timestamp in an entry.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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
    /// Replayed response headers (see [`REPLAYED_HEADERS`]).
    pub headers: HeaderMap,
    /// The headers of a hit on it, made once from `headers` and `key` by [`hit_headers`]
    /// (a hit only sets `age`); never stored.
    pub hit_headers: HeaderMap,
    /// The decoded response body.
    pub body: Bytes,
    /// When it was stored, in Unix milliseconds.
    pub created_at: i64,
    /// When it stops being served, in Unix milliseconds.
    pub expires_at: i64,
    /// Token usage read from the body.
    pub usage: Usage,
}

/// The headers of a hit on the answer stored under `key` with replayed `headers`: those, the
/// cache status and the key, and `age` to be set by the hit. Made once per answer, so a hit
/// costs one clone and one value replaced in place (a clone has no room for another header).
pub fn hit_headers(key: &CacheKey, headers: &HeaderMap) -> HeaderMap {
    let mut all = HeaderMap::with_capacity(headers.len() + 3);
    all.extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    all.insert(CACHE_HEADER, CacheStatus::Hit.header_value());
    if let Ok(hex) = HeaderValue::from_str(&key.to_hex()) {
        all.insert(KEY_HEADER, hex);
    }
    all.insert(http::header::AGE, HeaderValue::from_static("0"));
    all
}

/// The bytes of `headers`' names and values.
fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum()
}

impl StoredAnswer {
    /// Keeps the parts of an upstream answer worth replaying.
    pub fn from_upstream(
        meta: &EntryMeta,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
    ) -> StoredAnswer {
        let now = SystemTime::now();
        let mut kept = HeaderMap::new();
        for name in REPLAYED_HEADERS {
            for value in headers.get_all(*name) {
                kept.append(HeaderName::from_static(name), value.clone());
            }
        }
        StoredAnswer {
            key: meta.key,
            namespace: meta.namespace.clone(),
            route: meta.route,
            model: meta.model.clone(),
            status: status.as_u16(),
            hit_headers: hit_headers(&meta.key, &kept),
            headers: kept,
            usage: Usage::from_body(&body),
            body,
            created_at: unix_ms(now),
            expires_at: unix_ms(now + meta.ttl),
        }
    }

    /// The size counted against memory and disk bounds: body, headers, and fixed overhead.
    pub fn size(&self) -> u64 {
        (self.body.len() + header_bytes(&self.headers) + self.namespace.len() + 160) as u64
    }

    /// The size counted against the memory bound: [`StoredAnswer::size`] plus the headers
    /// made for hits, which only the memory tier holds.
    pub fn memory_size(&self) -> u64 {
        self.size() + header_bytes(&self.hit_headers) as u64
    }

    /// How long ago it was stored, as of `now`.
    pub fn age(&self, now: SystemTime) -> Duration {
        Duration::from_millis(u64::try_from(unix_ms(now) - self.created_at).unwrap_or(0))
    }

    /// Whether it may still be served at `now`.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        unix_ms(now) < self.expires_at
    }

    /// The replayed headers as `(name, value)` text pairs, the form kept on disk. A value that
    /// is not visible ASCII cannot be written that way and is left out.
    pub fn header_pairs(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
            .collect()
    }

    /// Rebuilds replayed headers from their on-disk form; pairs that are not valid headers
    /// are left out.
    pub fn headers_from_pairs(pairs: &[(String, String)]) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(pairs.len());
        for (k, v) in pairs {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                map.append(k, v);
            }
        }
        map
    }
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
        };
        let e = StoredAnswer::from_upstream(&meta, StatusCode::OK, &h, Bytes::from_static(b"{}"));
        assert_eq!(e.header_pairs(), vec![("content-type", "application/json")]);
        let back = StoredAnswer::headers_from_pairs(&[(
            "content-type".to_owned(),
            "application/json".to_owned(),
        )]);
        assert_eq!(back, e.headers);
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
            ]
        );
        // Only memory holds them, and its bound counts them.
        assert!(e.memory_size() >= e.size() + 64 + 15);
    }
}
