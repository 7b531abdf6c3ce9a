//! Counting: what each request and each upstream call adds to the metrics and to the
//! database's counters. Counting never slows a request: metrics are atomic adds, counters are
//! tallied in memory and committed with the writer's next batch.

use http::StatusCode;

use super::Engine;
use crate::answer::CacheStatus;
use crate::counts::Counts;
use crate::entry::StoredAnswer;
pub(super) use crate::prices::Saved;
use crate::prices::Usd;
use crate::route::Route;
use crate::usage::Usage;

impl Engine {
    /// What answering from `entry` instead of the provider saved.
    pub(super) fn saved_by<'a>(&'a self, entry: &'a StoredAnswer) -> Saved<'a> {
        Saved {
            usage: entry.usage,
            priced: self.price(entry.priced_model(), &entry.usage),
        }
    }

    /// What `usage` of `model` costs, and the name it is priced as.
    pub(super) fn price(&self, model: Option<&str>, usage: &Usage) -> Option<(&str, Usd)> {
        self.prices.cost(model?, usage)
    }

    /// Counts one answered request, in the metrics and in the database's counters.
    pub(super) fn record(
        &self,
        route: Option<Route>,
        model: Option<&str>,
        cache: CacheStatus,
        saved: Saved<'_>,
    ) {
        self.metrics.outcome(route, cache, &saved);
        self.persist_counts(route_name(route), model, &answered(cache, &saved));
    }

    /// Counts one upstream call and its status (`None`: no answer).
    pub(super) fn upstream_called(
        &self,
        route: Option<Route>,
        model: Option<&str>,
        status: Option<StatusCode>,
    ) {
        let route = route_name(route);
        self.metrics.upstream_call(route, status);
        let counts = Counts {
            upstream_calls: 1,
            ..Counts::default()
        };
        self.persist_counts(route, model, &counts);
    }

    /// Counts what the provider's own prompt cache did for the answer to an upstream call on
    /// `route` for `model`: tokens read from it and written to it, and what that saved against
    /// the plain input price (beside what llm-dedup's own cache saved, never mixed with it).
    pub(super) fn provider_cache(&self, route: Route, model: Option<&str>, usage: &Usage) {
        let (read, written) = (
            usage.cached_tokens.unwrap_or(0),
            usage.cache_write_tokens.unwrap_or(0),
        );
        if read == 0 && written == 0 {
            return;
        }
        let plain = Usage {
            cached_tokens: None,
            cache_write_tokens: None,
            ..*usage
        };
        let saved = model.and_then(|model| {
            let (name, paid) = self.prices.cost(model, usage)?;
            let (_, full) = self.prices.cost(model, &plain)?;
            let saved = i128::from(full.nanos()) - i128::from(paid.nanos());
            Some((name, i64::try_from(saved).unwrap_or(0)))
        });
        self.metrics.provider_cache(read, written, saved);
        let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let counts = Counts {
            provider_cache_read_tokens: tokens(read),
            provider_cache_write_tokens: tokens(written),
            provider_cache_saved_nanodollars: saved.map_or(0, |(_, nanos)| nanos),
            ..Counts::default()
        };
        self.persist_counts(route.as_str(), model, &counts);
    }

    /// Counts an upstream call held `held` while another request wrote a prefix it shares.
    pub(super) fn prefix_held(&self, route: Route, model: Option<&str>, held: std::time::Duration) {
        self.metrics.prefix_held(held);
        let counts = Counts {
            prefix_holds: 1,
            prefix_held_ms: i64::try_from(held.as_millis()).unwrap_or(i64::MAX),
            ..Counts::default()
        };
        self.persist_counts(route.as_str(), model, &counts);
    }

    /// Counts a refusal that will be waited out and retried.
    pub(super) fn refusal_absorbed(
        &self,
        route: Option<Route>,
        model: Option<&str>,
        was_429: bool,
    ) {
        self.metrics.retried(was_429);
        let counts = Counts {
            upstream_429s: i64::from(was_429),
            ..Counts::default()
        };
        self.persist_counts(route_name(route), model, &counts);
    }

    /// Adds `counts` to the database's counters for `route` and `model`, if there is a
    /// database.
    pub(super) fn persist_counts(&self, route: &str, model: Option<&str>, counts: &Counts) {
        if let Some(disk) = &self.disk {
            disk.record_counts(route, model.unwrap_or(""), counts);
        }
    }
}

/// The counters of one answered request.
pub(super) fn answered(cache: CacheStatus, saved: &Saved<'_>) -> Counts {
    let one = |status: CacheStatus| i64::from(cache == status);
    let tokens = |n: Option<u64>| n.and_then(|n| i64::try_from(n).ok()).unwrap_or(0);
    let saved_tokens = saved.usage.prompt_tokens.is_some_and(|n| n > 0)
        || saved.usage.completion_tokens.is_some_and(|n| n > 0);
    Counts {
        requests: 1,
        hits: one(CacheStatus::Hit),
        coalesced: one(CacheStatus::Coalesced),
        partials: one(CacheStatus::Partial),
        misses: one(CacheStatus::Miss),
        bypasses: one(CacheStatus::Bypass),
        saved_prompt_tokens: tokens(saved.usage.prompt_tokens),
        saved_completion_tokens: tokens(saved.usage.completion_tokens),
        saved_nanodollars: saved
            .priced
            .map_or(0, |(_, usd)| i64::try_from(usd.nanos()).unwrap_or(i64::MAX)),
        saved_unpriced: i64::from(saved_tokens && saved.priced.is_none()),
        ..Counts::default()
    }
}

/// The name counters and metrics use for a route; `other` for requests on no cacheable route.
pub(super) fn route_name(route: Option<Route>) -> &'static str {
    route.map_or("other", Route::as_str)
}
