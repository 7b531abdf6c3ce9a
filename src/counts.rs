//! What requests did, per route and model: the counters the database keeps and `stats` shows.
//!
//! This module owns the list of counters. Every other place that needs it (the SQL that adds
//! a batch of counts, the inspector's sums) goes through [`Counts::COLUMNS`] and
//! [`Counts::values`], so the list is spelled out once. It is a leaf: it imports nothing of
//! the crate.

use serde::{Deserialize, Serialize};

/// What requests did, per route and model: the `counters` table's columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Requests answered.
    pub requests: i64,
    /// Answered from the cache.
    pub hits: i64,
    /// Answered by an identical request's upstream call.
    pub coalesced: i64,
    /// Answered by their own upstream call.
    pub misses: i64,
    /// Embedding requests answered partly from the cache.
    pub partials: i64,
    /// Not cacheable (or `no-store`), passed through.
    pub bypasses: i64,
    /// Calls made to the upstream.
    pub upstream_calls: i64,
    /// Upstream `429` answers absorbed by retrying.
    pub upstream_429s: i64,
    /// Prompt tokens the provider did not have to process thanks to the cache.
    pub saved_prompt_tokens: i64,
    /// Completion tokens the provider did not have to generate thanks to the cache.
    pub saved_completion_tokens: i64,
    /// Embedding inputs received.
    pub inputs: i64,
    /// Embedding inputs that did not go upstream: cached, shared with an identical input in
    /// flight, or repeated within their request.
    pub inputs_saved: i64,
}

/// How many counters there are.
pub const COUNTERS: usize = 12;

impl Counts {
    /// The `counters` table's column of each counter, in the order of [`Counts::values`].
    pub const COLUMNS: [&'static str; COUNTERS] = [
        "requests",
        "hits",
        "coalesced",
        "misses",
        "partials",
        "bypasses",
        "upstream_calls",
        "upstream_429s",
        "saved_prompt_tokens",
        "saved_completion_tokens",
        "inputs",
        "inputs_saved",
    ];

    /// The counters, in the order of [`Counts::COLUMNS`].
    pub fn values(&self) -> [i64; COUNTERS] {
        [
            self.requests,
            self.hits,
            self.coalesced,
            self.misses,
            self.partials,
            self.bypasses,
            self.upstream_calls,
            self.upstream_429s,
            self.saved_prompt_tokens,
            self.saved_completion_tokens,
            self.inputs,
            self.inputs_saved,
        ]
    }

    /// The counts whose [`Counts::values`] are `v`.
    pub fn from_values(v: [i64; COUNTERS]) -> Counts {
        let [
            requests,
            hits,
            coalesced,
            misses,
            partials,
            bypasses,
            upstream_calls,
            upstream_429s,
            saved_prompt_tokens,
            saved_completion_tokens,
            inputs,
            inputs_saved,
        ] = v;
        Counts {
            requests,
            hits,
            coalesced,
            misses,
            partials,
            bypasses,
            upstream_calls,
            upstream_429s,
            saved_prompt_tokens,
            saved_completion_tokens,
            inputs,
            inputs_saved,
        }
    }

    /// Adds `other` into `self` (saturating: a counter never wraps).
    pub fn add(&mut self, other: &Counts) {
        let mut sum = self.values();
        for (ours, theirs) in sum.iter_mut().zip(other.values()) {
            *ours = ours.saturating_add(theirs);
        }
        *self = Counts::from_values(sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_name_every_field() {
        let counts = Counts::from_values(std::array::from_fn(|i| i as i64 + 1));
        assert_eq!(Counts::from_values(counts.values()), counts);
        // Serialized names and columns are the same list, in the same order.
        let json = serde_json::to_value(counts).expect("serializable");
        for (column, value) in Counts::COLUMNS.iter().zip(counts.values()) {
            assert_eq!(json[column], value, "{column}");
        }
        assert_eq!(json.as_object().map(|o| o.len()), Some(COUNTERS));
        let mut sum = counts;
        sum.add(&counts);
        assert_eq!(sum.values(), counts.values().map(|v| v * 2));
    }
}
