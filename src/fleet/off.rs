//! The fleet tier of a build without the `redis` feature: handles of the same shape as the
//! real ones (`tier`), which cannot be made. The engine's fleet is then always `None`, its
//! fleet paths are never taken, and this build needs no Redis client. Each method takes what
//! the real one takes, and the compiler checks the engine's fleet paths against them, so they
//! cannot drift from the real tier unseen (`tests/features.rs` builds without the feature).
//! One returns another type: `rejections`, a list where the tier's is an array sized by its
//! kinds of rejection (which this build does not have), read the same way by the engine.

use std::time::{Duration, SystemTime};

use super::replies::Unavailable;
use super::{BudgetTurn, Confirmed, Ending, Event, PrefixTurn, Relayed, Turn};
use crate::answer::Refusal;
use crate::entry::StoredAnswer;
use crate::governor::{BudgetReport, Pace};
use crate::key::{CacheKey, Partition};

/// No value has this type: what holds one cannot exist.
#[derive(Clone, Copy)]
enum Never {}

impl Never {
    fn absurd<T>(self) -> T {
        match self {}
    }
}

/// The fleet tier, which this build cannot have.
#[derive(Clone)]
pub struct Fleet(Never);

/// A replica's lease on a key, which this build cannot hold.
pub struct Lease(Never);

/// The leader's side of a relayed stream, which this build cannot relay.
pub struct Relay(Never);

/// This replica's mark on a prefix it writes for a fleet, which this build cannot write.
pub struct PrefixMark(Never);

/// A follower's side of a relayed stream, which this build cannot follow.
pub struct Followed {
    never: Never,
    /// The upstream's status.
    pub status: http::StatusCode,
    /// The replayed headers of the answer.
    pub headers: http::HeaderMap,
    /// Where the leader replica's proxy can be reached.
    pub peer: Option<String>,
}

impl Fleet {
    pub fn errors(&self) -> u64 {
        self.0.absurd()
    }

    pub async fn connect(&self) -> Result<(), Unavailable> {
        self.0.absurd()
    }

    pub fn peer_token(&self, _key: &CacheKey, _partition: &Partition) -> Option<String> {
        self.0.absurd()
    }

    pub fn check_peer_token(&self, _key: &CacheKey, _token: &str) -> Option<Partition> {
        self.0.absurd()
    }

    pub fn rejections(&self) -> Vec<(&'static str, u64)> {
        self.0.absurd()
    }

    pub fn on_event(&self, _listener: impl Fn(Event) + Send + Sync + 'static) {
        self.0.absurd()
    }

    pub fn replaced(&self, _key: &CacheKey) {
        self.0.absurd()
    }

    pub async fn get_many(&self, _keys: &[CacheKey]) -> Vec<Option<StoredAnswer>> {
        self.0.absurd()
    }

    pub async fn put(&self, _entry: &StoredAnswer) {
        self.0.absurd()
    }

    pub async fn take_turn(
        &self,
        _key: &CacheKey,
        _partition: &Partition,
        _patience: Duration,
    ) -> Turn {
        self.0.absurd()
    }

    pub async fn share_refusal(&self, _key: &CacheKey, _partition: &Partition, _r: &Refusal) {
        self.0.absurd()
    }

    pub fn relay(
        &self,
        _key: &CacheKey,
        _status: http::StatusCode,
        _headers: &http::HeaderMap,
    ) -> Relay {
        self.0.absurd()
    }

    pub(crate) async fn budget_turn(
        &self,
        _partition: &Partition,
        _pace: Option<Pace>,
        _longest: Duration,
    ) -> Option<BudgetTurn> {
        self.0.absurd()
    }

    pub(crate) async fn confirm_turn(
        &self,
        _partition: &Partition,
        _at: SystemTime,
        _changes: i64,
    ) -> Option<Confirmed> {
        self.0.absurd()
    }

    pub(crate) async fn learn_budget(&self, _partition: &Partition, _said: BudgetReport) {
        self.0.absurd()
    }

    pub async fn pause(&self, _partition: &Partition, _wait: Duration) {
        self.0.absurd()
    }

    pub async fn prefix_turn(
        &self,
        _digests: &[([u8; 32], Duration)],
        _wait: Duration,
    ) -> Result<PrefixTurn, Unavailable> {
        self.0.absurd()
    }

    pub async fn prefix_written(&self, _name: &str, _wait: Duration) {
        self.0.absurd()
    }

    pub async fn prefix_warm(&self, _marks: Vec<PrefixMark>) {
        self.0.absurd()
    }

    pub async fn prefix_failed(&self, _marks: Vec<PrefixMark>) {
        self.0.absurd()
    }
}

impl Lease {
    pub async fn finish(self) {
        self.0.absurd()
    }
}

impl Relay {
    pub fn bounded(self, _bound: usize) -> Relay {
        self.0.absurd()
    }

    pub fn event(&mut self, _event: &[u8]) {
        self.0.absurd()
    }

    pub fn end(self, _ending: Ending) {
        self.0.absurd()
    }
}

impl Followed {
    pub async fn next(&mut self) -> Relayed {
        self.never.absurd()
    }
}
