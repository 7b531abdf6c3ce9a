//! The in-flight table: identical requests in flight at the same moment share one outcome.
//!
//! This module owns the map from a cache key to the flight resolving it. It knows nothing of
//! HTTP or of caching: a flight is resolved by whoever leads it, and every waiter gets a clone
//! of the outcome. The map's lock is a plain mutex that is never held across an `.await`.
//!
//! # Concurrent calls on the same key
//!
//! - The first [`InFlight::join`] for a key returns [`Role::Leader`]; every later one, until the
//!   flight ends, returns [`Role::Follower`].
//! - The leader resolves the flight with [`Flight::complete`]. The outcome is published before
//!   the flight leaves the table, so a caller that finds no flight can rely on the leader's
//!   side effects (the engine stores the answer in memory before completing).
//! - A waiter can stop waiting at any time (its client hung up); that cancels nothing.
//! - A table made with [`InFlight::stale_after`] no longer lets callers join a flight that has
//!   published nothing for that long: the next caller leads a new flight, and the old one
//!   goes on for its own waiters, out of the table.
//! - A [`Flight`] dropped without completing (its task was aborted) leaves the table, and its
//!   waiters get [`Abandoned`]. Whether they try again is theirs to decide; the engine does
//!   not, so that a flight that keeps failing is not led into call after call.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The table of flights in progress, keyed by `K`, each resolving to a `T`.
pub struct InFlight<K, T> {
    flights: Arc<Mutex<HashMap<K, Entry<T>>>>,
    /// A flight that has published nothing this long after it began is no longer joined.
    stale_after: Option<Duration>,
}

/// A flight in the table: where its outcome comes, and when it began.
struct Entry<T> {
    outcome: watch::Receiver<Option<T>>,
    began: Instant,
}

impl<K, T> Clone for InFlight<K, T> {
    fn clone(&self) -> Self {
        InFlight {
            flights: self.flights.clone(),
            stale_after: self.stale_after,
        }
    }
}

impl<K: Eq + Hash + Clone, T: Clone> Default for InFlight<K, T> {
    fn default() -> Self {
        InFlight {
            flights: Arc::new(Mutex::new(HashMap::new())),
            stale_after: None,
        }
    }
}

/// What a caller of [`InFlight::join`] became.
pub enum Role<K: Eq + Hash + Clone, T: Clone> {
    /// No flight was in progress: this caller must resolve one.
    Leader(Flight<K, T>),
    /// A flight was in progress: wait for its outcome.
    Follower(Waiter<T>),
}

/// A flight led by one caller; resolve it with [`Flight::complete`].
pub struct Flight<K: Eq + Hash + Clone, T: Clone> {
    key: K,
    table: InFlight<K, T>,
    outcome: watch::Sender<Option<T>>,
}

/// A handle to wait for a flight's outcome.
pub struct Waiter<T> {
    outcome: watch::Receiver<Option<T>>,
}

/// The flight ended without an outcome (its leader was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request this one was waiting on was abandoned")]
pub struct Abandoned;

impl<K: Eq + Hash + Clone, T: Clone> InFlight<K, T> {
    /// A table whose flights are no longer joined once they have published nothing for
    /// `stale_after`: a request never waits on a flight longer than a fresh call would take.
    pub fn stale_after(stale_after: Duration) -> InFlight<K, T> {
        InFlight {
            stale_after: Some(stale_after),
            ..InFlight::default()
        }
    }

    /// Joins the flight for `key`, or starts one if none is in progress (or the one in
    /// progress is stale: it goes on for its own waiters, out of the table).
    pub fn join(&self, key: &K) -> Role<K, T> {
        let mut flights = self.lock();
        if let Some(entry) = flights.get(key)
            && !self.is_stale(entry)
        {
            return Role::Follower(Waiter {
                outcome: entry.outcome.clone(),
            });
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(
            key.clone(),
            Entry {
                outcome: rx,
                began: Instant::now(),
            },
        );
        Role::Leader(Flight {
            key: key.clone(),
            table: self.clone(),
            outcome: tx,
        })
    }

    /// Starts a flight for `key` if none is in progress (or the one in progress is stale);
    /// `None` if one is.
    pub fn lead(&self, key: &K) -> Option<Flight<K, T>> {
        match self.join(key) {
            Role::Leader(flight) => Some(flight),
            Role::Follower(_) => None,
        }
    }

    /// Whether a flight has published nothing for longer than the table allows.
    fn is_stale(&self, entry: &Entry<T>) -> bool {
        self.stale_after
            .is_some_and(|after| entry.began.elapsed() > after && entry.outcome.borrow().is_none())
    }

    /// A waiter for the flight in progress for `key`, if there is one (and it is not stale);
    /// never starts a flight.
    pub fn in_progress(&self, key: &K) -> Option<Waiter<T>> {
        self.lock()
            .get(key)
            .filter(|entry| !self.is_stale(entry))
            .map(|entry| Waiter {
                outcome: entry.outcome.clone(),
            })
    }

    /// A flight that nobody can join (for a request that must make its own upstream call).
    pub fn detached(key: K) -> Flight<K, T> {
        let table = InFlight::default();
        let (tx, rx) = watch::channel(None);
        table.lock().insert(
            key.clone(),
            Entry {
                outcome: rx,
                began: Instant::now(),
            },
        );
        Flight {
            key,
            table,
            outcome: tx,
        }
    }

    /// Number of flights in progress.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no flight is in progress.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the flight under `key` if it is the one `outcome` publishes to (after a
    /// `leave`, another flight may hold the key).
    fn remove_own(&self, key: &K, outcome: &watch::Sender<Option<T>>) {
        let mut flights = self.lock();
        if flights
            .get(key)
            .is_some_and(|entry| entry.outcome.same_channel(&outcome.subscribe()))
        {
            flights.remove(key);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry<T>>> {
        // The map stays consistent even if a holder panicked: every critical section is a
        // single insert, lookup or remove.
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Eq + Hash + Clone, T: Clone> Flight<K, T> {
    /// A waiter for this flight's outcome (the leader waits like everyone else).
    pub fn waiter(&self) -> Waiter<T> {
        Waiter {
            outcome: self.outcome.subscribe(),
        }
    }

    /// Publishes an outcome to every waiter (and to callers joining later) without ending the
    /// flight: for an answer that is still arriving, such as a stream.
    pub fn publish(&self, outcome: T) {
        self.outcome.send_replace(Some(outcome));
    }

    /// Takes the flight out of the table without ending it: callers joining from now on
    /// lead a flight of their own, while those already waiting keep what was published (a
    /// stream that can no longer be joined from its start).
    pub fn leave(&self) {
        self.table.remove_own(&self.key, &self.outcome);
    }

    /// How many waiters wait on this flight now (the table's own handle not counted).
    pub fn waiting(&self) -> usize {
        let in_table = usize::from(
            self.table
                .lock()
                .get(&self.key)
                .is_some_and(|entry| entry.outcome.same_channel(&self.outcome.subscribe())),
        );
        self.outcome.receiver_count().saturating_sub(in_table)
    }

    /// What was published so far, if anything.
    pub fn published(&self) -> Option<T> {
        self.outcome.borrow().clone()
    }

    /// Publishes the outcome to every waiter, then ends the flight.
    pub fn complete(self, outcome: T) {
        self.outcome.send_replace(Some(outcome));
        // Drop removes the flight from the table.
    }
}

impl<K: Eq + Hash + Clone, T: Clone> Drop for Flight<K, T> {
    fn drop(&mut self) {
        self.table.remove_own(&self.key, &self.outcome);
    }
}

impl<T: Clone> Waiter<T> {
    /// Waits for the outcome; [`Abandoned`] if the leader went away without one.
    pub async fn wait(mut self) -> Result<T, Abandoned> {
        let outcome = self
            .outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Abandoned)?;
        outcome.clone().ok_or(Abandoned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_followers_same_outcome() {
        let table: InFlight<u32, String> = InFlight::default();
        let Role::Leader(flight) = table.join(&1) else {
            panic!("first caller leads");
        };
        let waiters: Vec<_> = (0..10)
            .map(|_| match table.join(&1) {
                Role::Follower(w) => w,
                Role::Leader(_) => panic!("later callers follow"),
            })
            .collect();
        assert!(
            matches!(table.join(&2), Role::Leader(_)),
            "other keys are independent"
        );
        let mine = flight.waiter();
        flight.complete("answer".to_owned());
        assert!(table.is_empty());
        assert_eq!(mine.wait().await, Ok("answer".to_owned()));
        for w in waiters {
            assert_eq!(w.wait().await, Ok("answer".to_owned()));
        }
    }

    #[tokio::test]
    async fn a_flight_in_progress_can_be_waited_on_without_starting_one() {
        let table: InFlight<u32, u8> = InFlight::default();
        assert!(table.in_progress(&5).is_none());
        assert!(table.is_empty(), "looking starts nothing");
        let Role::Leader(flight) = table.join(&5) else {
            panic!("first caller leads");
        };
        let waiting = table.in_progress(&5).expect("in progress");
        flight.complete(6);
        assert_eq!(waiting.wait().await, Ok(6));
        assert!(table.in_progress(&5).is_none());
    }

    #[tokio::test]
    async fn a_dropped_leader_abandons_its_followers_and_frees_the_key() {
        let table: InFlight<u32, u8> = InFlight::default();
        let Role::Leader(flight) = table.join(&7) else {
            panic!("first caller leads");
        };
        let Role::Follower(w) = table.join(&7) else {
            panic!("second caller follows");
        };
        drop(flight);
        assert_eq!(w.wait().await, Err(Abandoned));
        assert!(matches!(table.join(&7), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_cancels_nothing() {
        let table: InFlight<u32, u8> = InFlight::default();
        let Role::Leader(flight) = table.join(&3) else {
            panic!("first caller leads");
        };
        drop(flight.waiter());
        let Role::Follower(w) = table.join(&3) else {
            panic!("flight still in progress");
        };
        flight.complete(9);
        assert_eq!(w.wait().await, Ok(9));
    }

    #[tokio::test]
    async fn a_flight_that_leaves_keeps_its_waiters_and_frees_the_key() {
        let table: InFlight<u32, u8> = InFlight::default();
        let Role::Leader(first) = table.join(&4) else {
            panic!("first caller leads");
        };
        let Role::Follower(waiting) = table.join(&4) else {
            panic!("second caller follows");
        };
        first.publish(1);
        first.leave();
        let Role::Leader(second) = table.join(&4) else {
            panic!("the key is free again");
        };
        // The first flight ending does not remove the second from the table.
        first.complete(2);
        assert_eq!(waiting.wait().await, Ok(2));
        assert!(matches!(table.join(&4), Role::Follower(_)));
        drop(second);
        assert!(table.is_empty());
    }
}
