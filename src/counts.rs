//! What requests did, per route and model: the counters the database keeps and `stats` shows.
//!
//! This module owns the list of counters, spelled out once (in `counters!` below). Every
//! other place that needs it (the SQL that adds a batch of counts, the inspector's sums) goes
//! through [`Counts::COLUMNS`] and [`Counts::values`]. It is a leaf: it imports nothing of the
//! crate.

use serde::{Deserialize, Serialize};

/// Defines [`Counts`] from one list of its counters: the struct, [`Counts::COLUMNS`],
/// [`Counts::values`], [`Counts::from_values`] and [`Counts::add`] all come from it, so no
/// other place spells the list out.
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $field:ident,)*) => {
        /// What requests did, per route and model: the `counters` table's columns.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
        pub struct Counts {
            $($(#[doc = $doc])* pub $field: i64,)*
        }

        impl Counts {
            /// The `counters` table's column of each counter, in the order of
            /// [`Counts::values`].
            #[cfg_attr(not(feature = "sqlite"), allow(dead_code))] // The disk tier's own.
            pub(crate) const COLUMNS: [&'static str; COUNTERS] = [$(stringify!($field)),*];

            /// The counters, in the order of [`Counts::COLUMNS`].
            #[cfg_attr(not(feature = "sqlite"), allow(dead_code))] // The disk tier's own.
            pub(crate) fn values(&self) -> [i64; COUNTERS] {
                [$(self.$field),*]
            }

            /// The counts whose [`Counts::values`] are `v`.
            #[cfg_attr(not(feature = "sqlite"), allow(dead_code))] // The disk tier's own.
            pub(crate) fn from_values(v: [i64; COUNTERS]) -> Counts {
                let [$($field),*] = v;
                Counts { $($field),* }
            }

            /// The money saved, in US dollars, for display (`saved_usd` in JSON); sums are
            /// kept in integer nanodollars.
            pub fn saved_usd(&self) -> f64 {
                self.saved_nanodollars as f64 / 1e9
            }

            /// Adds `other` into `self`, field by field: this runs on every hit. Token counts
            /// are capped where they are read ([`crate::usage::Usage`]), so no realistic sum
            /// comes near `i64::MAX`; one that did would wrap, never panic.
            pub fn add(&mut self, other: &Counts) {
                $(self.$field = self.$field.wrapping_add(other.$field);)*
            }
        }

        /// Every counter under its column's name, and `saved_usd`.
        impl Serialize for Counts {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                let mut s = serializer.serialize_struct("Counts", COUNTERS + 1)?;
                $(s.serialize_field(stringify!($field), &self.$field)?;)*
                s.serialize_field("saved_usd", &self.saved_usd())?;
                s.end()
            }
        }
    };
}

counters! {
    /// Requests answered.
    requests,
    /// Answered from the cache.
    hits,
    /// Answered by an identical request's upstream call.
    coalesced,
    /// Answered by their own upstream call.
    misses,
    /// Embedding requests answered partly from the cache.
    partials,
    /// Not cacheable (or `no-store`), passed through.
    bypasses,
    /// Calls made to the upstream.
    upstream_calls,
    /// Upstream `429` answers absorbed by retrying.
    upstream_429s,
    /// Prompt tokens the provider did not have to process thanks to the cache.
    saved_prompt_tokens,
    /// Completion tokens the provider did not have to generate thanks to the cache.
    saved_completion_tokens,
    /// What the provider would have charged for the answers the cache gave, in nanodollars
    /// (10⁻⁹ USD), at the price table's prices.
    saved_nanodollars,
    /// Answers from the cache or a shared call that saved tokens of a model with no price.
    saved_unpriced,
    /// Embedding inputs received.
    inputs,
    /// Embedding inputs that did not go upstream: cached, shared with an identical input in
    /// flight, or repeated within their request.
    inputs_saved,
    /// Prompt tokens of upstream calls the provider read from its own prompt cache.
    provider_cache_read_tokens,
    /// Prompt tokens of upstream calls the provider wrote to its own prompt cache.
    provider_cache_write_tokens,
    /// What the provider's own cache saved on those calls against the plain input price, in
    /// nanodollars (writes cost more than plain input: below zero when they outweigh reads).
    provider_cache_saved_nanodollars,
    /// Upstream calls that waited while another request wrote a prefix they share.
    prefix_holds,
    /// Milliseconds they waited, in all.
    prefix_held_ms,
}

/// How many counters there are.
pub const COUNTERS: usize = 19;

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
        assert_eq!(json.as_object().map(|o| o.len()), Some(COUNTERS + 1));
        assert_eq!(json["saved_usd"], counts.saved_nanodollars as f64 / 1e9);
        let back: Counts = serde_json::from_value(json).expect("reads its own JSON");
        assert_eq!(back, counts);
        let mut sum = counts;
        sum.add(&counts);
        assert_eq!(sum.values(), counts.values().map(|v| v * 2));
    }
}
