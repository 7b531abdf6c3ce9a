//! Phase 6, render: the answer each request gets, from a stored entry (a hit) or from the
//! outcome of the flight it waited on, marked with how it was produced.

use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::Engine;
use super::count::{Saved, answered, route_name};
use super::flight::FlightOutcome;
use crate::answer::{Answer, AnswerBody, CacheStatus};
use crate::entry::{EntryMeta, StoredAnswer, asked_key, replayed_headers};
use crate::error::Error;
use crate::headers::{CACHE_HEADER, KEY_HEADER, SAVED_HEADER};

impl Engine {
    /// Answers from a stored entry at `now`, counting the hit.
    pub(super) fn hit(&self, entry: &StoredAnswer, now: SystemTime) -> Answer {
        let route = Some(entry.route);
        let saved = self.saved_by(entry);
        self.metrics.outcome(route, CacheStatus::Hit, &saved);
        if let Some(disk) = &self.disk {
            let counts = answered(CacheStatus::Hit, &saved);
            let model = entry.model.as_deref().unwrap_or("");
            disk.record_hit(entry.key, route_name(route), model, &counts, now);
        }
        let mut headers = entry.hit_headers.clone();
        // In place: `insert` would first make room for one more header, and a clone has none.
        if let Some(age) = headers.get_mut(http::header::AGE) {
            *age = entry.age(now).as_secs().into();
        }
        set_saving(&mut headers, &saved);
        answer_with(entry, headers, CacheStatus::Hit)
    }

    /// The answer a waiter of a flight gets from its outcome, as its `role` (the leader's
    /// `Miss`, a follower's `Coalesced`), counted. A waiter of the leader's own credential
    /// partition (`own`) gets the upstream's headers as they came; any other gets only the
    /// replayed ones, as a hit would, never the leader's cookies, organization, rate limits or
    /// request id.
    pub(super) fn render(
        &self,
        outcome: FlightOutcome,
        role: CacheStatus,
        meta: &EntryMeta,
        own: bool,
    ) -> Result<Answer, Error> {
        match outcome {
            FlightOutcome::Stored {
                entry,
                fresh_headers: Some(headers),
            } => {
                // A follower saved the provider the work its leader paid for.
                let saved = if role == CacheStatus::Coalesced {
                    self.saved_by(&entry)
                } else {
                    Saved::default()
                };
                self.record(Some(meta.route), meta.model.as_deref(), role, saved);
                let mut headers = if own {
                    (*headers).clone()
                } else {
                    entry.hit_headers.clone()
                };
                if role == CacheStatus::Coalesced {
                    set_saving(&mut headers, &saved);
                } else {
                    headers.remove(SAVED_HEADER);
                }
                Ok(stored_answer(&entry, headers, role))
            }
            FlightOutcome::Stored {
                entry,
                fresh_headers: None,
            } => Ok(self.hit(&entry, SystemTime::now())),
            FlightOutcome::Refused(refusal) => {
                self.record(
                    Some(meta.route),
                    meta.model.as_deref(),
                    role,
                    Saved::default(),
                );
                Ok(refusal.answer(role))
            }
            FlightOutcome::Live(live) => {
                // What a stream shared live saves is known only at its end.
                self.record(
                    Some(meta.route),
                    meta.model.as_deref(),
                    role,
                    Saved::default(),
                );
                let mut headers = if own {
                    live.headers.clone()
                } else {
                    replayed_headers(&live.headers)
                };
                headers.insert(CACHE_HEADER, role.header_value());
                let key = asked_key(meta.key, meta.bucket);
                set_header(&mut headers, KEY_HEADER, &key.to_hex());
                Ok(Answer {
                    status: live.status,
                    headers,
                    body: AnswerBody::Stream(live.subscribe()),
                    cache: role,
                    key: Some(key),
                })
            }
            FlightOutcome::Failed(e) => Err(e),
        }
    }
}

/// Sets `llm-dedup-saved-usd` to what `saved` is worth, or removes it when that is unknown.
pub(super) fn set_saving(headers: &mut HeaderMap, saved: &Saved<'_>) {
    match saved.priced {
        Some((_, usd)) => set_header(headers, SAVED_HEADER, &usd.to_string()),
        None => {
            headers.remove(SAVED_HEADER);
        }
    }
}

/// An answer from `entry` with `headers` and the llm-dedup headers for `cache`.
fn stored_answer(entry: &StoredAnswer, mut headers: HeaderMap, cache: CacheStatus) -> Answer {
    headers.insert(CACHE_HEADER, cache.header_value());
    set_key_header(&mut headers, entry);
    answer_with(entry, headers, cache)
}

/// Sets `llm-dedup-key` to `entry`'s key, from the value made once with its hit headers.
pub(super) fn set_key_header(headers: &mut HeaderMap, entry: &StoredAnswer) {
    if let Some(key) = entry.hit_headers.get(KEY_HEADER) {
        headers.insert(KEY_HEADER, key.clone());
    }
}

/// An answer from `entry` with `headers` as they are.
fn answer_with(entry: &StoredAnswer, headers: HeaderMap, cache: CacheStatus) -> Answer {
    Answer {
        status: StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK),
        headers,
        body: AnswerBody::Full(entry.body.clone()),
        cache,
        key: Some(asked_key(entry.key, entry.bucket)),
    }
}

fn set_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}
