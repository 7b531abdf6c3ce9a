//! Answering an embeddings request from the entries of its inputs, in its own order, and
//! counting what the cache saved.

use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, HeaderValue, StatusCode};

use super::Via;
use crate::answer::{Answer, AnswerBody, CacheStatus};
use crate::counts::Counts;
use crate::embeddings::{self, EmbeddingList};
use crate::engine::Engine;
use crate::engine::count::{Saved, answered};
use crate::engine::render::{set_key_header, set_saving};
use crate::entry::StoredAnswer;
use crate::error::{Error, ErrorKind};
use crate::headers::CACHE_HEADER;
use crate::route::Route;
use crate::usage::Usage;

impl Engine {
    /// Answers a request from the entries of its distinct inputs (`slots` maps each position
    /// to one), counting what the cache saved.
    pub(super) fn assemble(
        &self,
        entries: &[(Via, Arc<StoredAnswer>)],
        slots: &[usize],
        model: Option<&str>,
    ) -> Result<Answer, Error> {
        let mut lists = Vec::with_capacity(entries.len());
        for (_, entry) in entries {
            let list = EmbeddingList::read(&entry.body, 1).map_err(|why| {
                Error::new(
                    ErrorKind::Cache,
                    format!("the stored embedding {} cannot be read: {why}", entry.key),
                )
            })?;
            lists.push(list);
        }
        // Every position counts its input's tokens, as the provider would charge them.
        let tokens = |d: usize| entries[d].1.usage.prompt_tokens.unwrap_or(0);
        let parts: Vec<_> = slots
            .iter()
            .map(|&d| (lists[d].embeddings[0], tokens(d)))
            .collect();
        let upstream_model = lists.iter().find_map(|l| l.model.as_deref());
        let body = embeddings::write_answer(&parts, upstream_model.or(model).unwrap_or_default());

        // Sources by position: the first position of an input this request sent went
        // upstream; every other position was saved.
        let (mut cached, mut shared, mut sent) = (0u64, 0u64, 0u64);
        let mut saved_tokens = 0u64;
        let mut first_seen = vec![false; entries.len()];
        for &d in slots {
            match entries[d].0 {
                Via::Cache => cached += 1,
                Via::Upstream if !first_seen[d] => sent += 1,
                _ => shared += 1,
            }
            if entries[d].0 != Via::Upstream || first_seen[d] {
                saved_tokens += tokens(d);
            }
            first_seen[d] = true;
        }
        let positions = slots.len() as u64;
        let cache = if cached == positions {
            CacheStatus::Hit
        } else if cached > 0 {
            CacheStatus::Partial
        } else if sent > 0 {
            CacheStatus::Miss
        } else {
            CacheStatus::Coalesced
        };
        let usage = Usage {
            prompt_tokens: Some(saved_tokens),
            total_tokens: Some(saved_tokens),
            ..Usage::default()
        };
        let saved = Saved {
            usage,
            priced: self.price(upstream_model.or(model), &usage),
        };
        // Metrics and counters, the request's and its inputs' in one update of the tally.
        self.metrics.outcome(Some(Route::Embeddings), cache, &saved);
        self.metrics.embedding_inputs(cached, shared, sent);
        let request = answered(cache, &saved);
        self.count_inputs(model, positions, positions - sent, request);

        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(CACHE_HEADER, cache.header_value());
        // What the inputs that did not go upstream would have cost: on a hit, a coalesced or
        // a partial answer, as on the other routes.
        if cache != CacheStatus::Miss {
            set_saving(&mut headers, &saved);
        }
        let key = match entries {
            [(_, only)] => {
                set_key_header(&mut headers, only);
                Some(only.key)
            }
            _ => None,
        };
        if cache == CacheStatus::Hit {
            let now = SystemTime::now();
            let oldest = entries.iter().map(|(_, e)| e.age(now)).max();
            headers.insert(
                http::header::AGE,
                oldest.unwrap_or_default().as_secs().into(),
            );
        }
        Ok(Answer {
            status: StatusCode::OK,
            headers,
            body: AnswerBody::Full(body),
            cache,
            key,
        })
    }

    /// Adds the inputs of one embeddings request to `counts` and adds those to the database's
    /// counters.
    pub(super) fn count_inputs(
        &self,
        model: Option<&str>,
        inputs: u64,
        saved: u64,
        counts: Counts,
    ) {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let counts = Counts {
            inputs: n(inputs),
            inputs_saved: n(saved),
            ..counts
        };
        self.persist_counts(Route::Embeddings.as_str(), model, &counts);
    }
}
