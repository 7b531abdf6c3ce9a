//! The governor: what must reach the upstream is paced under its budget, and refusals are
//! waited out instead of passed on.
//!
//! This module owns the budgets (one per credential partition): requests and tokens per
//! window, learned from the upstream's rate-limit headers (OpenAI and Azure `x-ratelimit-*`
//! with Go-style reset durations, Anthropic `anthropic-ratelimit-*` with RFC 3339 resets) or
//! set by the operator (`--rpm`, `--tpm`); the pause after a refusal; the fair queue in front
//! of each budget; and the rules for what is worth retrying. It never sees a cache hit: the
//! engine calls it only on the way to the upstream.
//!
//! # Waiting in line
//!
//! Requests for one budget take turns in arrival order (a fair queue): the one at the head
//! waits until the budget allows it or its queue deadline passes, while the others wait
//! behind it. A refusal pauses the whole budget, not just the request that got it, so the
//! others do not run into the same wall.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, so that tests can pause and advance it.
use tokio::time::Instant;

use http::HeaderMap;

use crate::error::{Error, ErrorKind};
use crate::key::Partition;

mod bucket;
pub(crate) mod shape;
mod signals;

#[cfg(test)]
pub(crate) use bucket::stepwise_after;
use bucket::{Bucket, learn};
use signals::RateLimits;
pub(crate) use signals::{
    BudgetReport, Disposition, MAX_SERVER_WAIT, backoff, classify, estimate_tokens, retry_after,
};

/// The operator's settings for the governor. Made from [`GovernorSettings::default`] (the
/// proxy's pacing) or [`GovernorSettings::off`] (calls go as they are made), then adjusted
/// with the methods named after each field.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct GovernorSettings {
    /// Wait in line for the upstream's budget (learned from its rate-limit headers, or set
    /// with `rpm` and `tpm`), and, while a budget is unknown, send its first call alone to
    /// learn it. Off, calls go as soon as they are made (`max_concurrency` still bounds
    /// them); what `retry_budget` says of refusals still holds.
    pub pace: bool,
    /// Requests per minute never to exceed; learned from the upstream when `None`.
    pub rpm: Option<u32>,
    /// Tokens per minute never to exceed; learned from the upstream when `None`.
    pub tpm: Option<u32>,
    /// Total time one request may spend waiting out refusals before the upstream's last
    /// answer is handed to the client as it came.
    pub retry_budget: Duration,
    /// Longest a request waits in the queue for budget before it is answered `429`.
    pub max_queue_wait: Duration,
    /// Most upstream calls at the same time (`None`: no bound).
    pub max_concurrency: Option<usize>,
}

impl Default for GovernorSettings {
    /// Budgets learned from the upstream, 60 s of retry budget, 60 s of queue wait, no
    /// concurrency bound.
    fn default() -> Self {
        GovernorSettings {
            pace: true,
            rpm: None,
            tpm: None,
            retry_budget: Duration::from_secs(60),
            max_queue_wait: Duration::from_secs(60),
            max_concurrency: None,
        }
    }
}

impl GovernorSettings {
    /// No governor: no pacing, no probe, no retries. Each call goes upstream as soon as it is
    /// made and its answer, a `429` included, is handed on as it came: for a program whose
    /// client already paces and retries (the official SDKs retry twice).
    pub fn off() -> GovernorSettings {
        GovernorSettings {
            pace: false,
            retry_budget: Duration::ZERO,
            ..GovernorSettings::default()
        }
    }

    /// Whether calls wait in line for budget (see [`GovernorSettings::pace`]).
    #[must_use]
    pub fn pace(mut self, pace: bool) -> Self {
        self.pace = pace;
        self
    }

    /// Requests per minute never to exceed (`None`: learned from the upstream).
    #[must_use]
    pub fn rpm(mut self, rpm: Option<u32>) -> Self {
        self.rpm = rpm;
        self
    }

    /// Tokens per minute never to exceed (`None`: learned from the upstream).
    #[must_use]
    pub fn tpm(mut self, tpm: Option<u32>) -> Self {
        self.tpm = tpm;
        self
    }

    /// Total time one request may spend waiting out refusals (zero: none is retried).
    #[must_use]
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    /// Longest a request waits in line for budget before it is answered `429`.
    #[must_use]
    pub fn max_queue_wait(mut self, wait: Duration) -> Self {
        self.max_queue_wait = wait;
        self
    }

    /// Most upstream calls at the same time (`None`: no bound).
    #[must_use]
    pub fn max_concurrency(mut self, calls: Option<usize>) -> Self {
        self.max_concurrency = calls;
        self
    }
}

/// Longest the head of the line sleeps before looking at its budget again.
const RECHECK_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct BudgetState {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    paused_until: Option<Instant>,
    /// When a request last asked for this budget or taught it something.
    last_used: Option<Instant>,
    /// An answer has come back (with or without rate-limit headers) since the budget was
    /// created: there is no more reason to probe one request at a time.
    probed: bool,
    /// Until then the fleet counts the request budget, as a fixed window.
    fleet_counts_until: Option<Instant>,
}

/// How long the fleet's word that it counts a budget holds without being said again.
const FLEET_COUNTS: Duration = Duration::from_secs(10);

/// One credential partition's budget.
#[derive(Debug, Default)]
struct Budget {
    /// The queue: whoever holds it is at the head of the line.
    turn: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<BudgetState>,
}

/// The head of the line, held by a probe: released when its answer is in, or by a timer.
type ProbeHold = Arc<Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>>;

/// A request's place in the budget was granted. Dropping it (once the answer's headers are
/// in and observed) frees its concurrency slot, and, while the budget was still unknown, the
/// head of the line.
pub(crate) struct Permit {
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    probe: Option<ProbeHold>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(probe) = &self.probe {
            probe.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

/// Longest a probe holds the line: a slow answer (a long completion sends its headers only
/// at the end) must not keep everyone else waiting for it.
const PROBE_HOLD: Duration = Duration::from_secs(2);

/// What a replica knows of a request budget's pace, as the fleet's budget uses it.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct Pace {
    /// Requests a second it refills at.
    pub per_second: f64,
    /// What it allows at once.
    pub burst: f64,
}

/// The queue wait passed before the budget allowed the request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueFull {
    /// When the budget is expected to allow it.
    pub retry_after: Duration,
}

impl From<QueueFull> for Error {
    fn from(full: QueueFull) -> Error {
        // The official SDKs honour a `retry-after` of up to 60 s exactly.
        let wait = full.retry_after.min(Duration::from_secs(60));
        Error::new(
            ErrorKind::QueueFull,
            format!(
                "llm-dedup's queue for the upstream's rate limit is full; retry in {} s",
                wait.as_secs().max(1)
            ),
        )
        .with_retry_after(wait)
    }
}

/// Longest a retry budget or a queue wait may be set to: a day. Longer settings are read as
/// this, so that no deadline computed from them can overflow a clock.
pub const MAX_SETTING_WAIT: Duration = Duration::from_secs(24 * 3600);

/// A budget nobody used for this long has refilled whatever it learned (budgets are per
/// minute): it is dropped, and learned again if its credential comes back.
const IDLE_BUDGET: Duration = Duration::from_secs(60);

/// How often the budgets are looked over for idle ones.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Most budgets kept. Past this, idle budgets go at once, however recently they were used
/// (each costs about 300 bytes; random credentials must not grow the table without end).
const MAX_BUDGETS: usize = 10_000;

/// Budgets per credential partition.
///
/// # Memory
///
/// One budget per credential partition seen, dropped once idle for [`IDLE_BUDGET`]; never more
/// than [`MAX_BUDGETS`] idle ones. Budgets in use (a request waiting or sending) are kept.
pub(crate) struct Governor {
    settings: GovernorSettings,
    budgets: Mutex<Budgets>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

/// The budgets and when they were last looked over.
#[derive(Default)]
struct Budgets {
    by_partition: HashMap<Partition, Arc<Budget>>,
    swept_at: Option<Instant>,
}

impl Budgets {
    /// Drops idle budgets: those nobody holds and nobody used for [`IDLE_BUDGET`], or, while
    /// there are too many, any nobody holds and no pause is running on.
    fn sweep(&mut self, now: Instant) {
        let crowded = self.by_partition.len() >= MAX_BUDGETS;
        self.by_partition.retain(|_, budget| {
            if Arc::strong_count(budget) > 1 {
                return true;
            }
            let s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
            let paused = s.paused_until.is_some_and(|p| p > now);
            let recent = s
                .last_used
                .is_some_and(|at| now.saturating_duration_since(at) < IDLE_BUDGET);
            paused || (recent && !crowded)
        });
        self.swept_at = Some(now);
    }
}

impl Governor {
    /// A governor with `settings`; waits longer than [`MAX_SETTING_WAIT`] are read as that.
    pub(crate) fn new(settings: GovernorSettings) -> Governor {
        let settings = GovernorSettings {
            retry_budget: settings.retry_budget.min(MAX_SETTING_WAIT),
            max_queue_wait: settings.max_queue_wait.min(MAX_SETTING_WAIT),
            ..settings
        };
        Governor {
            settings,
            budgets: Mutex::new(Budgets::default()),
            slots: settings
                .max_concurrency
                .map(|n| n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS))
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
        }
    }

    pub(crate) fn settings(&self) -> &GovernorSettings {
        &self.settings
    }

    /// The budget of `partition`, made if it has none; idle budgets are dropped on the way.
    fn budget(&self, partition: &Partition) -> Arc<Budget> {
        let now = Instant::now();
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let due = budgets
            .swept_at
            .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY);
        if due || budgets.by_partition.len() >= MAX_BUDGETS {
            budgets.sweep(now);
        }
        let budget = budgets
            .by_partition
            .entry(*partition)
            .or_insert_with(|| {
                let budget = Budget::default();
                if let Ok(mut s) = budget.state.lock() {
                    s.requests = self.settings.rpm.map(|r| Bucket::per_minute(r, now));
                    s.tokens = self.settings.tpm.map(|t| Bucket::per_minute(t, now));
                }
                Arc::new(budget)
            })
            .clone();
        drop(budgets);
        budget
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_used = Some(now);
        budget
    }

    /// How many budgets are kept right now.
    #[cfg(test)]
    fn budget_count(&self) -> usize {
        let budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        budgets.by_partition.len()
    }

    /// Waits in line until the budget of `partition` allows a request estimated at `tokens`,
    /// or fails once `deadline` would be passed.
    pub(crate) async fn acquire(
        &self,
        partition: &Partition,
        tokens: u32,
        deadline: Instant,
    ) -> Result<Permit, QueueFull> {
        // Come back a second after the deadline this request could not meet.
        let full = || QueueFull {
            retry_after: deadline.saturating_duration_since(Instant::now())
                + Duration::from_secs(1),
        };
        if !self.settings.pace {
            return Ok(Permit {
                _slot: self.slot(deadline).await.ok_or_else(full)?,
                probe: None,
            });
        }
        let budget = self.budget(partition);
        let Ok(turn) = tokio::time::timeout_at(deadline, budget.turn.clone().lock_owned()).await
        else {
            return Err(full());
        };
        loop {
            let now = Instant::now();
            let wait = {
                let mut s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
                let paused = s
                    .paused_until
                    .map_or(Duration::ZERO, |p| p.saturating_duration_since(now));
                let mut wait = paused;
                let counted = s.fleet_counts_until.is_some_and(|until| now < until);
                let requests = s.requests.as_mut().filter(|_| !counted);
                if let Some(r) = requests {
                    r.refill(now);
                    wait = wait.max(r.wait_for(1.0));
                }
                if let Some(t) = s.tokens.as_mut() {
                    t.refill(now);
                    wait = wait.max(t.wait_for(f64::from(tokens)));
                }
                if wait.is_zero() {
                    if let Some(r) = s.requests.as_mut().filter(|_| !counted) {
                        r.available -= 1.0;
                    }
                    if let Some(t) = s.tokens.as_mut() {
                        t.available -= f64::from(tokens);
                    }
                }
                wait
            };
            if wait.is_zero() {
                break;
            }
            if now.checked_add(wait).is_none_or(|at| at > deadline) {
                return Err(QueueFull { retry_after: wait });
            }
            // In short slices: what other answers teach about the budget meanwhile (a pace
            // learned, a pause) takes effect at once instead of after a stale wait.
            tokio::time::sleep(wait.min(RECHECK_EVERY)).await;
        }
        // While nothing is known of the budget, one request at a time goes to learn it: the
        // others wait in line until its answer's headers are in, instead of all running into
        // a limit nobody knows yet.
        let probing = {
            let s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
            !s.probed && (s.requests.is_none() || s.tokens.is_none())
        };
        let probe = probing.then(|| {
            let held: ProbeHold = Arc::new(Mutex::new(Some(turn)));
            // Weak: a timer does not keep a budget from being dropped once idle.
            let (timer, budget) = (held.clone(), Arc::downgrade(&budget));
            tokio::spawn(async move {
                tokio::time::sleep(PROBE_HOLD).await;
                let still_held = timer.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let (Some(_), Some(budget)) = (still_held, budget.upgrade()) {
                    // No answer yet: stop probing one at a time; the first answer to come back
                    // teaches the budget.
                    budget
                        .state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .probed = true;
                }
            });
            held
        });
        let slot = self.slot(deadline).await.ok_or_else(full)?;
        Ok(Permit { _slot: slot, probe })
    }

    /// A slot among the calls at the same time, when they are bounded (`Some(None)` when they
    /// are not); `None` if none frees up by `deadline`.
    async fn slot(&self, deadline: Instant) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
        let Some(slots) = &self.slots else {
            return Some(None);
        };
        match tokio::time::timeout_at(deadline, slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Some(Some(permit)),
            _ => None,
        }
    }

    /// Learns the budget from an answer's rate-limit headers; `refused` when the answer was a
    /// `429` (see the budget shapes in `bucket.rs`). Returns what they said of the request
    /// budget (its size, what remains and how long until it is whole again): what a fleet
    /// shares.
    pub(crate) fn observe(
        &self,
        partition: &Partition,
        headers: &HeaderMap,
        refused: bool,
    ) -> Option<BudgetReport> {
        let learned = RateLimits::read(headers);
        let said = learned.requests;
        let budget = self.budget(partition);
        let mut s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
        s.probed = true;
        if learned.is_empty() {
            return said;
        }
        let now = Instant::now();
        // An operator's --rpm / --tpm is a ceiling the headers never raise.
        if self.settings.rpm.is_none() {
            learn(&mut s.requests, learned.requests, refused, now);
        }
        if self.settings.tpm.is_none() {
            learn(&mut s.tokens, learned.tokens, refused, now);
        }
        said
    }

    /// The request pace of `partition`'s budget, if known: learned from the headers, or set
    /// with `--rpm`.
    pub(crate) fn request_pace(&self, partition: &Partition) -> Option<Pace> {
        let budget = self.budget(partition);
        let s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
        s.requests.as_ref().map(|b| Pace {
            per_second: b.per_second(),
            burst: b.capacity,
        })
    }

    /// Whether the fleet counts the request budget of `partition` as a fixed window, from
    /// every replica's answers (see `fleet/tier/budget.rs`). While it does, this replica's own
    /// estimate of it, made from its share of the answers only, stops holding requests back
    /// (its pause, token budget and fair queue still apply); said with every turn the fleet
    /// gives, and forgotten [`FLEET_COUNTS`] after it was last said, or when Redis cannot be
    /// used.
    pub(crate) fn fleet_counts_requests(&self, partition: &Partition, counts: bool) {
        let budget = self.budget(partition);
        let mut s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
        s.fleet_counts_until = counts
            .then(|| Instant::now().checked_add(FLEET_COUNTS))
            .flatten();
    }

    /// Pauses the whole budget of `partition` for `wait` (after a refusal), at most
    /// [`MAX_SERVER_WAIT`].
    pub(crate) fn pause(&self, partition: &Partition, wait: Duration) {
        let budget = self.budget(partition);
        let mut s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let until = now.checked_add(wait.min(MAX_SERVER_WAIT)).unwrap_or(now);
        s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
        // The refusal says the budget is spent, whatever was believed.
        if let Some(r) = s.requests.as_mut() {
            r.available = r.available.min(0.0);
        }
    }

    /// Corrects the token budget once the real usage is known.
    pub(crate) fn settle(&self, partition: &Partition, estimated: u32, actual: Option<u64>) {
        let Some(actual) = actual else { return };
        let budget = self.budget(partition);
        let mut s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = s.tokens.as_mut() {
            t.available = (t.available + f64::from(estimated) - actual as f64).min(t.capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("value"));
        }
        h
    }

    /// An upstream with fixed one-second windows of 10, whose headers say truthfully what
    /// remains and when the window ends, and whose 429s say to wait for its end: 60 requests
    /// in a row, each waiting its turn, retried after a refusal as the engine does.
    async fn through_fixed_windows(governor: &Governor, p: &Partition) -> usize {
        let far = Instant::now() + Duration::from_secs(600);
        let start = Instant::now();
        let mut window = (0u64, 0u32);
        let mut refused = 0;
        let mut sent = 0;
        while sent < 60 {
            let permit = governor.acquire(p, 0, far).await.expect("permit");
            // The answer takes 20 ms, and is produced at its end.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let elapsed = Instant::now() - start;
            let index = elapsed.as_secs();
            if window.0 != index {
                window = (index, 0);
            }
            let ok = window.1 < 10;
            if ok {
                window.1 += 1;
            }
            let left = Duration::from_secs(index + 1) - elapsed;
            let said = headers(&[
                ("x-ratelimit-limit-requests", "10"),
                (
                    "x-ratelimit-remaining-requests",
                    &(10 - window.1).to_string(),
                ),
                (
                    "x-ratelimit-reset-requests",
                    &format!("{}ms", left.as_millis().max(1)),
                ),
            ]);
            governor.observe(p, &said, !ok);
            drop(permit);
            if ok {
                sent += 1;
            } else {
                refused += 1;
                governor.pause(p, left);
            }
        }
        refused
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_window_is_spent_then_waited_for_after_one_refusal() {
        let governor = Governor::new(GovernorSettings::default());
        let refused = through_fixed_windows(&governor, &Partition::from_bytes([6u8; 32])).await;
        assert!(refused <= 1, "{refused} refusals in 6 windows");
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_budget_never_sends_more_than_it_allows_in_a_minute() {
        let governor = Arc::new(Governor::new(GovernorSettings {
            rpm: Some(600),
            ..GovernorSettings::default()
        }));
        let p = Partition::from_bytes([1u8; 32]);
        let far = Instant::now() + Duration::from_secs(600);
        let started = tokio::time::Instant::now();
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(60) {
            governor
                .acquire(&p, 0, far)
                .await
                .expect("waits, never fails");
            if started.elapsed() < Duration::from_secs(60) {
                sent += 1;
            }
        }
        assert!(
            (590..=600).contains(&sent),
            "{sent} requests in the first minute"
        );
        // A queue deadline that cannot be met is refused, with a time to come back.
        let soon = Instant::now() + Duration::from_millis(10);
        let full = governor
            .acquire(&p, 0, soon)
            .await
            .err()
            .expect("queue full");
        assert!(full.retry_after > Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_probe_holds_the_line_only_briefly() {
        let governor = Governor::new(GovernorSettings::default());
        let p = Partition::from_bytes([5u8; 32]);
        let far = Instant::now() + Duration::from_secs(600);
        let probe = governor.acquire(&p, 0, far).await.expect("the probe");
        // Its answer has not come back: the next request waits, but not for long.
        let started = tokio::time::Instant::now();
        let next = governor
            .acquire(&p, 0, far)
            .await
            .expect("released by the timer");
        let waited = started.elapsed();
        assert!(
            waited >= PROBE_HOLD && waited < PROBE_HOLD + Duration::from_millis(50),
            "{waited:?}"
        );
        drop((probe, next));
    }

    #[tokio::test(start_paused = true)]
    async fn an_azure_budget_with_nothing_left_waits() {
        let governor = Governor::new(GovernorSettings::default());
        let p = Partition::from_bytes([4u8; 32]);
        let far = Instant::now() + Duration::from_secs(600);
        governor.acquire(&p, 0, far).await.expect("the probe");
        governor.observe(
            &p,
            &headers(&[("x-ratelimit-remaining-requests", "0")]),
            false,
        );
        let started = tokio::time::Instant::now();
        governor.acquire(&p, 0, far).await.expect("after a refill");
        assert!(
            started.elapsed() > Duration::ZERO,
            "nothing left: it waited"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_pauses_the_whole_budget() {
        let governor = Governor::new(GovernorSettings::default());
        let p = Partition::from_bytes([2u8; 32]);
        let far = Instant::now() + Duration::from_secs(600);
        governor
            .acquire(&p, 0, far)
            .await
            .expect("unknown budgets do not wait");
        governor.pause(&p, Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        governor.acquire(&p, 0, far).await.expect("after the pause");
        assert!(started.elapsed() >= Duration::from_secs(5));
        // Another partition is not paused.
        let started = tokio::time::Instant::now();
        governor
            .acquire(&Partition::from_bytes([3u8; 32]), 0, far)
            .await
            .expect("other credential");
        assert!(started.elapsed() < Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_budgets_are_dropped_and_their_number_is_bounded() {
        let governor = Governor::new(GovernorSettings::default());
        let far = Instant::now() + Duration::from_secs(600);
        let partition = |i: u32| {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&i.to_le_bytes());
            Partition::from_bytes(bytes)
        };
        // One request each from a flood of credentials (random API keys).
        for i in 0..(MAX_BUDGETS as u32 + 500) {
            let permit = governor.acquire(&partition(i), 0, far).await.expect("ok");
            governor.observe(&partition(i), &HeaderMap::new(), false);
            drop(permit);
        }
        assert!(
            governor.budget_count() <= MAX_BUDGETS,
            "{}",
            governor.budget_count()
        );
        // Once their window has passed, idle budgets go.
        tokio::time::advance(IDLE_BUDGET + SWEEP_EVERY).await;
        governor
            .acquire(&partition(0), 0, Instant::now() + Duration::from_secs(600))
            .await
            .expect("ok");
        assert_eq!(governor.budget_count(), 1);
        // A paused budget is kept even when idle: its pause still holds for the next request.
        governor.pause(&partition(7), Duration::from_secs(600));
        tokio::time::advance(IDLE_BUDGET + SWEEP_EVERY).await;
        governor
            .acquire(&partition(0), 0, Instant::now() + Duration::from_secs(600))
            .await
            .expect("ok");
        assert_eq!(governor.budget_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_settings_and_waits_never_overflow_a_clock() {
        let governor = Governor::new(GovernorSettings {
            retry_budget: Duration::MAX,
            max_queue_wait: Duration::MAX,
            ..GovernorSettings::default()
        });
        assert_eq!(governor.settings().max_queue_wait, MAX_SETTING_WAIT);
        let p = Partition::from_bytes([9u8; 32]);
        governor.pause(&p, Duration::MAX);
        let soon = Instant::now() + Duration::from_millis(10);
        let full = governor
            .acquire(&p, u32::MAX, soon)
            .await
            .err()
            .expect("paused");
        assert!(full.retry_after <= MAX_SERVER_WAIT + Duration::from_secs(1));
    }
}
