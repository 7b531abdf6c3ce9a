//! Hit counts and counters kept in memory until the writer's next batch, so that counting a
//! request costs a map update, not a thread wake-up.
//!
//! The tally is in shards, one per thread (round-robin), so hits on many worker threads
//! neither queue on one lock nor pass its cache lines around. The writer takes every shard at
//! once ([`SharedPending::take`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::counts::Counts;
use crate::key::CacheKey;

/// Hits on one key not yet committed, and what they add to the counters of its route and
/// model: those are added up per key on each hit and per route and model only when taken,
/// so that a hit does one map update, not three.
pub(super) struct HitTally {
    pub count: i64,
    pub last_at: i64,
    route: &'static str,
    model: Box<str>,
    counts: Counts,
}

/// Most distinct models counted per route; the rest are counted under [`OTHER_MODELS`].
pub(crate) const MAX_MODELS_PER_ROUTE: usize = 256;

/// The model name the counters of every model past [`MAX_MODELS_PER_ROUTE`] go to.
pub(crate) const OTHER_MODELS: &str = "(other)";

/// Counts not yet committed.
#[derive(Default)]
pub(super) struct Pending {
    /// By key. foldhash rather than SipHash: every hit does these lookups.
    pub hits: foldhash::HashMap<CacheKey, HitTally>,
    /// By route, then model: looked up by `&str`, so counting allocates only the first time.
    pub counters: foldhash::HashMap<String, foldhash::HashMap<String, Counts>>,
}

impl Pending {
    /// Counts a hit on `key` at `at` that adds `counts` to the counters of `route` and `model`
    /// (always the same for one key).
    pub fn hit(
        &mut self,
        key: CacheKey,
        at: i64,
        route: &'static str,
        model: &str,
        counts: &Counts,
    ) {
        let tally = self.hits.entry(key).or_insert_with(|| HitTally {
            count: 0,
            last_at: at,
            route,
            model: model.into(),
            counts: Counts::default(),
        });
        tally.count += 1;
        tally.last_at = tally.last_at.max(at);
        tally.counts.add(counts);
    }

    /// Adds `counts` to the counters of `route` and `model` (of [`OTHER_MODELS`] once the
    /// route has [`MAX_MODELS_PER_ROUTE`] others).
    pub fn count(&mut self, route: &str, model: &str, counts: &Counts) {
        let by_model = match self.counters.get_mut(route) {
            Some(m) => m,
            None => self.counters.entry(route.to_owned()).or_default(),
        };
        let full = by_model.len() >= MAX_MODELS_PER_ROUTE;
        match by_model.get_mut(model) {
            Some(c) => c.add(counts),
            None if full => {
                by_model
                    .entry(OTHER_MODELS.to_owned())
                    .or_default()
                    .add(counts);
            }
            None => {
                by_model.insert(model.to_owned(), *counts);
            }
        }
    }

    /// Adds what `other` counted into `self`.
    pub fn absorb(&mut self, other: Pending) {
        for (key, theirs) in other.hits {
            match self.hits.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut ours) => {
                    let ours = ours.get_mut();
                    ours.count += theirs.count;
                    ours.last_at = ours.last_at.max(theirs.last_at);
                    ours.counts.add(&theirs.counts);
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(theirs);
                }
            }
        }
        for (route, models) in other.counters {
            for (model, counts) in models {
                self.count(&route, &model, &counts);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.hits.is_empty() && self.counters.is_empty()
    }
}

/// [`Pending`] in shards: each thread counts into the shard it was given on first use.
#[derive(Clone)]
pub(super) struct SharedPending {
    shards: Arc<[Mutex<Pending>]>,
}

/// Shards per store; threads beyond this many share them.
pub(super) const PENDING_SHARDS: usize = 16;

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % PENDING_SHARDS;
}

impl SharedPending {
    pub fn new() -> SharedPending {
        SharedPending {
            shards: (0..PENDING_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// Runs `f` on this thread's shard.
    pub fn with<R>(&self, f: impl FnOnce(&mut Pending) -> R) -> R {
        // A thread being torn down counts into the first shard.
        let shard = &self.shards[SHARD.try_with(|s| *s).unwrap_or(0)];
        f(&mut shard.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Everything counted so far, leaving every shard empty; the counters include the hits'.
    pub fn take(&self) -> Pending {
        let mut all = Pending::default();
        for shard in self.shards.iter() {
            let taken = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
            all.absorb(taken);
        }
        let hits = std::mem::take(&mut all.hits);
        for tally in hits.values() {
            all.count(tally.route, &tally.model, &tally.counts);
        }
        all.hits = hits;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_are_all_taken() {
        let pending = SharedPending::new();
        let key = CacheKey::from_hex(&"ab".repeat(32)).expect("hex");
        let hit = Counts {
            requests: 1,
            hits: 1,
            saved_completion_tokens: 7,
            ..Counts::default()
        };
        let miss = Counts {
            requests: 1,
            misses: 1,
            ..Counts::default()
        };
        std::thread::scope(|scope| {
            for t in 0..PENDING_SHARDS as i64 + 3 {
                let pending = &pending;
                scope.spawn(move || {
                    for _ in 0..100 {
                        pending.with(|p| {
                            p.hit(key, 1_000 + t, "chat.completions", "m", &hit);
                            p.count("chat.completions", "m", &miss);
                        });
                    }
                });
            }
        });
        let threads = PENDING_SHARDS as i64 + 3;
        let taken = pending.take();
        assert_eq!(taken.hits[&key].count, 100 * threads);
        assert_eq!(taken.hits[&key].last_at, 1_000 + threads - 1);
        // The hits' counts join the other counts of their route and model.
        let counted = taken.counters["chat.completions"]["m"];
        assert_eq!(
            (counted.requests, counted.hits, counted.misses),
            (200 * threads, 100 * threads, 100 * threads)
        );
        assert_eq!(counted.saved_completion_tokens, 700 * threads);
        assert!(pending.take().is_empty(), "taking empties every shard");
    }
}
