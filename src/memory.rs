//! The memory tier: recent answers held in process, bounded in bytes.
//!
//! This module owns the moka cache in front of the disk. Each entry weighs its size in bytes
//! and expires at its own TTL. A lookup here never awaits I/O; it must stay that way, since
//! the hit path of the whole product runs through it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;

use crate::entry::{StoredAnswer, unix_ms};
use crate::key::CacheKey;

/// Recent answers, bounded in bytes, each expiring at its own TTL.
#[derive(Clone)]
pub struct MemoryTier {
    cache: Cache<CacheKey, Arc<StoredAnswer>>,
}

struct ExpireAtEntryTtl;

impl Expiry<CacheKey, Arc<StoredAnswer>> for ExpireAtEntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<StoredAnswer>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let left = value.expires_at - unix_ms(SystemTime::now());
        Some(Duration::from_millis(u64::try_from(left).unwrap_or(0)))
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        value: &Arc<StoredAnswer>,
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
            .weigher(|_k, v: &Arc<StoredAnswer>| u32::try_from(v.size()).unwrap_or(u32::MAX))
            .expire_after(ExpireAtEntryTtl)
            .build();
        MemoryTier { cache }
    }

    /// The entry for `key` if present and not expired.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<StoredAnswer>> {
        let found = self.cache.get(key).await?;
        // moka's expiry runs on a monotonic clock; check the wall clock too, so an entry is
        // never served past the `expires_at` that the disk tier and the inspector show.
        found.is_fresh(SystemTime::now()).then_some(found)
    }

    /// Inserts or replaces the entry for its key.
    pub async fn insert(&self, entry: Arc<StoredAnswer>) {
        self.cache.insert(entry.key, entry).await;
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
