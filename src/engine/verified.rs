//! Verified partitions: with a shared cache, whom the cache may answer.
//!
//! A shared cache keys answers without the credential, so that identical prompts of different
//! API keys share one entry. That must not make the cache an open door: a request with no
//! credential, or a wrong one, would read what others paid for, and learn what they asked. So
//! a credential partition is served from the shared cache, or joins a flight led by another
//! partition, only once the upstream has accepted its credential: answered one of its requests
//! with a 2xx within the verify window (`--verify-window`, 10 minutes by default), to a call
//! on a cacheable route: self-hosted servers answer a health probe or a CORS preflight to
//! anyone, so a 2xx there proves nothing. Until then
//! its requests go upstream as misses of their own, whose 2xx answers verify the partition
//! (and are stored). A `401` or `403` ends a verification at once.
//!
//! A request with no credential at all is one partition like any other: a keyless
//! self-hosted upstream gets a shared cache once it has answered one keyless request.
//!
//! Without a shared cache every partition has its own entries and flights, and nothing here
//! is consulted.

use std::time::Duration;

use http::StatusCode;

use super::Engine;
use crate::key::Partition;

/// Whether a 2xx answer to a call proves that the upstream accepts its credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verifies {
    /// A call on a cacheable route (the POSTs the cache answers): yes.
    Yes,
    /// Anything else (a health probe, a CORS preflight, `GET`s, other paths), which upstreams
    /// may answer to anyone: no.
    No,
}

/// Most partitions remembered as verified; past it, the least recently verified are forgotten
/// (their next request is a miss of its own again).
pub(super) const MAX_VERIFIED: u64 = 50_000;

/// How long a 2xx answer verifies its partition, by default.
pub const DEFAULT_VERIFY_WINDOW: Duration = Duration::from_secs(600);

/// The partitions whose credential the upstream accepted recently, bounded in number, each
/// forgotten a verify window after its last 2xx.
pub(super) struct Verified(moka::sync::Cache<Partition, ()>);

impl Verified {
    pub(super) fn new(window: Duration) -> Verified {
        Verified(
            moka::sync::Cache::builder()
                .max_capacity(MAX_VERIFIED)
                .time_to_live(window)
                .build(),
        )
    }
}

impl Engine {
    /// Whether requests of `partition` may be answered with what other partitions fetched:
    /// always with a cache per credential; with a shared cache, once verified.
    #[inline]
    pub(super) fn may_share(&self, partition: &Partition) -> bool {
        match &self.verified {
            None => true,
            Some(verified) => verified.0.contains_key(partition),
        }
    }

    /// Learns from the status of an upstream answer to a request of `partition`: a 2xx to a
    /// call that `verifies` verifies the partition; a `401` or `403` to any call ends its
    /// verification.
    pub(super) fn upstream_answered(
        &self,
        partition: &Partition,
        status: StatusCode,
        verifies: Verifies,
    ) {
        let Some(verified) = &self.verified else {
            return;
        };
        if status.is_success() && verifies == Verifies::Yes {
            verified.0.insert(*partition, ());
        } else if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            verified.0.invalidate(partition);
        }
    }
}
