//! A budget that refills at a rate: the unit the governor paces requests and tokens with, and
//! how one is learned from what an answer's rate-limit headers say.

use std::time::Duration;

// tokio's clock, so that tests can pause and advance it.
use tokio::time::Instant;

use super::signals::BudgetReport;

/// The share of a learned refill rate used for pacing (operator-set rates are exact).
const LEARNED_RATE_HEADROOM: f64 = 0.9;

/// A refill-at-a-rate budget (requests or tokens).
#[derive(Debug, Clone, Copy)]
pub(super) struct Bucket {
    pub capacity: f64,
    pub available: f64,
    per_second: f64,
    at: Instant,
}

impl Bucket {
    /// A budget of `limit` a minute that never allows more than `limit` in any minute: a
    /// burst of one second's worth, then the rest spread evenly (providers enforce per-minute
    /// limits over shorter slices too).
    pub(super) fn per_minute(limit: u32, now: Instant) -> Bucket {
        let limit = f64::from(limit.max(1));
        let burst = (limit / 60.0).floor().max(1.0);
        Bucket {
            capacity: burst,
            available: burst,
            per_second: (limit - burst).max(1.0) / 60.0,
            at: now,
        }
    }

    /// Requests (or tokens) a second it refills at.
    pub(super) fn per_second(&self) -> f64 {
        self.per_second
    }

    pub(super) fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.available = (self.available + elapsed * self.per_second).min(self.capacity);
        self.at = now;
    }

    /// How long until `amount` is available (zero if it is).
    pub(super) fn wait_for(&self, amount: f64) -> Duration {
        let missing = amount.min(self.capacity) - self.available;
        if missing <= 0.0 || self.per_second <= 0.0 {
            return Duration::ZERO;
        }
        // Finite and positive, as every number a bucket learns is; a wait too long to hold is
        // read as an hour, and the queue deadline decides.
        Duration::try_from_secs_f64(missing / self.per_second).unwrap_or(Duration::from_secs(3600))
    }

    /// Takes what the upstream says is left and how long until it is full again.
    fn learn(&mut self, limit: f64, remaining: f64, reset: Option<Duration>, now: Instant) {
        self.capacity = limit.max(1.0);
        // Correct an over-estimate, but not by the header's rounding (it reports whole
        // requests left; flooring our estimate on every answer would halve the pace). Never
        // raise it: requests sent after this answer was produced are already on their way.
        if remaining + 1.0 < self.available {
            self.available = remaining;
        }
        self.available = self.available.min(self.capacity);
        if let Some(reset) = reset.filter(|r| !r.is_zero()) {
            let rate = (self.capacity - remaining).max(1.0) / reset.as_secs_f64();
            // Headroom: a token freed at the instant the upstream frees it would arrive a
            // hair early about half the time, so learned rates are paced at 90 %.
            self.per_second = (rate * LEARNED_RATE_HEADROOM).max(self.capacity / 3600.0);
        } else if self.per_second <= 0.0 {
            self.per_second = self.capacity / 60.0;
        }
        self.at = now;
    }
}

/// Updates (or starts) a budget from what one answer's headers say. Without a limit (Azure),
/// a known budget keeps its size, and an unknown one starts with what remains, refilled at
/// the per-minute pace.
pub(super) fn learn(bucket: &mut Option<Bucket>, said: Option<BudgetReport>, now: Instant) {
    let Some(BudgetReport {
        limit,
        remaining,
        reset,
    }) = said
    else {
        return;
    };
    let limit = limit
        .or(bucket.as_ref().map(|b| b.capacity))
        .unwrap_or(remaining)
        .max(remaining);
    let fresh = bucket.is_none();
    let b = bucket.get_or_insert(Bucket::per_minute(limit as u32, now));
    b.learn(limit, remaining, reset, now);
    if fresh {
        // A budget first seen in an answer holds what that answer says remains.
        b.available = remaining.min(b.capacity);
    }
}
