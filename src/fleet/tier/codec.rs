//! How answers are written in Redis: a compact, versioned binary form.
//!
//! An entry is `LDE2` (magic and format version), the status, the creation and expiry times,
//! the usage, the route, namespace and model, the replayed header pairs, the body's encoding
//! (0 as it came, 1 deflated) and the body as the rest of the value; every variable part is
//! prefixed by its length (`u32`, little-endian). An error answer shared with followers of the
//! same partition on other replicas (never stored as an entry) is `LDR1`, its status, header
//! pairs and body. Reading never trusts the bytes: anything short, too long, inflating past
//! the reader's bound (the largest answer it would store) or of another version is `None`,
//! and the caller treats it as a miss. A change of layout takes a
//! new version tag; values of a version no longer read are misses.
//!
//! # Compression
//!
//! A body of [`COMPRESS_FROM`] bytes or more is deflated (fastest level) when that saves at
//! least an eighth. A streamed answer repeats its framing and ids in every event and shrinks
//! several times over; a chat answer of a few hundred bytes is left as it came (measured in
//! `cargo bench --bench fleet`, part d). A hit from Redis then inflates the body once; memory
//! holds it inflated.

use bytes::Bytes;
use http::StatusCode;

use crate::answer::Refusal;
use crate::entry::{KeptEntry, Slot, StoredAnswer};
use crate::key::CacheKey;
use crate::route::Route;

const ENTRY_TAG: &[u8; 4] = b"LDE2";
/// An answer beyond the first of a bucket: `LDE3`, the bucket's key (32 bytes) and the
/// answer's place (one byte), then an entry as `LDE2` writes it after its tag. The first
/// answer of a key keeps `LDE2`, which replicas of an earlier version read.
const SLOT_TAG: &[u8; 4] = b"LDE3";

/// Bodies from this size up are deflated when that saves at least an eighth.
pub const COMPRESS_FROM: usize = 1024;
/// Most bytes a deflated body may inflate to when the reader has no bound of its own (the
/// inspector): far above any `--max-stream` in use. A replica bounds it by its
/// `--max-stream`.
pub const MAX_INFLATED: u64 = 256 << 20;

const BODY_RAW: u8 = 0;
const BODY_DEFLATED: u8 = 1;
const REFUSAL_TAG: &[u8; 4] = b"LDR1";

/// Most header pairs read back (a stored answer replays three names).
const MAX_PAIRS: u32 = 64;

struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        // Parts are bounded by --max-body and --max-stream, far below 4 GiB.
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(&b[..len as usize]);
    }

    fn opt(&mut self, value: Option<u64>) {
        match value {
            Some(v) => {
                self.0.push(1);
                self.0.extend_from_slice(&v.to_le_bytes());
            }
            None => self.0.push(0),
        }
    }

    fn pairs(&mut self, pairs: &[(&str, &str)]) {
        let n = u32::try_from(pairs.len()).unwrap_or(0).min(MAX_PAIRS);
        self.0.extend_from_slice(&n.to_le_bytes());
        for (name, value) in pairs.iter().take(n as usize) {
            self.bytes(name.as_bytes());
            self.bytes(value.as_bytes());
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn text(&mut self) -> Option<String> {
        Some(std::str::from_utf8(self.bytes()?).ok()?.to_owned())
    }

    fn opt(&mut self) -> Option<Option<u64>> {
        match self.take(1)?[0] {
            0 => Some(None),
            1 => Some(Some(self.u64()?)),
            _ => None,
        }
    }

    fn pairs(&mut self) -> Option<Vec<(String, String)>> {
        let n = self.u32()?;
        if n > MAX_PAIRS {
            return None;
        }
        (0..n).map(|_| Some((self.text()?, self.text()?))).collect()
    }
}

/// The Redis form of `entry`.
pub fn encode_entry(entry: &StoredAnswer) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(entry.body.len() + 200));
    match &entry.bucket {
        None => w.0.extend_from_slice(ENTRY_TAG),
        Some(slot) => {
            w.0.extend_from_slice(SLOT_TAG);
            w.0.extend_from_slice(slot.of.as_bytes());
            w.0.push(slot.index);
        }
    }
    w.0.extend_from_slice(&entry.status.to_le_bytes());
    w.0.extend_from_slice(&entry.created_at.to_le_bytes());
    w.0.extend_from_slice(&entry.expires_at.to_le_bytes());
    w.opt(entry.usage.prompt_tokens);
    w.opt(entry.usage.completion_tokens);
    w.opt(entry.usage.total_tokens);
    w.bytes(entry.route.as_str().as_bytes());
    w.bytes(entry.namespace.as_bytes());
    match &entry.model {
        Some(model) => {
            w.0.push(1);
            w.bytes(model.as_bytes());
        }
        None => w.0.push(0),
    }
    w.pairs(&entry.header_pairs());
    match deflated(&entry.body) {
        Some(small) => {
            w.0.push(BODY_DEFLATED);
            w.0.extend_from_slice(&small);
        }
        None => {
            w.0.push(BODY_RAW);
            w.0.extend_from_slice(&entry.body);
        }
    }
    w.0
}

/// `body` deflated, if it is long enough to try and the result saves at least an eighth.
fn deflated(body: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    if body.len() < COMPRESS_FROM {
        return None;
    }
    let mut encoder = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(body).ok()?;
    let small = encoder.finish().ok()?;
    (small.len() <= body.len() - body.len() / 8).then_some(small)
}

/// `small` inflated; `None` if it is not deflate data or inflates past `most` bytes.
fn inflated(small: &[u8], most: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    // A guess at the size, never more than a MiB up front: the bytes decide the rest.
    let mut body = Vec::with_capacity(small.len().saturating_mul(4).min(1 << 20));
    flate2::read::DeflateDecoder::new(small)
        .take(most.saturating_add(1))
        .read_to_end(&mut body)
        .ok()?;
    if body.len() as u64 > most {
        return None;
    }
    // Exact size: memory holds it as long as it is cached.
    body.shrink_to_fit();
    Some(body)
}

/// The entry stored under `key` from its Redis form; `None` if the bytes are not one, or if
/// its body would inflate past `most` bytes (the largest answer the reader would store).
pub fn decode_entry(key: CacheKey, bytes: &[u8], most: u64) -> Option<StoredAnswer> {
    let mut r = Reader(bytes);
    let bucket = match r.take(4)? {
        tag if tag == ENTRY_TAG => None,
        tag if tag == SLOT_TAG => {
            let of = CacheKey::from_bytes(r.take(32)?.try_into().ok()?);
            let slot = Slot {
                of,
                index: r.take(1)?[0],
            };
            // A value that says it is another key's answer is not this key's.
            if !slot.names(&key) {
                return None;
            }
            Some(slot)
        }
        _ => return None,
    };
    let status = r.u16()?;
    let created_at = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let expires_at = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
    // The usage written with the entry, for readers that do not parse bodies; this one reads
    // it, and the billed model, from the body itself (see `Billing::of_body`).
    for _ in 0..3 {
        r.opt()?;
    }
    let route = Route::from_name(std::str::from_utf8(r.bytes()?).ok()?)?;
    let namespace = r.text()?;
    let model = match r.take(1)?[0] {
        0 => None,
        1 => Some(r.text()?),
        _ => return None,
    };
    let pairs = r.pairs()?;
    if !(200..300).contains(&status) {
        return None;
    }
    let body = match r.take(1)?[0] {
        BODY_RAW => Bytes::copy_from_slice(r.0),
        BODY_DEFLATED => Bytes::from(inflated(r.0, most)?),
        _ => return None,
    };
    Some(StoredAnswer::read_back(KeptEntry {
        key,
        bucket,
        namespace,
        route,
        model,
        status,
        header_pairs: pairs,
        body,
        created_at,
        expires_at,
    }))
}

/// The Redis form of an error answer shared with followers of its partition.
pub fn encode_refusal(refusal: &Refusal) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(refusal.body.len() + 64));
    w.0.extend_from_slice(REFUSAL_TAG);
    w.0.extend_from_slice(&refusal.status.as_u16().to_le_bytes());
    let pairs: Vec<(&str, &str)> = refusal
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect();
    w.pairs(&pairs);
    w.0.extend_from_slice(&refusal.body);
    w.0
}

/// The head of a stream shared live (its status and replayed headers), in the form of an
/// error answer without a body.
pub fn encode_head(status: StatusCode, headers: &http::HeaderMap) -> Vec<u8> {
    encode_refusal(&Refusal {
        status,
        headers: crate::entry::replayed_headers(headers),
        body: Bytes::new(),
    })
}

/// An error answer from its Redis form; `None` if the bytes are not one.
pub fn decode_refusal(bytes: &[u8]) -> Option<Refusal> {
    let mut r = Reader(bytes);
    if r.take(4)? != REFUSAL_TAG {
        return None;
    }
    let status = StatusCode::from_u16(r.u16()?).ok()?;
    let pairs = r.pairs()?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in pairs {
        let (Ok(name), Ok(value)) = (
            http::HeaderName::try_from(name),
            http::HeaderValue::try_from(value),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    Some(Refusal {
        status,
        headers,
        body: Bytes::copy_from_slice(r.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryMeta;
    use proptest::prelude::*;

    fn entry() -> StoredAnswer {
        let key = CacheKey::from_hex(&"ab".repeat(32)).expect("hex");
        let meta = EntryMeta {
            key,
            namespace: "team-a".into(),
            route: Route::ChatCompletions,
            model: Some("gpt-4o-mini".into()),
            ttl: std::time::Duration::from_secs(60),
            bucket: None,
        };
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", "application/json".parse().expect("value"));
        headers.insert("set-cookie", "a=b".parse().expect("value"));
        let body = br#"{"id":"x","model":"gpt-4o-mini-2024-07-18","usage":{"prompt_tokens":9,
            "completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        StoredAnswer::from_upstream(&meta, StatusCode::OK, &headers, Bytes::from_static(body))
    }

    #[test]
    fn an_entry_reads_back_as_it_was_written() {
        let e = entry();
        let bytes = encode_entry(&e);
        let back = decode_entry(e.key, &bytes, MAX_INFLATED).expect("decodes");
        assert_eq!(back.body, e.body);
        assert_eq!(back.hit_headers, e.hit_headers);
        assert_eq!(
            (back.status, back.created_at, back.expires_at),
            (e.status, e.created_at, e.expires_at)
        );
        assert_eq!((back.usage, back.route), (e.usage, e.route));
        assert_eq!(back.usage.cached_tokens, Some(4));
        assert_eq!(back.billed_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!((back.namespace, back.model), (e.namespace, e.model));
        assert!(!back.hit_headers.contains_key("set-cookie"));
        // Every cut of it is refused, never misread.
        for n in 0..bytes.len() - e.body.len() {
            assert!(
                decode_entry(e.key, &bytes[..n], MAX_INFLATED).is_none(),
                "cut at {n}"
            );
        }
    }

    #[test]
    fn an_answer_of_a_bucket_reads_back_with_its_place_and_only_under_its_key() {
        let mut e = entry();
        let base = e.key;
        e.key = base.slot(3);
        e.bucket = Slot::at(base, 3);
        let bytes = encode_entry(&e);
        let back = decode_entry(e.key, &bytes, MAX_INFLATED).expect("decodes");
        assert_eq!(back.bucket, e.bucket);
        assert_eq!(back.body, e.body);
        // Moved under another key (the bucket's own, or another place), it is no answer.
        assert!(decode_entry(base, &bytes, MAX_INFLATED).is_none());
        assert!(decode_entry(base.slot(4), &bytes, MAX_INFLATED).is_none());
        // The first answer keeps the earlier form.
        assert_eq!(&encode_entry(&entry())[..4], ENTRY_TAG);
    }

    /// A streamed answer: the same framing, id and model in every event.
    fn streamed(events: usize) -> StoredAnswer {
        let key = CacheKey::from_hex(&"ef".repeat(32)).expect("hex");
        let meta = EntryMeta {
            key,
            namespace: String::new(),
            route: Route::ChatCompletions,
            model: Some("gpt-4o-mini".into()),
            ttl: std::time::Duration::from_secs(60),
            bucket: None,
        };
        let mut body = String::new();
        for i in 0..events {
            body.push_str(&format!(
                "data: {{\"id\":\"chatcmpl-AbCdEf123\",\"object\":\"chat.completion.chunk\",\
                 \"created\":1764633600,\"model\":\"gpt-4o-mini-2024-07-18\",\
                 \"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{{\"index\":0,\
                 \"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\
                 \"finish_reason\":null}}]}}\n\n"
            ));
        }
        body.push_str("data: [DONE]\n\n");
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", "text/event-stream".parse().expect("value"));
        StoredAnswer::from_upstream(&meta, StatusCode::OK, &headers, Bytes::from(body))
    }

    #[test]
    fn a_long_body_is_stored_deflated_and_reads_back_whole() {
        let e = streamed(200);
        let bytes = encode_entry(&e);
        assert!(
            bytes.len() * 4 < e.body.len(),
            "{} bytes for a body of {}",
            bytes.len(),
            e.body.len()
        );
        let back = decode_entry(e.key, &bytes, MAX_INFLATED).expect("decodes");
        assert_eq!(back.body, e.body);
        assert_eq!(back.billed_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        // Deflated data cut short is refused, never served as a shorter body.
        for n in [bytes.len() - 1, bytes.len() - 7, bytes.len() / 2] {
            assert!(
                decode_entry(e.key, &bytes[..n], MAX_INFLATED).is_none(),
                "cut at {n}"
            );
        }
        // A short answer, or one that does not shrink, is written as it came.
        let small = entry();
        assert!(encode_entry(&small).ends_with(&small.body));
    }

    #[test]
    fn inflating_stops_at_its_bound() {
        let body = vec![b'a'; 64 * 1024];
        let small = deflated(&body).expect("shrinks");
        assert_eq!(inflated(&small, 64 * 1024).as_deref(), Some(&body[..]));
        assert!(inflated(&small, 64 * 1024 - 1).is_none());
        assert!(inflated(b"not deflate data at all", MAX_INFLATED).is_none());
    }

    #[test]
    fn a_refusal_reads_back_as_it_was_written() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-should-retry", "false".parse().expect("value"));
        let refusal = Refusal {
            status: StatusCode::UNAUTHORIZED,
            headers,
            body: Bytes::from_static(b"{\"error\":{}}"),
        };
        let back = decode_refusal(&encode_refusal(&refusal)).expect("decodes");
        assert_eq!(
            (back.status, back.headers, back.body),
            (refusal.status, refusal.headers, refusal.body)
        );
        assert!(decode_refusal(&encode_entry(&entry())).is_none());
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config())]

        /// Whatever Redis holds under our prefix (another version, another program, damage),
        /// reading it never panics.
        #[test]
        fn reading_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                                tagged in any::<bool>()) {
            let key = CacheKey::from_hex(&"cd".repeat(32)).expect("hex");
            let mut value = if tagged { ENTRY_TAG.to_vec() } else { Vec::new() };
            value.extend_from_slice(&bytes);
            let _ = decode_entry(key, &value, MAX_INFLATED);
            let mut value = if tagged { REFUSAL_TAG.to_vec() } else { Vec::new() };
            value.extend_from_slice(&bytes);
            let _ = decode_refusal(&value);
        }
    }
}
