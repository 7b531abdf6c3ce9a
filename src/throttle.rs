//! Saying a repeated thing at most once a minute.
//!
//! A fault that can repeat on every request (a database that cannot be written, an upstream
//! sending absurd headers, a Redis that is down) must be logged, but not a thousand times a
//! second. [`LogGate`] lets one line through per period and counts the ones it held back, so
//! the next line can say how many there were. It is a leaf: it imports nothing of the crate.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lets one log line through per period.
///
/// # Thread safety
///
/// Shared freely (it is a few atomics); of many threads asking at once, one is let through.
#[derive(Debug)]
pub struct LogGate {
    period_ms: i64,
    /// When a line was last let through (Unix ms; `i64::MIN`: never).
    last: AtomicI64,
    /// Lines held back since.
    held: AtomicU64,
}

impl LogGate {
    /// A gate letting one line through a minute.
    pub const fn per_minute() -> LogGate {
        LogGate::every_ms(60_000)
    }

    /// A gate letting one line through every `period_ms` milliseconds.
    pub const fn every_ms(period_ms: i64) -> LogGate {
        LogGate {
            period_ms,
            last: AtomicI64::new(i64::MIN),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be logged now, `n` being how many were held back since the
    /// last one; `None` if this one is held back.
    pub fn open(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let last = self.last.load(Ordering::Relaxed);
        let due = last == i64::MIN || now.saturating_sub(last) >= self.period_ms;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_period_and_a_count_of_the_rest() {
        let gate = LogGate::per_minute();
        assert_eq!(gate.open(), Some(0));
        for _ in 0..5 {
            assert_eq!(gate.open(), None);
        }
        let quick = LogGate::every_ms(0);
        assert_eq!(quick.open(), Some(0));
        assert_eq!(quick.open(), Some(0));
        // What was held back is reported with the next line.
        gate.last.store(i64::MIN, Ordering::Relaxed);
        assert_eq!(gate.open(), Some(5));
    }
}
