//! Per-request cache controls, read from request headers.
//!
//! This module owns the vocabulary a client uses to steer the cache for one request: the
//! RFC 9111 request directives `no-store`, `no-cache`, `max-age=N` and `only-if-cached` in
//! `Cache-Control`, plus `llm-dedup-ttl` and `llm-dedup-namespace`. It only parses; the engine
//! decides what the controls mean for a request.

use std::time::Duration;

use http::{HeaderMap, HeaderName};

use crate::headers::{BUCKET_HEADER, NAMESPACE_HEADER, PREFIX_HEADER, TTL_HEADER};
use crate::key::MAX_BUCKET;

// Comparing with a `HeaderName` skips parsing the name on every request; a `static` (not a
// `const`) is not built and dropped on every use.
static TTL: HeaderName = HeaderName::from_static(TTL_HEADER);
static NAMESPACE: HeaderName = HeaderName::from_static(NAMESPACE_HEADER);
static PREFIX: HeaderName = HeaderName::from_static(PREFIX_HEADER);

/// Longest namespace accepted.
const MAX_NAMESPACE_LEN: usize = 128;

/// Longest time to live a request may ask for: ten years. Past that, an expiry time stops
/// meaning anything (and far enough past it, no clock can hold it).
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Largest `max-age` taken as given: RFC 9111 §1.2.2 reads any larger delta-seconds, however
/// many digits it has, as 2^31.
const MAX_AGE_CAP: u64 = 1 << 31;

/// Reads delta-seconds (RFC 9111 §1.2.2: one or more digits, nothing else), saturating.
fn delta_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse::<u64>().unwrap_or(u64::MAX))
}

/// What a request asks of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControls {
    /// `no-store`: neither read nor write the cache.
    pub no_store: bool,
    /// `no-cache`: do not read the cache, but store the fresh answer.
    pub no_cache: bool,
    /// `only-if-cached`: answer from the cache or fail with `504`.
    pub only_if_cached: bool,
    /// `max-age=N`: only use entries younger than this.
    pub max_age: Option<Duration>,
    /// `llm-dedup-ttl`: how long the answer stored by this request lives.
    pub ttl: Option<Duration>,
    /// `llm-dedup-namespace`: a separate key space; empty when not given.
    pub namespace: String,
    /// `llm-dedup-prefix: off`: never held while another request writes a prefix it shares.
    pub no_prefix_hold: bool,
    /// `llm-dedup-bucket: N`: keep up to N answers under the request's key, then serve one of
    /// them at random.
    pub bucket: Option<u8>,
}

impl CacheControls {
    /// Whether the request says how long an answer may be kept or used (`llm-dedup-ttl`, or
    /// `Cache-Control: max-age`): what caching an answer that may go stale needs.
    pub fn asks_lifetime(&self) -> bool {
        self.ttl.is_some() || self.max_age.is_some()
    }

    /// Reads the controls from request headers. Unknown `Cache-Control` directives are ignored,
    /// as RFC 9111 asks; a malformed `llm-dedup-*` header is an error naming the header.
    pub fn from_headers(headers: &HeaderMap) -> Result<CacheControls, String> {
        let mut c = CacheControls::default();
        // One pass over the headers, the first of each llm-dedup header counting: cheaper on
        // every request than three hashed lookups for headers that are seldom there.
        let (mut ttl, mut namespace) = (None, None);
        for (name, value) in headers {
            if *name == TTL {
                ttl = ttl.or(Some(value));
                continue;
            }
            if *name == NAMESPACE {
                namespace = namespace.or(Some(value));
                continue;
            }
            if *name == PREFIX {
                c.no_prefix_hold = match value.to_str().map(|v| v.trim().to_ascii_lowercase()) {
                    Ok(v) if v == "off" => true,
                    Ok(v) if v == "on" => false,
                    _ => return Err(format!("{PREFIX_HEADER} must be on or off")),
                };
                continue;
            }
            if *name == BUCKET_HEADER {
                let size = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u8>().ok())
                    .filter(|n| (1..=MAX_BUCKET).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "{} must be a whole number of answers from 1 to {MAX_BUCKET}",
                            BUCKET_HEADER.as_str()
                        )
                    })?;
                c.bucket = c.bucket.or(Some(size));
                continue;
            }
            if *name != http::header::CACHE_CONTROL {
                continue;
            }
            let Ok(value) = value.to_str() else {
                return Err("Cache-Control header is not visible ASCII".into());
            };
            for directive in value.split(',') {
                let directive = directive.trim();
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive, None),
                };
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => c.no_store = true,
                    "no-cache" => c.no_cache = true,
                    "only-if-cached" => c.only_if_cached = true,
                    "max-age" => {
                        let secs = arg.and_then(delta_seconds).ok_or_else(|| {
                            format!(
                                "Cache-Control max-age must be whole seconds, got {directive:?}"
                            )
                        })?;
                        c.max_age = Some(Duration::from_secs(secs.min(MAX_AGE_CAP)));
                    }
                    _ => {}
                }
            }
        }
        if let Some(ttl) = ttl {
            let secs = ttl
                .to_str()
                .ok()
                .and_then(|t| delta_seconds(t.trim()))
                .filter(|s| (1..=MAX_TTL.as_secs()).contains(s))
                .ok_or_else(|| {
                    format!(
                        "{TTL_HEADER} must be a whole number of seconds from 1 to {} (ten years)",
                        MAX_TTL.as_secs()
                    )
                })?;
            c.ttl = Some(Duration::from_secs(secs));
        }
        if let Some(ns) = namespace {
            let ns = ns
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|n| {
                    !n.is_empty()
                        && n.len() <= MAX_NAMESPACE_LEN
                        && n.bytes().all(|b| b.is_ascii_graphic())
                })
                .ok_or_else(|| {
                    format!(
                        "{NAMESPACE_HEADER} must be 1 to {MAX_NAMESPACE_LEN} visible ASCII characters"
                    )
                })?;
            c.namespace = ns.to_owned();
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&'static str, &'static str)]) -> Result<CacheControls, String> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().expect("valid header value"));
        }
        CacheControls::from_headers(&h)
    }

    #[test]
    fn reads_cache_control_directives() {
        let c = parse(&[
            ("cache-control", "No-Cache, max-age=30"),
            ("cache-control", "x-y=1"),
        ])
        .expect("valid");
        assert!(c.no_cache && !c.no_store && !c.only_if_cached);
        assert_eq!(c.max_age, Some(Duration::from_secs(30)));
        // Every Cache-Control header counts, wherever it is among the others.
        let c = parse(&[
            ("cache-control", "no-cache"),
            ("authorization", "Bearer sk-x"),
            ("llm-dedup-ttl", "60"),
            ("cache-control", "only-if-cached"),
        ])
        .expect("valid");
        assert!(c.no_cache && c.only_if_cached);
        assert_eq!(c.ttl, Some(Duration::from_secs(60)));
        let c = parse(&[("cache-control", "no-store, only-if-cached")]).expect("valid");
        assert!(c.no_store && c.only_if_cached);
        assert_eq!(parse(&[]).expect("valid"), CacheControls::default());
    }

    #[test]
    fn rejects_malformed_values_with_the_header_name() {
        assert!(parse(&[("cache-control", "max-age=soon")]).is_err());
        let e = parse(&[("llm-dedup-ttl", "-5")]).expect_err("negative ttl");
        assert!(e.contains("llm-dedup-ttl"));
        assert!(parse(&[("llm-dedup-ttl", "0")]).is_err());
        assert!(parse(&[("llm-dedup-namespace", "two words")]).is_err());
        for bad in ["0", "21", "-1", "3.0", "three", "", "300"] {
            let e = parse(&[("llm-dedup-bucket", bad)]).expect_err(bad);
            assert!(e.contains("llm-dedup-bucket"), "{e}");
        }
        let c = parse(&[("llm-dedup-bucket", " 20 ")]).expect("valid");
        assert_eq!(c.bucket, Some(20));
        assert!(parse(&[("cache-control", "max-age=+5")]).is_err());
        assert!(parse(&[("cache-control", "max-age=")]).is_err());
        for huge in ["18446744073709551615", "18446744073709551616", "315360001"] {
            let e = parse(&[("llm-dedup-ttl", huge)]).expect_err("past ten years");
            assert!(e.contains("llm-dedup-ttl"), "{e}");
        }
        assert_eq!(
            parse(&[("llm-dedup-ttl", "315360000")])
                .expect("ten years")
                .ttl,
            Some(MAX_TTL)
        );
        // A max-age of any size is read, as at most 2^31 seconds.
        let c = parse(&[("cache-control", "max-age=99999999999999999999999")]).expect("valid");
        assert_eq!(c.max_age, Some(Duration::from_secs(1 << 31)));
    }

    #[test]
    fn reads_ttl_and_namespace() {
        let c = parse(&[("llm-dedup-ttl", "90"), ("llm-dedup-namespace", "team-a")]).expect("ok");
        assert_eq!(c.ttl, Some(Duration::from_secs(90)));
        assert_eq!(c.namespace, "team-a");
    }

    /// A header value of arbitrary bytes (those `http` accepts in a value).
    fn header_value() -> impl proptest::strategy::Strategy<Value = http::HeaderValue> {
        use proptest::prelude::*;
        prop_oneof![
            // Values made of the control vocabulary, so the parser's paths are reached.
            prop::collection::vec(
                prop::sample::select(vec![
                    "no-store",
                    "no-cache",
                    "only-if-cached",
                    "max-age=",
                    "max-age",
                    "=",
                    ",",
                    " ",
                    "\"",
                    "0",
                    "1",
                    "18446744073709551616",
                    "-1",
                    "+5",
                    "1e3",
                    "NaN",
                    "é",
                    "\t",
                    "x-y=z",
                ]),
                0..8,
            )
            .prop_map(|parts| parts.concat().into_bytes()),
            // Any bytes a header value can hold: the controls it cannot (all but tab, and
            // DEL) are moved into the printable range rather than rejected, or a long run
            // would give up on too many rejects.
            prop::collection::vec(any::<u8>(), 0..64).prop_map(|bytes| {
                bytes
                    .into_iter()
                    .map(|b| match b {
                        b'\t' => b,
                        0..0x20 => b | 0x40,
                        0x7f => b'?',
                        _ => b,
                    })
                    .collect()
            }),
        ]
        .prop_filter_map("not a header value", |bytes| {
            http::HeaderValue::from_bytes(&bytes).ok()
        })
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzzing::config())]

        /// Fuzz target (b): the control headers never panic, and what they accept is in range.
        #[test]
        fn arbitrary_control_headers_never_panic_and_stay_in_range(
            cache_control in header_value(),
            ttl in header_value(),
            namespace in header_value(),
        ) {
            let mut h = HeaderMap::new();
            h.append(http::header::CACHE_CONTROL, cache_control);
            h.append(TTL_HEADER, ttl);
            h.append(NAMESPACE_HEADER, namespace);
            if let Ok(c) = CacheControls::from_headers(&h) {
                proptest::prop_assert!(c.ttl.is_none_or(|t| t <= MAX_TTL && !t.is_zero()));
                proptest::prop_assert!(c.max_age.is_none_or(|a| a.as_secs() <= MAX_AGE_CAP));
                proptest::prop_assert!(c.namespace.len() <= MAX_NAMESPACE_LEN);
                proptest::prop_assert!(c.namespace.bytes().all(|b| b.is_ascii_graphic()));
            }
        }
    }
}
