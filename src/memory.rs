//! The memory tier: recent answers held in process, bounded in bytes.
//!
//! This module owns the moka cache in front of the disk. Each entry weighs its size in bytes
//! and expires at its own TTL. A lookup here never awaits I/O; it must stay that way, since
//! the hit path of the whole product runs through it.
//!
//! A stream being received can reserve room under its key ([`MemoryTier::reserve`]), so the
//! bytes buffered by a flight count against the same bound as stored answers: moka evicts
//! answers to make room. The stored answer replaces the reservation under the same key; a
//! reservation is never returned by a lookup.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;

use crate::entry::{StoredAnswer, unix_ms};
use crate::key::CacheKey;

/// What the memory tier holds under a key.
#[derive(Clone)]
enum Slot {
    /// A stored answer.
    Answer(Arc<StoredAnswer>),
    /// Room held by a stream in flight: this many bytes buffered so far.
    Reserved(u64),
}

impl Slot {
    fn weight(&self) -> u32 {
        let bytes = match self {
            Slot::Answer(a) => a.size(),
            Slot::Reserved(bytes) => *bytes,
        };
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// Recent answers, bounded in bytes, each expiring at its own TTL.
#[derive(Clone)]
pub struct MemoryTier {
    cache: Cache<CacheKey, Slot>,
}

/// How long a reservation lives if its stream never ends (its task was lost).
const RESERVATION_TTL: Duration = Duration::from_secs(3600);

struct ExpireAtEntryTtl;

impl Expiry<CacheKey, Slot> for ExpireAtEntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Slot,
        _created_at: Instant,
    ) -> Option<Duration> {
        match value {
            Slot::Answer(a) => {
                let left = a.expires_at - unix_ms(SystemTime::now());
                Some(Duration::from_millis(u64::try_from(left).unwrap_or(0)))
            }
            Slot::Reserved(_) => Some(RESERVATION_TTL),
        }
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        value: &Slot,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

impl MemoryTier {
    /// A tier holding at most `max_bytes` of answers (as weighed by [`StoredAnswer::size`]).
    pub fn new(max_bytes: u64) -> MemoryTier {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k, v: &Slot| v.weight())
            .expire_after(ExpireAtEntryTtl)
            .build();
        MemoryTier { cache }
    }

    /// The entry for `key` if present and not expired.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<StoredAnswer>> {
        let Slot::Answer(found) = self.cache.get(key).await? else {
            return None;
        };
        // moka's expiry runs on a monotonic clock; check the wall clock too, so an entry is
        // never served past the `expires_at` that the disk tier and the inspector show.
        found.is_fresh(SystemTime::now()).then_some(found)
    }

    /// Inserts or replaces the entry for its key.
    pub async fn insert(&self, entry: Arc<StoredAnswer>) {
        self.cache.insert(entry.key, Slot::Answer(entry)).await;
    }

    /// Holds `bytes` of room under `key` for a stream being received.
    pub async fn reserve(&self, key: CacheKey, bytes: u64) {
        self.cache.insert(key, Slot::Reserved(bytes)).await;
    }

    /// Gives back the room reserved under `key`, unless an answer has replaced it.
    pub async fn release(&self, key: &CacheKey) {
        self.cache
            .entry_by_ref(key)
            .and_compute_with(|slot| async move {
                match slot.map(|e| e.into_value()) {
                    Some(Slot::Reserved(_)) => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Bytes currently weighed (approximate until pending maintenance runs).
    pub fn weighted_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Number of entries (approximate until pending maintenance runs).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Runs moka's pending maintenance (evictions, counts) now.
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{EntryMeta, StoredAnswer};
    use crate::route::Route;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn entry(byte: u8, body_len: usize, ttl: Duration) -> Arc<StoredAnswer> {
        let meta = EntryMeta {
            key: CacheKey::from_hex(&format!("{byte:02x}").repeat(32)).expect("hex"),
            namespace: String::new(),
            route: Route::Embeddings,
            model: None,
            ttl,
        };
        Arc::new(StoredAnswer::from_upstream(
            &meta,
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::from(vec![b'x'; body_len]),
        ))
    }

    #[tokio::test]
    async fn stays_within_its_byte_bound() {
        let tier = MemoryTier::new(100_000);
        for i in 0..50u8 {
            tier.insert(entry(i, 10_000, Duration::from_secs(60))).await;
        }
        tier.run_pending_tasks().await;
        assert!(
            tier.weighted_bytes() <= 100_000,
            "{}",
            tier.weighted_bytes()
        );
        assert!(tier.entry_count() < 50);
    }

    #[tokio::test]
    async fn reservations_count_against_the_bound_and_are_never_served() {
        let tier = MemoryTier::new(100_000);
        for i in 0..5u8 {
            tier.insert(entry(i, 10_000, Duration::from_secs(60))).await;
        }
        let streaming = entry(9, 10, Duration::from_secs(60)).key;
        tier.reserve(streaming, 80_000).await;
        tier.run_pending_tasks().await;
        assert!(
            tier.weighted_bytes() <= 100_000,
            "{}",
            tier.weighted_bytes()
        );
        assert!(tier.entry_count() < 6, "answers made room for the stream");
        assert_eq!(tier.get(&streaming).await, None);
        tier.release(&streaming).await;
        tier.run_pending_tasks().await;
        assert!(tier.weighted_bytes() < 80_000);
        // An answer that replaced the reservation is not released.
        let done = entry(9, 10, Duration::from_secs(60));
        tier.reserve(done.key, 1_000).await;
        tier.insert(done.clone()).await;
        tier.release(&done.key).await;
        assert_eq!(tier.get(&done.key).await, Some(done));
    }

    #[tokio::test]
    async fn serves_nothing_past_its_ttl() {
        let tier = MemoryTier::new(1 << 20);
        let e = entry(1, 10, Duration::from_millis(0));
        tier.insert(e.clone()).await;
        assert!(tier.get(&e.key).await.is_none());
        let e = entry(2, 10, Duration::from_secs(60));
        tier.insert(e.clone()).await;
        assert_eq!(tier.get(&e.key).await, Some(e));
    }
}
