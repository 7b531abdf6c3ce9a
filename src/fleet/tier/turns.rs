//! Cross-replica flights: leases and turns.
//!
//! The leader of a local flight takes its turn ([`Fleet::take_turn`]) before calling the
//! upstream: if Redis has the answer, that is the outcome; if no lease is held, it takes the
//! lease and calls; otherwise it waits for a `done` event (or polls every [`POLL`], in case
//! the event is missed) and looks again. A leader that dies stops renewing its lease; once it
//! expires, the next waiter to look takes it over. A lease that shows nothing (no answer, no
//! stream) for longer than the waiter's patience (the upstream's first-byte timeout) is
//! waited for no longer: its holder hangs (or someone planted it), and the waiter calls on
//! its own. An error answer reaches waiters of the same partition through `err:`; waiters of
//! another partition take their own turn.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use super::events::Says;
use super::seal::{Rejected, Sealed};
use super::{Fleet, Unavailable, codec};
use crate::answer::Refusal;
use crate::entry::unix_ms;
use crate::fleet::Turn;
use crate::key::{CacheKey, Partition};

/// How long a lease lasts unless renewed.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often a waiting replica looks again without an event.
pub const POLL: Duration = Duration::from_millis(200);
/// How long an error answer waits for followers of its partition.
pub const REFUSAL_KEPT: Duration = Duration::from_secs(10);

static TAKE_LEASE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/take_lease.lua")));
static RENEW: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/renew_lease.lua")));
static RELEASE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/release_lease.lua")));

impl Fleet {
    /// Waits for this replica's turn to call the upstream for `key` on behalf of `partition`
    /// (see the module documentation). A lease held by another replica that shows nothing
    /// for `patience` is waited for no longer: this replica then calls on its own
    /// ([`Turn::Alone`]).
    pub async fn take_turn(
        &self,
        key: &CacheKey,
        partition: &Partition,
        patience: Duration,
    ) -> Turn {
        let notify = self.waiter(key);
        let mut seen_other = false;
        let since = tokio::time::Instant::now();
        let turn = loop {
            let notified = notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            match self.get(key).await {
                Err(Unavailable) => break Turn::Alone,
                Ok(Some(entry)) => break Turn::Found(entry),
                Ok(None) => {}
            }
            if seen_other {
                // Only an answer refused while this replica waited is its business.
                if let Ok(Some(refusal)) = self.refusal(key, partition).await {
                    break Turn::Refused(refusal);
                }
            }
            match self.try_lease(key).await {
                Err(Unavailable) => break Turn::Alone,
                Ok(Leased::Taken(held)) => {
                    break Turn::Lead(Lease::start(self.clone(), *key, held));
                }
                Ok(Leased::Held) => seen_other = true,
                // Planted by someone who is not a replica of this fleet: nobody calls for
                // this key, so this replica does, alone (the lease stays where it is).
                Ok(Leased::Forged) => break Turn::Alone,
            }
            if let Some(followed) = self.follow(key).await {
                break Turn::Live(followed);
            }
            if since.elapsed() > patience {
                tracing::info!(%key, waited = ?since.elapsed(), "another replica's lease showed nothing for longer than the upstream timeout: calling the upstream from here");
                break Turn::Alone;
            }
            let _ = tokio::time::timeout(POLL, notified).await;
        };
        self.forget_waiter(key, &notify);
        turn
    }

    /// Keeps `refusal` for followers of `partition` on other replicas.
    pub async fn share_refusal(&self, key: &CacheKey, partition: &Partition, refusal: &Refusal) {
        let ms = REFUSAL_KEPT.as_millis() as u64;
        let name = self.inner.layout.refusal(key, partition);
        let until = unix_ms(SystemTime::now()).saturating_add(ms as i64);
        let value = self.seal_value(
            Sealed::Refusal,
            &name,
            codec::encode_refusal(refusal),
            until,
        );
        self.set_px(name, value, ms).await;
    }

    async fn refusal(
        &self,
        key: &CacheKey,
        partition: &Partition,
    ) -> Result<Option<Refusal>, Unavailable> {
        let name = self.inner.layout.refusal(key, partition);
        let Some(bytes) = self.value_at("get", &name).await? else {
            return Ok(None);
        };
        let Some(value) = self.opened(Sealed::Refusal, Rejected::Refusal, &name, &bytes) else {
            return Ok(None);
        };
        let refusal = codec::decode_refusal(value);
        if refusal.is_none() {
            self.rejected(Rejected::Malformed);
        }
        Ok(refusal)
    }

    /// Whether a replica of the fleet holds the lease on `key` (with a secret, a lease whose
    /// value is not sealed, or whose time has passed, is nobody's).
    pub(super) async fn lease_held(&self, key: &CacheKey) -> Result<bool, Unavailable> {
        let name = self.inner.layout.lease(key);
        let holder = self.value_at("lease", &name).await?;
        Ok(holder.is_some_and(|h| {
            self.opened(Sealed::Lease, Rejected::Lease, &name, &h)
                .is_some()
        }))
    }

    /// Takes the lease on `key` if nobody holds it (see `lua/take_lease.lua`); with a fleet
    /// secret, a lease held by another tells whether a replica of this fleet took it lately.
    async fn try_lease(&self, key: &CacheKey) -> Result<Leased, Unavailable> {
        let layout = &self.inner.layout;
        let (lease, stream) = (layout.lease(key), layout.stream(key));
        let me = self.lease_value(&lease);
        let ms = LEASE.as_millis() as u64;
        let (taken, holder): (i64, Option<Vec<u8>>) = {
            let (lease, me) = (lease.clone(), me.clone());
            self.run_script("lease", &TAKE_LEASE, |s| {
                s.key(lease).key(stream).arg(me).arg(ms);
            })
            .await?
        };
        if taken == 1 {
            return Ok(Leased::Taken(me));
        }
        let holder = holder.unwrap_or_default();
        match self.opened(Sealed::Lease, Rejected::Lease, &lease, &holder) {
            Some(_) => Ok(Leased::Held),
            None => Ok(Leased::Forged),
        }
    }

    /// What this replica writes in a lease it holds: its id; with a fleet secret, sealed with
    /// the lease's name and good for the lease's lifetime (each renewal writes a new one, so
    /// a lease value copied back later is stale).
    fn lease_value(&self, lease: &str) -> Vec<u8> {
        self.replica_mark(lease, LEASE)
    }

    /// This replica's id as it marks what it holds under `name` (a lease, a prefix it
    /// writes): with a fleet secret, sealed with the name and good for `life` from now.
    pub(super) fn replica_mark(&self, name: &str, life: Duration) -> Vec<u8> {
        let me = self.inner.replica.clone().into_bytes();
        let until = unix_ms(SystemTime::now()).saturating_add(life.as_millis() as i64);
        self.seal_value(Sealed::Lease, name, me, until)
    }

    /// Renews this replica's lease on `key` if it still holds it as `held`: the value it
    /// holds it with now.
    async fn renew(&self, key: &CacheKey, held: Vec<u8>) -> Vec<u8> {
        let name = self.inner.layout.lease(key);
        let next = self.lease_value(&name);
        let ms = LEASE.as_millis() as u64;
        let renewed: Result<i64, Unavailable> = {
            let (held, next) = (held.clone(), next.clone());
            self.run_script("lease", &RENEW, |s| {
                s.key(name).arg(held).arg(ms).arg(next);
            })
            .await
        };
        match renewed {
            Ok(1) => next,
            _ => held,
        }
    }

    /// Deletes this replica's lease on `key` if it still holds it as `held`.
    async fn release(&self, key: &CacheKey, held: Vec<u8>) {
        let name = self.inner.layout.lease(key);
        let _: Result<i64, Unavailable> = self
            .run_script("lease", &RELEASE, |s| {
                s.key(name).arg(held);
            })
            .await;
    }
}

/// What taking a lease came to.
enum Leased {
    /// This replica holds it now, with this value.
    Taken(Vec<u8>),
    /// Another replica of the fleet holds it.
    Held,
    /// Someone holds it whose value does not hold the fleet's seal.
    Forged,
}

/// This replica's lease on one key: renewed in the background until [`Lease::finish`] (or
/// until it is dropped, when the leader died: the lease then expires and another replica
/// takes over).
pub struct Lease {
    fleet: Fleet,
    key: CacheKey,
    /// What this replica holds the lease with now (renewals change it).
    held: Arc<Mutex<Vec<u8>>>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    fn start(fleet: Fleet, key: CacheKey, held: Vec<u8>) -> Lease {
        let held = Arc::new(Mutex::new(held));
        let renewing = fleet.clone();
        let renewed = Arc::clone(&held);
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                let now = renewed.lock().map(|h| h.clone()).unwrap_or_default();
                let next = renewing.renew(&key, now).await;
                if let Ok(mut h) = renewed.lock() {
                    *h = next;
                }
            }
        });
        Lease {
            fleet,
            key,
            held,
            renewer,
        }
    }

    /// Ends the lease and tells the waiters on other replicas to look.
    pub async fn finish(self) {
        self.renewer.abort();
        let held = self.held.lock().map(|h| h.clone()).unwrap_or_default();
        self.fleet.release(&self.key, held).await;
        self.fleet.publish(Says::Done(self.key));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::tier::redis_server::RedisServer;
    use crate::fleet::tier::seal::{FleetSecret, Seal};

    /// A lease written by a replica of the fleet is held while its time runs; the same value
    /// copied back later (by whoever saw it in Redis) holds nobody.
    #[tokio::test]
    async fn a_lease_copied_back_after_its_time_holds_no_one() {
        let Some(server) = RedisServer::start() else {
            return;
        };
        let secret = FleetSecret::new("the turns tests' own secret").expect("secret");
        let settings = super::super::FleetSettings {
            seal: Some(Seal::new(&secret)),
            ..Default::default()
        };
        let fleet = Fleet::new(&server.url(), settings).expect("fleet");
        let key = CacheKey::from_hex(&"ab".repeat(32)).expect("key");
        let name = fleet.inner.layout.lease(&key);
        let seal = Seal::new(&secret);
        let mut conn = redis::Client::open(server.url().as_str())
            .expect("client")
            .get_connection()
            .expect("connect");
        let now = unix_ms(SystemTime::now());
        for (until, held) in [(now + 10_000, true), (now - 60_000, false)] {
            let value = seal.seal(Sealed::Lease, &name, b"0123456789abcdef", until);
            let _: () = redis::cmd("SET")
                .arg(&name)
                .arg(value)
                .arg("PX")
                .arg(600_000)
                .query(&mut conn)
                .expect("set");
            let leased = fleet.try_lease(&key).await.expect("redis answers");
            assert_eq!(matches!(leased, Leased::Held), held, "until {until}");
            assert_eq!(fleet.lease_held(&key).await, Ok(held));
        }
        // And a waiter on the stale one calls at once.
        let partition = Partition::from_bytes([3; 32]);
        let turn = tokio::time::timeout(
            Duration::from_secs(5),
            fleet.take_turn(&key, &partition, Duration::from_secs(600)),
        )
        .await
        .expect("not held");
        assert!(matches!(turn, Turn::Alone));
    }
}
