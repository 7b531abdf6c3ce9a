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
//!
//! A repeat need not search moka at all: [`MemoryTier::get_via`] leaves a shortcut on the
//! calling thread from the request's exact bytes ([`ExactRequest`]) to the answer it found,
//! and [`MemoryTier::recall`] follows it. A shortcut holds a weak reference and the tier's
//! generation when it was taken; replacing or removing an answer, or clearing the tier, moves
//! the generation on and voids every shortcut. One use in [`REPORT_EVERY`], and any use more
//! than a second after the last report, goes through moka instead, so that its eviction
//! policy still sees which answers are in use. (Measured with `cargo bench --bench load`: the
//! two moka lookups of a repeat cost about a tenth of the proxy's hit-path throughput.)
//! A shortcut matches a request byte for byte, or for requests over [`COMPARED_BYTES`] by
//! blake3 digest, so a hash collision can cost a shortcut its slot but never serve the wrong
//! answer; comparing is cheaper than hashing with blake3, which the hit path then skips.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
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
            Slot::Answer(a) => a.memory_size(),
            Slot::Reserved(bytes) => *bytes,
        };
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// Recent answers, bounded in bytes, each expiring at its own TTL.
#[derive(Clone)]
pub struct MemoryTier {
    cache: Cache<CacheKey, Slot>,
    /// Tells this tier's shortcuts from another tier's in the same thread.
    id: u64,
    /// Moves on whenever an answer is replaced or removed other than by expiry or eviction,
    /// and when the tier is cleared: a shortcut taken before is void.
    generation: Arc<AtomicU64>,
}

/// Gives each tier its own id.
static NEXT_TIER: AtomicU64 = AtomicU64::new(1);

/// How many shortcuts a thread keeps: a table indexed by a hash of the request, a newer
/// shortcut displacing an older one in its slot.
const SHORTCUTS: usize = 256;

/// Requests up to this size are kept and compared whole by their shortcuts; larger ones by
/// digest. A thread's shortcuts hold at most `SHORTCUTS` times this (1 MiB).
pub const COMPARED_BYTES: usize = 4096;

/// One use of a shortcut in this many goes through moka, and so does any use more than
/// [`REPORT_AFTER_MS`] after the last one that did.
pub const REPORT_EVERY: u32 = 64;
const REPORT_AFTER_MS: i64 = 1_000;

/// Picks a request's slot. Random per process, so nobody can aim requests at one slot.
static SLOT_HASHER: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

/// A request as received, in the form shortcuts and memos recognise it by: everything that
/// goes into its cache key, unparsed (see `Engine::exact_request`). Equal exact requests have
/// equal keys; the converse need not hold.
pub struct ExactRequest {
    bytes: Vec<u8>,
    slot_hash: u64,
    digest: OnceLock<[u8; 32]>,
}

impl ExactRequest {
    pub fn new(bytes: Vec<u8>) -> ExactRequest {
        ExactRequest {
            slot_hash: SLOT_HASHER.hash_one(&bytes[..]),
            bytes,
            digest: OnceLock::new(),
        }
    }

    /// Its blake3 digest, computed on first use.
    pub fn digest(&self) -> &[u8; 32] {
        self.digest
            .get_or_init(|| *blake3::hash(&self.bytes).as_bytes())
    }

    fn identity(&self) -> Identity {
        if self.bytes.len() <= COMPARED_BYTES {
            Identity::Bytes(self.bytes.as_slice().into())
        } else {
            Identity::Digest(*self.digest())
        }
    }

    fn is(&self, identity: &Identity) -> bool {
        match identity {
            Identity::Bytes(bytes) => **bytes == *self.bytes,
            Identity::Digest(digest) => {
                self.bytes.len() > COMPARED_BYTES && digest == self.digest()
            }
        }
    }
}

/// What a shortcut recognises its request by.
enum Identity {
    Bytes(Box<[u8]>),
    Digest([u8; 32]),
}

/// A thread's way from a request's exact bytes to the answer a lookup found for it.
struct Shortcut {
    tier: u64,
    slot_hash: u64,
    request: Identity,
    /// Weak: a shortcut never keeps an evicted answer in memory.
    entry: Weak<StoredAnswer>,
    generation: u64,
    /// Uses since the last lookup through moka, and when that was (Unix ms).
    uses: u32,
    reported_at: i64,
}

thread_local! {
    /// Allocated on first use, so threads that never look anything up cost nothing.
    static SHORTCUT_TABLE: RefCell<Vec<Option<Shortcut>>> = const { RefCell::new(Vec::new()) };
}

fn slot_of(request: &ExactRequest) -> usize {
    (request.slot_hash % SHORTCUTS as u64) as usize
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
                let left = a.expires_at.saturating_sub(unix_ms(SystemTime::now()));
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
    /// A tier holding at most `max_bytes` of answers (as weighed by [`StoredAnswer::memory_size`]).
    pub fn new(max_bytes: u64) -> MemoryTier {
        let generation = Arc::new(AtomicU64::new(0));
        let moved_on = generation.clone();
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k, v: &Slot| v.weight())
            .expire_after(ExpireAtEntryTtl)
            // moka calls this before `insert` or `invalidate` returns for these two causes.
            // Expiry needs nothing (a shortcut checks the wall clock), nor does eviction
            // (the answer is dropped, so the weak reference fails, or it is still current).
            .eviction_listener(move |_key, slot, cause| {
                let voids = matches!(cause, RemovalCause::Replaced | RemovalCause::Explicit);
                if voids && matches!(slot, Slot::Answer(_)) {
                    moved_on.fetch_add(1, Ordering::SeqCst);
                }
            })
            .build();
        MemoryTier {
            cache,
            id: NEXT_TIER.fetch_add(1, Ordering::Relaxed),
            generation,
        }
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

    /// Like [`MemoryTier::get`], and leaves a shortcut on this thread from `request`, keyed
    /// `key`, to the answer found.
    pub async fn get_via(
        &self,
        request: &ExactRequest,
        key: &CacheKey,
    ) -> Option<Arc<StoredAnswer>> {
        // Read before the lookup: a replacement racing with it voids the shortcut.
        let generation = self.generation.load(Ordering::SeqCst);
        let found = self.get(key).await?;
        let shortcut = Shortcut {
            tier: self.id,
            slot_hash: request.slot_hash,
            request: request.identity(),
            entry: Arc::downgrade(&found),
            generation,
            uses: 0,
            reported_at: unix_ms(SystemTime::now()),
        };
        // A thread being torn down has no table: it just leaves no shortcut.
        let _ = SHORTCUT_TABLE.try_with(|table| {
            let mut table = table.borrow_mut();
            if table.is_empty() {
                table.resize_with(SHORTCUTS, || None);
            }
            table[slot_of(request)] = Some(shortcut);
        });
        Some(found)
    }

    /// The answer this thread's shortcut from `request` leads to, if the shortcut is still
    /// good and the answer fresh at `now`. `None` sends the caller through moka.
    pub fn recall(&self, request: &ExactRequest, now: SystemTime) -> Option<Arc<StoredAnswer>> {
        let now_ms = unix_ms(now);
        let found = SHORTCUT_TABLE.try_with(|table| {
            let mut table = table.borrow_mut();
            let cut = table.get_mut(slot_of(request))?.as_mut()?;
            if cut.tier != self.id
                || cut.slot_hash != request.slot_hash
                || cut.generation != self.generation.load(Ordering::SeqCst)
                || !request.is(&cut.request)
            {
                return None;
            }
            cut.uses += 1;
            if cut.uses >= REPORT_EVERY || now_ms - cut.reported_at > REPORT_AFTER_MS {
                return None;
            }
            let entry = cut.entry.upgrade()?;
            (now_ms < entry.expires_at).then_some(entry)
        });
        found.ok().flatten()
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

    /// Drops the entry under `key`, if any.
    pub async fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(key).await;
    }

    /// Drops every entry.
    pub fn clear(&self) {
        self.cache.invalidate_all();
        // `invalidate_all` tells no listener: void the shortcuts here.
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Bytes currently weighed (approximate until pending maintenance runs).
    pub fn weighted_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// The bound, in bytes (`--memory`).
    pub fn max_bytes(&self) -> u64 {
        self.cache.policy().max_capacity().unwrap_or(0)
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
            bucket: None,
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

    fn request(byte: u8) -> ExactRequest {
        ExactRequest::new(vec![byte; 100])
    }

    #[tokio::test]
    async fn a_shortcut_leads_to_the_answer_found_until_it_is_replaced() {
        let tier = MemoryTier::new(1 << 20);
        let e = entry(1, 10, Duration::from_secs(60));
        tier.insert(e.clone()).await;
        let now = SystemTime::now();
        assert_eq!(tier.recall(&request(1), now), None, "no shortcut yet");
        assert_eq!(tier.get_via(&request(1), &e.key).await, Some(e.clone()));
        assert_eq!(tier.recall(&request(1), now), Some(e.clone()));
        assert_eq!(tier.recall(&request(2), now), None, "another digest");

        let newer = entry(1, 20, Duration::from_secs(60));
        tier.insert(newer.clone()).await;
        assert_eq!(tier.recall(&request(1), now), None, "replaced");
        assert_eq!(tier.get_via(&request(1), &e.key).await, Some(newer.clone()));
        assert_eq!(tier.recall(&request(1), now), Some(newer));

        tier.clear();
        assert_eq!(tier.recall(&request(1), now), None, "cleared");
    }

    #[tokio::test]
    async fn a_shortcut_serves_nothing_stale_evicted_or_of_another_tier() {
        let tier = MemoryTier::new(100_000);
        let e = entry(1, 10, Duration::from_secs(60));
        tier.insert(e.clone()).await;
        tier.get_via(&request(1), &e.key).await.expect("found");
        let later = SystemTime::now() + Duration::from_secs(61);
        assert_eq!(tier.recall(&request(1), later), None, "expired");

        let other = MemoryTier::new(1 << 20);
        assert_eq!(other.recall(&request(1), SystemTime::now()), None);

        // A shortcut holds no reference that would keep an evicted answer in memory.
        let held = Arc::strong_count(&e);
        drop(tier.get_via(&request(1), &e.key).await);
        assert_eq!(Arc::strong_count(&e), held);
    }

    #[tokio::test]
    async fn a_large_request_is_recognised_by_digest() {
        let tier = MemoryTier::new(1 << 20);
        let e = entry(1, 10, Duration::from_secs(60));
        tier.insert(e.clone()).await;
        let large = |last: u8| {
            let mut bytes = vec![7; COMPARED_BYTES * 2];
            bytes.push(last);
            ExactRequest::new(bytes)
        };
        tier.get_via(&large(1), &e.key).await.expect("found");
        let now = SystemTime::now();
        assert_eq!(tier.recall(&large(1), now), Some(e));
        assert_eq!(tier.recall(&large(2), now), None);
    }

    #[tokio::test]
    async fn one_use_of_a_shortcut_in_report_every_goes_through_moka() {
        let tier = MemoryTier::new(1 << 20);
        let e = entry(1, 10, Duration::from_secs(60));
        tier.insert(e.clone()).await;
        tier.get_via(&request(1), &e.key).await.expect("found");
        let now = SystemTime::now();
        let served = (0..REPORT_EVERY * 2)
            .filter(|_| tier.recall(&request(1), now).is_some())
            .count();
        // After the first report, the shortcut is not renewed until a lookup renews it.
        assert_eq!(served, REPORT_EVERY as usize - 1);
        tier.get_via(&request(1), &e.key).await.expect("found");
        assert!(tier.recall(&request(1), now).is_some());
        let a_second_later = now + Duration::from_millis(1_500);
        assert_eq!(tier.recall(&request(1), a_second_later), None);
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
