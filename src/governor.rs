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
use std::time::{Duration, SystemTime};

// tokio's clock, so that tests can pause and advance it.
use tokio::time::Instant;

use http::{HeaderMap, StatusCode};
use serde_json::Value;

/// The operator's settings for the governor.
#[derive(Debug, Clone, Copy)]
pub struct GovernorSettings {
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
            rpm: None,
            tpm: None,
            retry_budget: Duration::from_secs(60),
            max_queue_wait: Duration::from_secs(60),
            max_concurrency: None,
        }
    }
}

/// Longest the head of the line sleeps before looking at its budget again.
const RECHECK_EVERY: Duration = Duration::from_millis(100);

/// The share of a learned refill rate used for pacing (operator-set rates are exact).
const LEARNED_RATE_HEADROOM: f64 = 0.9;

/// A refill-at-a-rate budget (requests or tokens).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    capacity: f64,
    available: f64,
    per_second: f64,
    at: Instant,
}

impl Bucket {
    /// A budget of `limit` a minute that never allows more than `limit` in any minute: a
    /// burst of one second's worth, then the rest spread evenly (providers enforce per-minute
    /// limits over shorter slices too).
    fn per_minute(limit: u32, now: Instant) -> Bucket {
        let limit = f64::from(limit.max(1));
        let burst = (limit / 60.0).floor().max(1.0);
        Bucket {
            capacity: burst,
            available: burst,
            per_second: (limit - burst).max(1.0) / 60.0,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.available = (self.available + elapsed * self.per_second).min(self.capacity);
        self.at = now;
    }

    /// How long until `amount` is available (zero if it is).
    fn wait_for(&self, amount: f64) -> Duration {
        let missing = amount.min(self.capacity) - self.available;
        if missing <= 0.0 || self.per_second <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing / self.per_second)
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

#[derive(Debug, Default)]
struct BudgetState {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    paused_until: Option<Instant>,
    /// An answer has come back (with or without rate-limit headers) since the budget was
    /// created: there is no more reason to probe one request at a time.
    probed: bool,
}

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

/// The queue wait passed before the budget allowed the request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueFull {
    /// When the budget is expected to allow it.
    pub retry_after: Duration,
}

/// Budgets per credential partition.
pub(crate) struct Governor {
    settings: GovernorSettings,
    budgets: Mutex<HashMap<[u8; 32], Arc<Budget>>>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl Governor {
    pub(crate) fn new(settings: GovernorSettings) -> Governor {
        Governor {
            settings,
            budgets: Mutex::new(HashMap::new()),
            slots: settings
                .max_concurrency
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1)))),
        }
    }

    pub(crate) fn settings(&self) -> &GovernorSettings {
        &self.settings
    }

    fn budget(&self, partition: &[u8; 32]) -> Arc<Budget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        budgets
            .entry(*partition)
            .or_insert_with(|| {
                let now = Instant::now();
                let budget = Budget::default();
                if let Ok(mut s) = budget.state.lock() {
                    s.requests = self.settings.rpm.map(|r| Bucket::per_minute(r, now));
                    s.tokens = self.settings.tpm.map(|t| Bucket::per_minute(t, now));
                }
                Arc::new(budget)
            })
            .clone()
    }

    /// Waits in line until the budget of `partition` allows a request estimated at `tokens`,
    /// or fails once `deadline` would be passed.
    pub(crate) async fn acquire(
        &self,
        partition: &[u8; 32],
        tokens: u32,
        deadline: Instant,
    ) -> Result<Permit, QueueFull> {
        let budget = self.budget(partition);
        let full = |at: Instant| QueueFull {
            retry_after: at.saturating_duration_since(Instant::now()),
        };
        let Ok(turn) = tokio::time::timeout_at(deadline, budget.turn.clone().lock_owned()).await
        else {
            return Err(full(deadline + Duration::from_secs(1)));
        };
        loop {
            let now = Instant::now();
            let wait = {
                let mut s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
                let paused = s
                    .paused_until
                    .map_or(Duration::ZERO, |p| p.saturating_duration_since(now));
                let mut wait = paused;
                if let Some(r) = s.requests.as_mut() {
                    r.refill(now);
                    wait = wait.max(r.wait_for(1.0));
                }
                if let Some(t) = s.tokens.as_mut() {
                    t.refill(now);
                    wait = wait.max(t.wait_for(f64::from(tokens)));
                }
                if wait.is_zero() {
                    if let Some(r) = s.requests.as_mut() {
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
            if now + wait > deadline {
                return Err(full(now + wait));
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
            let (timer, budget) = (held.clone(), budget.clone());
            tokio::spawn(async move {
                tokio::time::sleep(PROBE_HOLD).await;
                let still_held = timer.lock().unwrap_or_else(|e| e.into_inner()).take();
                if still_held.is_some() {
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
        let slot = match &self.slots {
            Some(slots) => {
                match tokio::time::timeout_at(deadline, slots.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => Some(permit),
                    _ => return Err(full(deadline + Duration::from_secs(1))),
                }
            }
            None => None,
        };
        Ok(Permit { _slot: slot, probe })
    }

    /// Learns the budget from an answer's rate-limit headers.
    pub(crate) fn observe(&self, partition: &[u8; 32], headers: &HeaderMap) {
        let learned = RateHeaders::read(headers);
        let budget = self.budget(partition);
        let mut s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
        s.probed = true;
        if learned.is_empty() {
            return;
        }
        let now = Instant::now();
        // An operator's --rpm / --tpm is a ceiling the headers never raise.
        if self.settings.rpm.is_none() {
            learn(&mut s.requests, learned.requests, now);
        }
        if self.settings.tpm.is_none() {
            learn(&mut s.tokens, learned.tokens, now);
        }
    }

    /// Pauses the whole budget of `partition` for `wait` (after a refusal).
    pub(crate) fn pause(&self, partition: &[u8; 32], wait: Duration) {
        let budget = self.budget(partition);
        let mut s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
        let until = Instant::now() + wait;
        s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
        // The refusal says the budget is spent, whatever was believed.
        if let Some(r) = s.requests.as_mut() {
            r.available = r.available.min(0.0);
        }
    }

    /// Corrects the token budget once the real usage is known.
    pub(crate) fn settle(&self, partition: &[u8; 32], estimated: u32, actual: Option<u64>) {
        let Some(actual) = actual else { return };
        let budget = self.budget(partition);
        let mut s = budget.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = s.tokens.as_mut() {
            t.available = (t.available + f64::from(estimated) - actual as f64).min(t.capacity);
        }
    }
}

/// What rate-limit headers say: (limit, remaining, time until full) for requests and tokens.
/// Azure sends only what remains; the limit is then unknown (`None`).
#[derive(Debug, Default, PartialEq)]
struct RateHeaders {
    requests: Option<(Option<f64>, f64, Option<Duration>)>,
    tokens: Option<(Option<f64>, f64, Option<Duration>)>,
}

impl RateHeaders {
    fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    fn read(headers: &HeaderMap) -> RateHeaders {
        let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
        let number = |name: &str| text(name)?.parse::<f64>().ok();
        let read = |kind: &str| -> Option<(Option<f64>, f64, Option<Duration>)> {
            // OpenAI (limit, remaining, reset) and Azure (remaining only).
            if let Some(remaining) = number(&format!("x-ratelimit-remaining-{kind}")) {
                let limit = number(&format!("x-ratelimit-limit-{kind}"));
                let reset = text(&format!("x-ratelimit-reset-{kind}")).and_then(go_duration);
                return Some((limit, remaining, reset));
            }
            // Anthropic.
            let limit = number(&format!("anthropic-ratelimit-{kind}-limit"))?;
            let remaining = number(&format!("anthropic-ratelimit-{kind}-remaining"))?;
            let reset = text(&format!("anthropic-ratelimit-{kind}-reset"))
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .and_then(|at| at.duration_since(SystemTime::now()).ok());
            Some((Some(limit), remaining, reset))
        };
        RateHeaders {
            requests: read("requests"),
            tokens: read("tokens"),
        }
    }
}

/// Updates (or starts) a budget from what one answer's headers say. Without a limit (Azure),
/// a known budget keeps its size, and an unknown one starts with what remains, refilled at
/// the per-minute pace.
fn learn(
    bucket: &mut Option<Bucket>,
    said: Option<(Option<f64>, f64, Option<Duration>)>,
    now: Instant,
) {
    let Some((limit, remaining, reset)) = said else {
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

/// Parses a Go duration as OpenAI writes resets: `20ms`, `1s`, `6m0s`, `1h2m3.5s`.
pub(crate) fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|i| *i > 0)?;
        let (number, tail) = rest.split_at(split);
        let number: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += number * seconds;
        rest = tail;
    }
    Some(Duration::from_secs_f64(total))
}

/// The wait an answer asks for: `retry-after-ms`, else `retry-after` in seconds or as an HTTP
/// date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|t| t.parse::<f64>().ok()) {
        return (ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0));
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// What to do with an upstream answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Hand it to the client.
    Deliver,
    /// Transient: wait and try again.
    Retry,
    /// Waiting cannot fix it: hand it on at once, telling SDKs not to retry. The reason is
    /// for the log.
    Final(&'static str),
}

/// Classifies an answer by status and body, per the providers' documented error shapes.
pub(crate) fn classify(status: StatusCode, body: &[u8]) -> Disposition {
    match status.as_u16() {
        200..=399 => Disposition::Deliver,
        429 => {
            let error: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let field = |name: &str| {
                error
                    .pointer(&format!("/error/{name}"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            let (code, kind, message) = (field("code"), field("type"), field("message"));
            if code == "insufficient_quota" || kind == "insufficient_quota" {
                Disposition::Final("quota exhausted (billing); waiting does not help")
            } else if message.to_ascii_lowercase().contains("request too large") {
                Disposition::Final("request too large for the rate limit; it can never pass")
            } else {
                Disposition::Retry
            }
        }
        408 | 500..=599 => Disposition::Retry,
        400 => Disposition::Final("bad request"),
        401 => Disposition::Final("invalid credentials"),
        403 => Disposition::Final("forbidden"),
        404 => Disposition::Final("not found"),
        _ => Disposition::Final("client error"),
    }
}

/// Exponential backoff with jitter for the `attempt`-th retry (from 0): 0.5 s doubling to
/// 8 s, less up to a quarter, like the official SDKs.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = (0.5 * 2f64.powi(attempt.min(16) as i32)).min(8.0);
    let jitter = 1.0 - rand::random::<f64>() * 0.25;
    Duration::from_secs_f64(base * jitter)
}

/// A rough token count for a request, as providers charge it up front: the prompt (about four
/// bytes a token) plus the completion allowance.
pub(crate) fn estimate_tokens(body_len: usize, request: &Value) -> u32 {
    let allowance = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|f| request.get(*f)?.as_u64())
        .unwrap_or(0);
    u32::try_from(body_len as u64 / 4 + allowance).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn go_durations_as_openai_writes_them() {
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(go_duration(""), None);
        assert_eq!(go_duration("5 minutes"), None);
        assert_eq!(go_duration("s"), None);
    }

    #[test]
    fn retry_after_in_ms_seconds_and_http_date() {
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "250")])),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "3")])),
            Some(Duration::from_secs(3))
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let wait = retry_after(&headers(&[("retry-after", &later)])).expect("date");
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn rate_headers_of_openai_and_anthropic() {
        let openai = RateHeaders::read(&headers(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]));
        assert_eq!(
            openai.requests,
            Some((Some(60.0), 59.0, Some(Duration::from_secs(1))))
        );
        assert_eq!(
            openai.tokens.map(|t| t.2),
            Some(Some(Duration::from_secs(360)))
        );
        let reset = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(20));
        let anthropic = RateHeaders::read(&headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", &reset.to_string()),
        ]));
        let (limit, remaining, wait) = anthropic.requests.expect("requests");
        assert_eq!((limit, remaining), (Some(50.0), 49.0));
        assert!(wait.expect("reset") > Duration::from_secs(15));
        assert!(RateHeaders::read(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn what_is_worth_retrying() {
        let body = |v: Value| v.to_string().into_bytes();
        let s = |n| StatusCode::from_u16(n).expect("status");
        let rate = body(
            json!({"error": {"message": "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.", "type": "requests", "code": "rate_limit_exceeded"}}),
        );
        assert_eq!(classify(s(429), &rate), Disposition::Retry);
        let quota = body(
            json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}}),
        );
        assert!(matches!(classify(s(429), &quota), Disposition::Final(_)));
        let large = body(
            json!({"error": {"message": "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000. The input or output tokens must be reduced", "code": "rate_limit_exceeded"}}),
        );
        assert!(matches!(classify(s(429), &large), Disposition::Final(_)));
        let azure =
            body(json!({"error": {"code": "429", "message": "Please retry after 33 seconds."}}));
        assert_eq!(classify(s(429), &azure), Disposition::Retry);
        for retry in [408, 500, 502, 503, 529] {
            assert_eq!(classify(s(retry), b"{}"), Disposition::Retry, "{retry}");
        }
        for fin in [400, 401, 403, 404] {
            assert!(
                matches!(classify(s(fin), b"{}"), Disposition::Final(_)),
                "{fin}"
            );
        }
        assert_eq!(classify(s(200), b"{}"), Disposition::Deliver);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..10 {
            let b = backoff(attempt);
            let base = (0.5 * 2f64.powi(attempt as i32)).min(8.0);
            assert!(
                b.as_secs_f64() <= base && b.as_secs_f64() >= base * 0.75,
                "{attempt}: {b:?}"
            );
        }
    }

    #[test]
    fn token_estimate_is_prompt_plus_allowance() {
        assert_eq!(estimate_tokens(400, &json!({"max_tokens": 50})), 150);
        assert_eq!(
            estimate_tokens(400, &json!({"max_completion_tokens": 10})),
            110
        );
        assert_eq!(estimate_tokens(40, &json!({})), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_budget_never_sends_more_than_it_allows_in_a_minute() {
        let governor = Arc::new(Governor::new(GovernorSettings {
            rpm: Some(600),
            ..GovernorSettings::default()
        }));
        let p = [1u8; 32];
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
        let p = [5u8; 32];
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
        let p = [4u8; 32];
        let far = Instant::now() + Duration::from_secs(600);
        governor.acquire(&p, 0, far).await.expect("the probe");
        governor.observe(&p, &headers(&[("x-ratelimit-remaining-requests", "0")]));
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
        let p = [2u8; 32];
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
            .acquire(&[3u8; 32], 0, far)
            .await
            .expect("other credential");
        assert!(started.elapsed() < Duration::from_millis(1));
    }
}
