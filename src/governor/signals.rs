//! What the upstream's answers say, read without trusting them: rate-limit headers, the waits
//! a refusal asks for, and which refusals are worth waiting out. Pure: headers and bodies in,
//! numbers and verdicts out.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use serde_json::Value;

use crate::headers::{self, RETRY_AFTER_MS, RateLimitNames};
use crate::throttle::LogGate;

/// What one answer's rate-limit headers say about one budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BudgetReport {
    /// The size of the budget; Azure sends only what remains, so it may be unknown.
    pub limit: Option<f64>,
    /// What is left of it.
    pub remaining: f64,
    /// How long until it is full again.
    pub reset: Option<Duration>,
}

/// What one answer's rate-limit headers say, for requests and for tokens.
#[derive(Debug, Default, PartialEq)]
pub(super) struct RateLimits {
    pub requests: Option<BudgetReport>,
    pub tokens: Option<BudgetReport>,
}

/// The longest a budget is believed to take to fill up again. Providers' budgets are per
/// minute; a reset announced further away is read as this, so that one absurd header cannot
/// slow a budget to a crawl for longer.
pub(super) const MAX_RESET: Duration = Duration::from_secs(60);

/// The longest wait a refusal is believed to ask for. Anything longer is read as this, which
/// is longer than a retry budget is sensibly set: such a refusal is passed on, not waited out.
pub(crate) const MAX_SERVER_WAIT: Duration = Duration::from_secs(3600);

/// The largest budget size or count believed (no provider counts beyond this).
const MAX_COUNT: f64 = 1e12;

/// Logs about an upstream's absurd header values, at most once a minute.
static ABSURD: LogGate = LogGate::per_minute();

/// Says, at most once a minute, that a header value was out of range and what was made of it.
fn absurd(header: &str, value: &str, taken_as: &str) {
    if let Some(held) = ABSURD.open() {
        tracing::warn!(
            header,
            value = value.get(..64).unwrap_or(value),
            taken_as,
            similar_since = held,
            "the upstream sent a header value out of range"
        );
    }
}

impl RateLimits {
    pub(super) fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    /// Reads OpenAI's and Azure's `x-ratelimit-*` or Anthropic's `anthropic-ratelimit-*`.
    /// Counts that are not finite non-negative numbers are ignored; resets are capped at
    /// [`MAX_RESET`].
    pub(super) fn read(headers: &HeaderMap) -> RateLimits {
        let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
        let number = |name: &str| {
            let value = text(name)?;
            let n = value.parse::<f64>().ok()?;
            if n.is_finite() && (0.0..=MAX_COUNT).contains(&n) {
                Some(n)
            } else {
                absurd(name, value, "absent");
                None
            }
        };
        let reset = |name: &str, wait: Option<Duration>| {
            let wait = wait?;
            if wait > MAX_RESET {
                absurd(name, text(name).unwrap_or_default(), "60s");
            }
            Some(wait.min(MAX_RESET))
        };
        let read = |openai: RateLimitNames, anthropic: RateLimitNames| {
            // OpenAI (limit, remaining, reset) and Azure (remaining only).
            if let Some(remaining) = number(openai.remaining) {
                return Some(BudgetReport {
                    limit: number(openai.limit),
                    remaining,
                    reset: reset(openai.reset, text(openai.reset).and_then(go_duration)),
                });
            }
            let limit = number(anthropic.limit)?;
            let remaining = number(anthropic.remaining)?;
            let until = text(anthropic.reset)
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .and_then(|at| at.duration_since(SystemTime::now()).ok());
            Some(BudgetReport {
                limit: Some(limit),
                remaining,
                reset: reset(anthropic.reset, until),
            })
        };
        RateLimits {
            requests: read(headers::OPENAI_REQUESTS, headers::ANTHROPIC_REQUESTS),
            tokens: read(headers::OPENAI_TOKENS, headers::ANTHROPIC_TOKENS),
        }
    }
}

/// A number of seconds as a duration: `None` for what is not a number or is negative, the
/// longest duration for one too large to hold (the caller caps it).
fn seconds(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
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
        let unit_seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += number * unit_seconds;
        rest = tail;
    }
    seconds(total)
}

/// The wait an answer asks for: `retry-after-ms`, else `retry-after` in seconds or as an HTTP
/// date; at most [`MAX_SERVER_WAIT`].
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let capped = |name: &str, wait: Duration| {
        if wait > MAX_SERVER_WAIT {
            absurd(name, text(name).unwrap_or_default(), "1h");
        }
        wait.min(MAX_SERVER_WAIT)
    };
    if let Some(ms) = text(RETRY_AFTER_MS).and_then(|t| t.parse::<f64>().ok()) {
        return seconds(ms / 1000.0).map(|wait| capped(RETRY_AFTER_MS, wait));
    }
    let name = http::header::RETRY_AFTER.as_str();
    let value = text(name)?;
    if let Ok(secs) = value.parse::<f64>() {
        return seconds(secs).map(|wait| capped(name, wait));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let wait = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Some(capped(name, wait))
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
    u32::try_from((body_len as u64 / 4).saturating_add(allowance)).unwrap_or(u32::MAX)
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
        // Waits no clock can hold are read as the longest believed; nonsense as none.
        for (name, value) in [
            ("retry-after", "inf"),
            ("retry-after-ms", "1e20"),
            ("retry-after", "1e400"),
            ("retry-after", "Fri, 01 Jan 9999 00:00:00 GMT"),
        ] {
            assert_eq!(
                retry_after(&headers(&[(name, value)])),
                Some(MAX_SERVER_WAIT),
                "{value}"
            );
        }
        assert_eq!(retry_after(&headers(&[("retry-after", "NaN")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after-ms", "-1")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn rate_headers_of_openai_and_anthropic() {
        let openai = RateLimits::read(&headers(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]));
        assert_eq!(
            openai.requests,
            Some(BudgetReport {
                limit: Some(60.0),
                remaining: 59.0,
                reset: Some(Duration::from_secs(1))
            })
        );
        // Budgets are per minute: a reset further away is read as a minute.
        assert_eq!(openai.tokens.map(|t| t.reset), Some(Some(MAX_RESET)));
        let reset = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(20));
        let anthropic = RateLimits::read(&headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", &reset.to_string()),
        ]));
        let BudgetReport {
            limit,
            remaining,
            reset: wait,
        } = anthropic.requests.expect("requests");
        assert_eq!((limit, remaining), (Some(50.0), 49.0));
        assert!(wait.expect("reset") > Duration::from_secs(15));
        assert!(RateLimits::read(&HeaderMap::new()).is_empty());
        // Numbers that are not counts are not believed.
        let absurd = RateLimits::read(&headers(&[
            ("x-ratelimit-limit-requests", "NaN"),
            ("x-ratelimit-remaining-requests", "inf"),
            ("x-ratelimit-limit-tokens", "1e300"),
            ("x-ratelimit-remaining-tokens", "-5"),
        ]));
        assert!(absurd.is_empty(), "{absurd:?}");
        let far = RateLimits::read(&headers(&[
            ("x-ratelimit-remaining-requests", "3"),
            ("x-ratelimit-reset-requests", "99999999999999999999h"),
        ]));
        assert_eq!(far.requests.and_then(|r| r.reset), Some(MAX_RESET));
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

    use proptest::prelude::*;

    /// A header value made of what numbers and durations are spelled with, or any bytes.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::collection::vec(
                prop::sample::select(vec![
                    "0",
                    "1",
                    "9",
                    ".",
                    "e",
                    "E",
                    "-",
                    "+",
                    "inf",
                    "NaN",
                    "h",
                    "m",
                    "s",
                    "ms",
                    "us",
                    "µs",
                    "ns",
                    "1e400",
                    "99999999999999999999",
                    " ",
                    "T",
                    ":",
                    "Z",
                    "2025-08-21T12:40:59Z",
                    "Fri, 01 Jan 9999 00:00:00 GMT",
                ]),
                0..6,
            )
            .prop_map(|parts| parts.concat()),
            "\\PC{0,24}",
        ]
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config())]

        /// Fuzz target (d): the readers of rate-limit and retry headers never panic, and what
        /// they believe is always within its caps.
        #[test]
        fn arbitrary_rate_limit_and_retry_headers_never_panic_and_stay_capped(
            values in prop::collection::vec(value(), 12),
        ) {
            let names = [
                "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
                "anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining",
                "anthropic-ratelimit-requests-reset", "retry-after", "retry-after-ms",
                "anthropic-ratelimit-tokens-reset",
            ];
            let mut h = HeaderMap::new();
            for (name, value) in names.iter().zip(&values) {
                if let Ok(value) = http::HeaderValue::from_str(value) {
                    h.insert(*name, value);
                }
            }
            let limits = RateLimits::read(&h);
            for report in [limits.requests, limits.tokens].into_iter().flatten() {
                prop_assert!(report.remaining.is_finite() && report.remaining >= 0.0);
                prop_assert!(report.limit.is_none_or(|l| l.is_finite() && l >= 0.0));
                prop_assert!(report.reset.is_none_or(|r| r <= MAX_RESET));
            }
            prop_assert!(retry_after(&h).is_none_or(|w| w <= MAX_SERVER_WAIT));
            for v in &values {
                let _ = go_duration(v);
            }
        }
    }
}
