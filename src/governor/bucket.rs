//! A budget that refills at a rate: the unit the governor paces requests and tokens with, and
//! how one is learned from what an answer's rate-limit headers say.
//!
//! # Two shapes of budget
//!
//! The headers say what remains and when the budget is whole again; they do not say how it
//! gets there. OpenAI's limits refill continuously, so a budget starts out *gradual*: what is
//! missing comes back at a steady rate until the reset. A fixed window gives nothing back
//! before its reset, then everything at once; paced as gradual, it would be sent a request
//! or two in each window after what remained was spent, and refuse them. So the budget turns
//! *stepwise* (it spends what the upstream says remains, and nothing more until the reset)
//! when the answers show a window: what remains falls by a tenth of the limit while the
//! moment it is whole again stays put (a refilling budget's moves later with every request
//! spent; see `ends_agree`). A `429` that arrives before the announced reset, when the answer
//! before it had said nothing remained (the request went out on refill the budget only
//! assumed), makes it stepwise too. A stepwise budget turns gradual again when an answer
//! says more remains than the one before it *with a shorter reset* and within the same
//! period (a refilling budget nearing full; a window's answers, arriving out of order, give
//! more remaining with a longer one, and a later window's answers are whole again a period
//! later). Either way the average pace is the same, at most the limit per reset period.

use std::time::Duration;

// tokio's clock, so that tests can pause and advance it.
use tokio::time::Instant;

use super::shape;
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
    /// Whether the budget comes back whole at its reset rather than gradually.
    stepwise: bool,
    /// When the upstream last said the budget is whole again.
    full_at: Option<Instant>,
    /// What the upstream last said remains, and the reset it gave with it.
    reported: f64,
    reported_reset: Option<Duration>,
    /// The first answer of those since what remains last rose: what it said remains, and
    /// when it said the budget is whole again.
    anchor: Option<(f64, Instant)>,
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
            stepwise: false,
            full_at: None,
            reported: burst,
            reported_reset: None,
            anchor: None,
        }
    }

    /// Requests (or tokens) a second it refills at.
    pub(super) fn per_second(&self) -> f64 {
        self.per_second
    }

    pub(super) fn refill(&mut self, now: Instant) {
        if self.stepwise {
            if self.full_at.is_some_and(|at| now >= at) {
                self.available = self.capacity;
                self.full_at = None;
            }
        } else {
            let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
            self.available = (self.available + elapsed * self.per_second).min(self.capacity);
        }
        self.at = now;
    }

    /// Whether the budget is paced as one that comes back whole at its reset.
    #[cfg(test)]
    pub(super) fn is_stepwise(&self) -> bool {
        self.stepwise
    }

    /// How long until `amount` is available (zero if it is).
    pub(super) fn wait_for(&self, amount: f64) -> Duration {
        let missing = amount.min(self.capacity) - self.available;
        if missing <= 0.0 || self.per_second <= 0.0 {
            return Duration::ZERO;
        }
        if self.stepwise
            && let Some(at) = self.full_at
        {
            return at.saturating_duration_since(self.at);
        }
        // Finite and positive, as every number a bucket learns is; a wait too long to hold is
        // read as an hour, and the queue deadline decides.
        Duration::try_from_secs_f64(missing / self.per_second).unwrap_or(Duration::from_secs(3600))
    }

    /// Whether this answer and the first of its group (since what remains last rose) show a
    /// window by the shape rule (`shape.rs`). A fall too small to tell keeps the group going.
    fn ends_agree(
        &mut self,
        limit: f64,
        remaining: f64,
        reset: Option<Duration>,
        now: Instant,
    ) -> bool {
        let (Some(reset), Some(end)) = (reset, reset.and_then(|r| now.checked_add(r))) else {
            self.anchor = None;
            return false;
        };
        // A group is one period's answers: more remaining, or an end more than half a reset
        // past the first one's (a later window), starts a new one.
        let later = |first_end: Instant| end > first_end + reset / 2;
        let Some((first, first_end)) = self
            .anchor
            .filter(|(first, first_end)| remaining <= *first && !later(*first_end))
        else {
            self.anchor = Some((remaining, end));
            return false;
        };
        let fall = first - remaining;
        if fall < (limit * shape::MIN_FALL_SHARE).max(shape::MIN_FALL) {
            return false;
        }
        let moved = if end >= first_end {
            end - first_end
        } else {
            first_end - end
        };
        if shape::shows_window(
            limit,
            remaining,
            reset.as_secs_f64(),
            fall,
            moved.as_secs_f64(),
        ) {
            return true;
        }
        // A budget that refills: the group starts again here.
        self.anchor = Some((remaining, end));
        false
    }

    /// Takes what the upstream says is left and how long until it is full again; `refused`
    /// when it said so in a `429`.
    fn learn(
        &mut self,
        limit: f64,
        remaining: f64,
        reset: Option<Duration>,
        refused: bool,
        now: Instant,
    ) {
        let before_reset = self.full_at.is_some_and(|at| now < at);
        let agreed = self.ends_agree(limit, remaining, reset, now);
        if agreed && !self.stepwise {
            // What remains fell while the budget stays whole again at the same moment: only
            // a window does that, and it has taught its shape without a refusal.
            self.stepwise = true;
        } else if refused && before_reset && self.reported < 1.0 && remaining < 1.0 {
            // The upstream had said nothing remained until the reset, a gradual refill counted
            // on some coming back sooner, and the upstream refused it: nothing comes back
            // before the reset.
            self.stepwise = true;
        } else if self.stepwise && remaining >= self.reported + 2.0 {
            // More remains than before. Answers arrive out of order, so that alone proves
            // nothing; but a window's answers give more remaining with a *longer* reset (they
            // were made earlier in it), while a refilling budget gives more remaining with a
            // *shorter* one (it is closer to full). The latter, by a margin for rounding: it
            // refills after all.
            // And the same budget period, not a later window: whole again no later than the
            // answer before said (by half its reset, for the answers' own delays).
            let closer = match (reset, self.reported_reset, self.full_at) {
                (Some(r), Some(before), Some(full_at)) => {
                    r.as_secs_f64() < before.as_secs_f64() * 0.9 - 0.005
                        && now
                            .checked_add(r)
                            .zip(full_at.checked_add(before / 2))
                            .is_some_and(|(at, latest)| at <= latest)
                }
                _ => false,
            };
            if closer {
                self.stepwise = false;
            }
        }
        self.reported = remaining;
        self.reported_reset = reset;
        if let Some(reset) = reset {
            self.full_at = now.checked_add(reset);
        }
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
pub(super) fn learn(
    bucket: &mut Option<Bucket>,
    said: Option<BudgetReport>,
    refused: bool,
    now: Instant,
) {
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
    b.learn(limit, remaining, reset, refused, now);
    if fresh {
        // A budget first seen in an answer holds what that answer says remains.
        b.available = remaining.min(b.capacity);
    }
}

/// Whether a budget of `limit` told these answers, `(remaining, reset, when)` from now on,
/// counts as a window: the replica's side of the shape rule's table of cases, which the
/// fleet's script answers too (`fleet/tier/budget.rs`).
#[cfg(test)]
pub(crate) fn stepwise_after(limit: f64, answers: &[(f64, Duration, Duration)]) -> bool {
    let start = Instant::now();
    let mut bucket = None;
    for &(remaining, reset, at) in answers {
        let said = BudgetReport {
            limit: Some(limit),
            remaining,
            reset: Some(reset),
        };
        learn(&mut bucket, Some(said), false, start + at);
    }
    bucket.is_some_and(|b| b.is_stepwise())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(remaining: f64, reset_ms: u64) -> Option<BudgetReport> {
        Some(BudgetReport {
            limit: Some(10.0),
            remaining,
            reset: Some(Duration::from_millis(reset_ms)),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_ahead_of_the_reset_makes_a_budget_stepwise_and_a_refill_undoes_it() {
        let mut bucket = None;
        let t0 = Instant::now();
        learn(&mut bucket, said(0.0, 1000), false, t0);
        let b = bucket.as_mut().expect("learned");
        // Gradual: a request comes back long before the reset.
        b.refill(t0 + Duration::from_millis(200));
        assert!(b.available >= 1.0 && !b.is_stepwise());
        // The upstream refuses it, still saying nothing remains: it is a fixed window.
        learn(
            &mut bucket,
            said(0.0, 800),
            true,
            t0 + Duration::from_millis(200),
        );
        let b = bucket.as_mut().expect("learned");
        assert!(b.is_stepwise());
        b.refill(t0 + Duration::from_millis(900));
        assert!(b.available < 1.0, "nothing before the reset");
        assert_eq!(b.wait_for(1.0), Duration::from_millis(100));
        b.refill(t0 + Duration::from_millis(1000));
        assert_eq!(b.available, 10.0, "all of it at the reset");

        // A refusal while the upstream had said some remained says nothing of the shape
        // (here a bucket of 10 a second, 6 spent in 100 ms).
        let mut other = None;
        learn(&mut other, said(5.0, 500), false, t0);
        learn(
            &mut other,
            said(0.0, 1000),
            true,
            t0 + Duration::from_millis(100),
        );
        assert!(!other.expect("learned").is_stepwise());

        // A window's answers arriving out of order (more remaining, same reset) change
        // nothing; nor does the next window (more remaining, a longer reset).
        let t1 = t0 + Duration::from_millis(1000);
        for (remaining, reset) in [(8.0, 997), (4.0, 997), (7.0, 997), (0.0, 2), (9.0, 998)] {
            learn(&mut bucket, said(remaining, reset), false, t1);
            assert!(
                bucket.as_ref().expect("learned").is_stepwise(),
                "{remaining}"
            );
        }
        // Nor does an answer from a window some periods later, late in it (more remaining, a
        // shorter reset, but whole again well after the answer before said).
        learn(&mut bucket, said(5.0, 980), false, t1);
        learn(
            &mut bucket,
            said(9.0, 386),
            false,
            t1 + Duration::from_millis(2600),
        );
        assert!(bucket.as_ref().expect("learned").is_stepwise());
        // More remaining with a shorter reset: the budget refills after all.
        let t2 = t1 + Duration::from_millis(3000);
        learn(&mut bucket, said(0.0, 1000), false, t2);
        learn(
            &mut bucket,
            said(4.0, 600),
            false,
            t2 + Duration::from_millis(400),
        );
        assert!(!bucket.expect("learned").is_stepwise());
    }

    /// What a window's answers say, against what a refilling bucket's say, both of 10 a
    /// second, answers made as requests are spent at once.
    fn answers(window: bool, t0: Instant) -> Option<Bucket> {
        let mut bucket = None;
        for spent in 1..=6u32 {
            let remaining = f64::from(10 - spent);
            // A window ends 600 ms on whatever is spent; a bucket is whole again 100 ms
            // later for each request spent.
            let reset = if window { 600 } else { 100 * u64::from(spent) };
            let at = t0 + Duration::from_millis(u64::from(spent));
            learn(&mut bucket, said(remaining, reset), false, at);
        }
        bucket
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_shows_its_shape_before_any_refusal_and_a_bucket_does_not() {
        let t0 = Instant::now();
        assert!(answers(true, t0).expect("learned").is_stepwise());
        assert!(!answers(false, t0).expect("learned").is_stepwise());
    }
}
