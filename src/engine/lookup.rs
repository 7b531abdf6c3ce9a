//! Phases 2 and 4, lookup: this thread's shortcut into the memory tier, the memory tier, then
//! (in a leader's first step) the fleet's tier in Redis (with `--redis`) and the disk tier;
//! and the store on the way back: memory at once, Redis before the flight ends, and disk
//! through the writer's queue.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Engine;
use crate::answer::Answer;
use crate::controls::CacheControls;
use crate::entry::StoredAnswer;
use crate::key::CacheKey;
use crate::memory::ExactRequest;
use crate::throttle::LogGate;

/// Logs about answers the database writer could not take, at most once a minute.
static NOT_QUEUED: LogGate = LogGate::per_minute();

/// Whether `entry` is young enough for a request's `max-age`.
pub(super) fn young_enough(entry: &StoredAnswer, max_age: Option<Duration>) -> bool {
    max_age.is_none_or(|max| entry.age(SystemTime::now()) <= max)
}

impl Engine {
    /// The answer this thread's shortcut for `exact` leads to at `now`, if it has one and the
    /// request may read the cache: no key computed, no lookup. (The entry, not the `Answer`:
    /// the caller makes that in place, which saves moving it on the hottest path.)
    #[inline]
    pub(super) fn recall(
        &self,
        exact: &ExactRequest,
        controls: &CacheControls,
        now: SystemTime,
    ) -> Option<Arc<StoredAnswer>> {
        if controls.no_cache {
            return None;
        }
        let entry = self.memory.recall(exact, now)?;
        young_enough(&entry, controls.max_age).then_some(entry)
    }

    /// A hit from the memory tier, leaving a shortcut for the next repeat of `exact` (when
    /// given) on this thread.
    pub(super) async fn memory_hit(
        &self,
        exact: Option<&ExactRequest>,
        key: &CacheKey,
        controls: &CacheControls,
    ) -> Option<Answer> {
        if controls.no_cache {
            return None;
        }
        let entry = match exact {
            Some(exact) => self.memory.get_via(exact, key).await?,
            None => self.memory.get(key).await?,
        };
        young_enough(&entry, controls.max_age).then(|| self.hit(&entry, SystemTime::now()))
    }

    /// The memory tier's entry for `key`, if young enough for `max_age`.
    pub(super) async fn lookup_memory(
        &self,
        key: &CacheKey,
        max_age: Option<Duration>,
    ) -> Option<Arc<StoredAnswer>> {
        let entry = self.memory.get(key).await?;
        young_enough(&entry, max_age).then_some(entry)
    }

    /// The database's entry for `key`, if any (see [`Engine::lookup_shared_then_disk_many`]).
    pub(super) async fn lookup_shared_then_disk(
        &self,
        key: &CacheKey,
        max_age: Option<Duration>,
    ) -> Option<Arc<StoredAnswer>> {
        self.lookup_shared_then_disk_many(vec![*key], max_age)
            .await
            .pop()
            .flatten()
    }

    /// The cached entries for `keys`: memory first, then one database read for the rest.
    pub(super) async fn lookup_many(
        &self,
        keys: impl Iterator<Item = CacheKey>,
        max_age: Option<Duration>,
    ) -> Vec<Option<Arc<StoredAnswer>>> {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for key in keys {
            let entry = self.lookup_memory(&key, max_age).await;
            if entry.is_none() {
                missing.push((found.len(), key));
            }
            found.push(entry);
        }
        if !missing.is_empty() {
            let keys = missing.iter().map(|(_, key)| *key).collect();
            let read = self.lookup_shared_then_disk_many(keys, max_age).await;
            for ((at, _), entry) in missing.into_iter().zip(read) {
                found[at] = entry;
            }
        }
        found
    }

    /// The stored entries for `keys` beyond memory: the fleet's tier first (one trip), then
    /// the database (one trip) for the rest. Each entry found is also put in memory; one older
    /// than `max_age` is not returned. A tier that cannot be read is treated as holding nothing.
    pub(super) async fn lookup_shared_then_disk_many(
        &self,
        keys: Vec<CacheKey>,
        max_age: Option<Duration>,
    ) -> Vec<Option<Arc<StoredAnswer>>> {
        let Some(fleet) = &self.fleet else {
            return self.lookup_database(keys, max_age).await;
        };
        let mut found = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (at, entry) in fleet.get_many(&keys).await.into_iter().enumerate() {
            match entry {
                Some(entry) => {
                    let entry = Arc::new(entry);
                    self.memory.insert(entry.clone()).await;
                    found.push(young_enough(&entry, max_age).then_some(entry));
                }
                None => {
                    missing.push(at);
                    found.push(None);
                }
            }
        }
        if !missing.is_empty() && self.disk.is_some() {
            let rest = missing.iter().map(|&at| keys[at]).collect();
            for (at, entry) in missing
                .into_iter()
                .zip(self.lookup_database(rest, max_age).await)
            {
                found[at] = entry;
            }
        }
        found
    }

    /// The database's entries for `keys`, read in one trip (see [`Engine::lookup_shared_then_disk_many`]).
    async fn lookup_database(
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

    /// Stores an answer in memory, then queues it for the database. Call it before the flight
    /// that fetched the answer ends: once it has, later requests must find the answer in memory.
    pub(super) async fn store(&self, entry: Arc<StoredAnswer>) {
        self.memory.insert(entry.clone()).await;
        if let Some(fleet) = &self.fleet {
            // Before the flight ends: the other replicas look for it when its lease ends.
            fleet.put(&entry).await;
        }
        if let Some(disk) = &self.disk
            && let Err(e) = disk.put(entry)
            && let Some(held) = NOT_QUEUED.open()
        {
            tracing::warn!(error = %crate::error::describe_chain(&e), similar_since = held, "answer kept in memory only");
        }
    }
}
