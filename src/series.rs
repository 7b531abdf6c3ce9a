//! Requests per minute by outcome, over the last 24 hours: what the live page draws.
//!
//! This module owns one bounded ring of [`MINUTES`] one-minute buckets (a fixed 60 KiB,
//! whatever the traffic); a bucket is reused when its minute comes round again a day later.
//! Recording is one short lock and one add. It is a leaf: it imports nothing of the crate.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Minutes kept: 24 hours.
pub const MINUTES: usize = 24 * 60;

/// What became of a request, as the page counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the cache.
    Hit,
    /// Answered by an identical request's upstream call.
    Coalesced,
    /// Embeddings answered partly from the cache.
    Partial,
    /// Answered by its own upstream call.
    Miss,
    /// Passed through, not cacheable.
    Bypass,
    /// Answered with an error: the upstream's, or llm-dedup's own.
    Error,
}

/// The outcomes, in the order of [`Minute::counts`] and of the JSON.
pub const OUTCOMES: [&str; 6] = ["hit", "coalesced", "partial", "miss", "bypass", "error"];

#[derive(Debug, Clone, Copy, Default)]
struct Minute {
    /// The minute since the Unix epoch this bucket holds; buckets of older minutes are stale.
    at: u64,
    counts: [u64; OUTCOMES.len()],
}

/// The ring of the last [`MINUTES`] minutes.
#[derive(Debug)]
pub struct Series {
    ring: Mutex<Vec<Minute>>,
}

/// The last minutes, oldest first, as `/_llm-dedup/series` serves them.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SeriesSnapshot {
    /// The start of the first minute, in Unix milliseconds.
    pub start_ms: u64,
    /// Milliseconds per point.
    pub step_ms: u64,
    /// Per outcome (`OUTCOMES`), one count per minute, the current (partial) minute last.
    pub outcomes: Vec<(&'static str, Vec<u64>)>,
}

impl Default for Series {
    fn default() -> Series {
        Series {
            ring: Mutex::new(vec![Minute::default(); MINUTES]),
        }
    }
}

fn minute_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 60)
}

impl Series {
    /// Counts one request's outcome at `now`.
    pub fn record(&self, outcome: Outcome, now: SystemTime) {
        let at = minute_of(now);
        // A poisoned lock only means another thread panicked mid-add: the counts stand.
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut ring[(at % MINUTES as u64) as usize];
        if slot.at != at {
            *slot = Minute {
                at,
                counts: [0; OUTCOMES.len()],
            };
        }
        slot.counts[outcome as usize] += 1;
    }

    /// The last `minutes` minutes (at most [`MINUTES`]) as of `now`, the current one last.
    pub fn snapshot(&self, minutes: usize, now: SystemTime) -> SeriesSnapshot {
        let minutes = minutes.clamp(1, MINUTES) as u64;
        let last = minute_of(now);
        let first = last.saturating_sub(minutes - 1);
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut outcomes: Vec<(&'static str, Vec<u64>)> = OUTCOMES
            .iter()
            .map(|name| (*name, Vec::with_capacity(minutes as usize)))
            .collect();
        for at in first..=last {
            let slot = ring[(at % MINUTES as u64) as usize];
            for (i, (_, points)) in outcomes.iter_mut().enumerate() {
                points.push(if slot.at == at { slot.counts[i] } else { 0 });
            }
        }
        SeriesSnapshot {
            start_ms: first * 60_000,
            step_ms: 60_000,
            outcomes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_land_in_their_minute_and_a_day_later_the_bucket_is_reused() {
        let series = Series::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000 / 60 * 60);
        series.record(Outcome::Hit, t0);
        series.record(Outcome::Hit, t0 + Duration::from_secs(59));
        series.record(Outcome::Miss, t0 + Duration::from_secs(60));
        series.record(Outcome::Error, t0 + Duration::from_secs(120));

        let snap = series.snapshot(3, t0 + Duration::from_secs(150));
        assert_eq!(snap.start_ms, minute_of(t0) * 60_000);
        let of = |s: &SeriesSnapshot, name: &str| {
            s.outcomes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, p)| p.clone())
        };
        assert_eq!(of(&snap, "hit"), Some(vec![2, 0, 0]));
        assert_eq!(of(&snap, "miss"), Some(vec![0, 1, 0]));
        assert_eq!(of(&snap, "error"), Some(vec![0, 0, 1]));

        // A day later the same slots hold new minutes; the old counts are not shown as new.
        let day = Duration::from_secs(24 * 3600);
        series.record(Outcome::Bypass, t0 + day);
        let snap = series.snapshot(MINUTES, t0 + day + Duration::from_secs(30));
        assert_eq!(of(&snap, "hit").map(|p| p.iter().sum::<u64>()), Some(0));
        assert_eq!(of(&snap, "bypass").map(|p| p.iter().sum::<u64>()), Some(1));
        assert_eq!(of(&snap, "hit").map(|p| p.len()), Some(MINUTES));
        // Out-of-range requests are clamped.
        assert_eq!(series.snapshot(0, t0).outcomes[0].1.len(), 1);
    }
}
