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

use std::sync::LazyLock;
use std::time::Duration;

use super::events::Says;
use super::seal::{Rejected, Sealed};
use super::stream::Followed;
use super::{Fleet, Unavailable, codec};
use crate::answer::Refusal;
use crate::entry::StoredAnswer;
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

/// What a leader's turn came to.
pub enum Turn {
    /// This replica leads: call the upstream, then [`Lease::finish`].
    Lead(Lease),
    /// Another replica stored the answer.
    Found(StoredAnswer),
    /// Another replica's call for the same partition was refused with this answer.
    Refused(Refusal),
    /// Another replica is receiving a streamed answer: follow it live.
    Live(Followed),
    /// Redis cannot be used now, or another replica's lease showed nothing for too long: go
    /// on alone.
    Alone,
}

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
                Ok(Leased::Taken) => break Turn::Lead(Lease::start(self.clone(), *key)),
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
        let value = self.seal_value(Sealed::Refusal, &name, codec::encode_refusal(refusal));
        self.set_px(name, value, ms).await;
    }

    async fn refusal(
        &self,
        key: &CacheKey,
        partition: &Partition,
    ) -> Result<Option<Refusal>, Unavailable> {
        let name = self.inner.layout.refusal(key, partition);
        let bytes: Option<Vec<u8>> = {
            let name = name.clone();
            self.call("get", |mut c| async move {
                redis::cmd("GET").arg(name).query_async(&mut c).await
            })
            .await?
        };
        let Some(bytes) = bytes else { return Ok(None) };
        let Some(value) = self.opened(Sealed::Refusal, Rejected::Refusal, &name, &bytes) else {
            return Ok(None);
        };
        let refusal = codec::decode_refusal(value);
        if refusal.is_none() {
            self.rejected(Rejected::Malformed);
        }
        Ok(refusal)
    }

    /// Whether anyone holds the lease on `key`.
    pub(super) async fn lease_exists(&self, key: &CacheKey) -> Result<bool, Unavailable> {
        let name = self.inner.layout.lease(key);
        self.call("lease", |mut c| async move {
            redis::cmd("EXISTS").arg(name).query_async(&mut c).await
        })
        .await
    }

    /// Takes the lease on `key` if nobody holds it (see `lua/take_lease.lua`); with a fleet
    /// secret, a lease held by another tells whether a replica of this fleet took it.
    async fn try_lease(&self, key: &CacheKey) -> Result<Leased, Unavailable> {
        let layout = &self.inner.layout;
        let (lease, stream) = (layout.lease(key), layout.stream(key));
        let me = self.lease_value(&lease);
        let ms = LEASE.as_millis() as u64;
        let (taken, holder): (i64, Option<Vec<u8>>) = {
            let lease = lease.clone();
            self.run_script("lease", &TAKE_LEASE, |s| {
                s.key(lease).key(stream).arg(me).arg(ms);
            })
            .await?
        };
        if taken == 1 {
            return Ok(Leased::Taken);
        }
        let holder = holder.unwrap_or_default();
        match self.opened(Sealed::Lease, Rejected::Lease, &lease, &holder) {
            Some(_) => Ok(Leased::Held),
            None => Ok(Leased::Forged),
        }
    }

    /// What this replica writes in a lease it holds: its id, sealed with the lease's name
    /// when the fleet has a secret.
    fn lease_value(&self, lease: &str) -> Vec<u8> {
        let me = self.inner.replica.clone().into_bytes();
        self.seal_value(Sealed::Lease, lease, me)
    }

    /// Runs `script` on the lease of `key` if this replica still holds it.
    async fn on_own_lease(&self, key: &CacheKey, script: &'static LazyLock<redis::Script>) {
        let name = self.inner.layout.lease(key);
        let me = self.lease_value(&name);
        let ms = LEASE.as_millis() as u64;
        let _: Result<i64, Unavailable> = self
            .run_script("lease", script, |s| {
                s.key(name).arg(me).arg(ms);
            })
            .await;
    }
}

/// What taking a lease came to.
enum Leased {
    /// This replica holds it now.
    Taken,
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
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    fn start(fleet: Fleet, key: CacheKey) -> Lease {
        let renewing = fleet.clone();
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                renewing.on_own_lease(&key, &RENEW).await;
            }
        });
        Lease {
            fleet,
            key,
            renewer,
        }
    }

    /// Ends the lease and tells the waiters on other replicas to look.
    pub async fn finish(self) {
        self.renewer.abort();
        self.fleet.on_own_lease(&self.key, &RELEASE).await;
        self.fleet.publish(Says::Done(self.key));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}
