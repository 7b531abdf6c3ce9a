//! How answers are written in Redis: a compact, versioned binary form.
//!
//! An entry is `LDE1` (magic and format version), the status, the creation and expiry times,
//! the usage, the route, namespace and model, the replayed header pairs, and the body as the
//! rest of the value; every variable part is prefixed by its length (`u32`, little-endian).
//! An error answer shared with followers of the same partition on other replicas (never
//! stored as an entry) is `LDR1`, its status, header pairs and body. Reading never trusts the
//! bytes: anything short, too long or of another version is `None`, and the caller treats it
//! as a miss. A change of layout takes a new version tag; old values then read as misses.
//!
//! Bodies are not compressed: chat answers are a kilobyte or two, where compression saves
//! little and costs every hit a decompression.

use bytes::Bytes;
use http::StatusCode;

use crate::answer::Refusal;
use crate::entry::{Billing, StoredAnswer, billed_model, hit_headers};
use crate::key::CacheKey;
use crate::route::Route;

const ENTRY_TAG: &[u8; 4] = b"LDE1";
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
    let mut w = Writer(Vec::with_capacity(entry.body.len() + 160));
    w.0.extend_from_slice(ENTRY_TAG);
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
    w.0.extend_from_slice(&entry.body);
    w.0
}

/// The entry stored under `key` from its Redis form; `None` if the bytes are not one.
pub fn decode_entry(key: CacheKey, bytes: &[u8]) -> Option<StoredAnswer> {
    let mut r = Reader(bytes);
    if r.take(4)? != ENTRY_TAG {
        return None;
    }
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
    let headers = StoredAnswer::headers_from_pairs(&pairs);
    let billing = Billing::of_body(route, r.0);
    Some(StoredAnswer {
        key,
        namespace,
        route,
        billed_model: billed_model(model.as_deref(), billing.model),
        model,
        status,
        hit_headers: hit_headers(&key, &headers),
        body: Bytes::copy_from_slice(r.0),
        created_at,
        expires_at,
        usage: billing.usage,
    })
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
        let back = decode_entry(e.key, &bytes).expect("decodes");
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
            assert!(decode_entry(e.key, &bytes[..n]).is_none(), "cut at {n}");
        }
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
            let _ = decode_entry(key, &value);
            let mut value = if tagged { REFUSAL_TAG.to_vec() } else { Vec::new() };
            value.extend_from_slice(&bytes);
            let _ = decode_refusal(&value);
        }
    }
}
