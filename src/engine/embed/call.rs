//! Sending merged calls: each call goes upstream through the governor, its answer is split
//! per input and stored, and each input's flight completes. A call refused for an input it
//! carries (`400`) goes again as one call per request, so that only the request with that
//! input gets the refusal.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::join_all;
use http::StatusCode;
use serde_json::Value;

use super::InputOutcome;
use super::batcher::{Call, Group, Item, OpenCall, Reuse, by_origin};
use crate::answer::Refusal;
use crate::embeddings::{self, EmbeddingList};
use crate::engine::Engine;
use crate::engine::classify::Outbound;
use crate::engine::govern::Upstreamed;
use crate::engine::leader::Read;
use crate::entry::{EntryMeta, StoredAnswer};
use crate::error::{Error, ErrorKind};
use crate::route::Route;
use crate::upstream;

/// The most bytes one embedding takes in an answer: 3,072 floats written out in full, with
/// room to spare.
const MAX_EMBEDDING_BYTES: usize = 128 * 1024;

impl Engine {
    /// Adds inputs to their group's open call; sends the calls that are ready and arranges
    /// for new ones to go when their window ends.
    pub(super) fn enqueue(self: &Arc<Self>, group: Group, call: &Arc<Call>, items: Vec<Item>) {
        let (ready, opened) = self.batcher.add(group, call, items);
        for open in ready {
            let engine = self.clone();
            self.tasks
                .spawn(async move { engine.send_call(open).await });
        }
        let window = self.batcher.window();
        for id in opened {
            let engine = self.clone();
            self.tasks.spawn(async move {
                tokio::time::sleep(window).await;
                if let Some(open) = engine.batcher.take(&group, id) {
                    engine.send_call(open).await;
                }
            });
        }
    }

    /// Sends one merged call and completes the flight of each of its inputs. If that fails
    /// inside llm-dedup (a panic), or the engine is shut down past its deadline, the inputs'
    /// flights are dropped with it: their requests get an error at once, and nothing is stored
    /// or sent again.
    async fn send_call(&self, open: OpenCall) {
        let sent = AssertUnwindSafe(self.send_merged(open)).catch_unwind();
        tokio::select! {
            result = sent => if result.is_err() {
                tracing::error!(
                    "a merged embeddings call failed inside llm-dedup; its requests get an error"
                );
            },
            // Shut down past its deadline: dropped like a call that panicked.
            () = self.stopping.cancelled() => {}
        }
    }

    async fn send_merged(&self, open: OpenCall) {
        let OpenCall { call, items, .. } = open;
        let items = self.answer_stored(items).await;
        if let Some(items) = self.send_items(&call, items, true).await {
            // The provider refused an input of one of the merged requests, and so the call:
            // each request's inputs go again on their own, so that only its own request gets
            // the refusal, as if nothing had been merged.
            let parts = by_origin(items);
            tracing::info!(
                requests = parts.len(),
                "a merged embeddings call was refused for an input; \
                 sending each request's inputs on their own"
            );
            join_all(
                parts
                    .into_iter()
                    .map(|part| self.send_items(&call, part, false)),
            )
            .await;
        }
    }

    /// Completes the items whose answer an identical input's call has stored since their
    /// request looked; returns the others.
    async fn answer_stored(&self, items: Vec<Item>) -> Vec<Item> {
        let mut unanswered = Vec::with_capacity(items.len());
        for item in items {
            let stored = match item.reuse {
                Reuse::Never => None,
                Reuse::Any => self.lookup_memory(&item.key, None).await,
                Reuse::YoungerThan(max) => self.lookup_memory(&item.key, Some(max)).await,
            };
            match stored {
                Some(entry) => item.flight.complete(InputOutcome::Embedded(entry)),
                None => unanswered.push(item),
            }
        }
        unanswered
    }

    /// Sends `items` in one call and completes their flights, except when `may_split` and the
    /// provider refused the call for an input (400) with inputs of several requests in it:
    /// then it completes none and gives the items back.
    async fn send_items(
        &self,
        call: &Call,
        mut items: Vec<Item>,
        may_split: bool,
    ) -> Option<Vec<Item>> {
        if items.is_empty() {
            return None;
        }
        let weights: Vec<u64> = items
            .iter()
            .map(|item| embeddings::token_estimate(&item.input))
            .collect();
        let mut fields = call.fields.clone();
        let inputs = items.iter_mut().map(|i| std::mem::take(&mut i.input));
        fields.insert("input".to_owned(), Value::Array(inputs.collect()));
        let body = match serde_json::to_vec(&fields) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                let e = Error::with_source(ErrorKind::Cache, "could not write the request", e);
                for item in items {
                    item.flight.complete(InputOutcome::Failed(e.clone()));
                }
                return None;
            }
        };
        let out = Outbound {
            body,
            estimate: u32::try_from(weights.iter().sum::<u64>()).unwrap_or(u32::MAX),
            ..call.out.clone()
        };
        match self.fetch_call(&out, call, &items, &weights).await {
            Ok(entries) => {
                for (item, entry) in items.into_iter().zip(entries) {
                    item.flight.complete(InputOutcome::Embedded(entry));
                }
            }
            Err(InputOutcome::Refused(refusal))
                if may_split
                    && refusal.status == StatusCode::BAD_REQUEST
                    && items.iter().any(|i| i.origin != items[0].origin) =>
            {
                if let Some(Value::Array(inputs)) = fields.remove("input") {
                    for (item, input) in items.iter_mut().zip(inputs) {
                        item.input = input;
                    }
                }
                return Some(items);
            }
            Err(failure) => {
                for item in items {
                    item.flight.complete(failure.clone());
                }
            }
        }
        None
    }

    /// Sends a merged call through the governor and stores each input's embedding.
    async fn fetch_call(
        &self,
        out: &Outbound,
        call: &Call,
        items: &[Item],
        weights: &[u64],
    ) -> Result<Vec<Arc<StoredAnswer>>, InputOutcome> {
        let Some(first) = items.first() else {
            return Ok(Vec::new());
        };
        let meta = EntryMeta {
            key: first.key,
            namespace: call.namespace.clone(),
            route: Route::Embeddings,
            model: call.model.clone(),
            ttl: first.ttl,
            bucket: None,
        };
        let response = match self.send_governed(out, &meta).await {
            Ok(Upstreamed::Success(response)) => response,
            Ok(Upstreamed::Refused(refusal)) => {
                return Err(InputOutcome::Refused(Arc::new(refusal)));
            }
            Err(e) => return Err(InputOutcome::Failed(e)),
        };
        let status = response.status();
        let headers = upstream::response_headers(response.headers());
        // One embedding is at most a few tens of kilobytes (3,072 floats written out): a call's
        // answer is read within a bound in proportion to its inputs.
        let bound = items.len().saturating_mul(MAX_EMBEDDING_BYTES) + self.max_stream_bytes;
        let body = match self.read_within(response, bound).await {
            Ok(Read::Whole(body)) => body,
            Ok(Read::Larger(..)) => {
                return Err(InputOutcome::Failed(Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!(
                        "upstream {} answered {} embedding inputs with more than {bound} bytes",
                        self.upstream.base(),
                        items.len()
                    ),
                )));
            }
            Err(e) => return Err(InputOutcome::Failed(e)),
        };
        if !status.is_success() {
            return Err(InputOutcome::Refused(Arc::new(Refusal {
                status,
                headers,
                body,
            })));
        }
        let list = EmbeddingList::read(&body, items.len()).map_err(|why| {
            InputOutcome::Failed(Error::new(
                ErrorKind::UpstreamInvalid,
                format!(
                    "upstream {} answered embeddings unexpectedly: {why}",
                    self.upstream.base()
                ),
            ))
        })?;
        // What the provider charged, shared among the inputs; an answer without `usage`
        // (some compatible servers send none) counts nothing rather than a guess.
        let total = list.prompt_tokens;
        self.governor.settle(&out.partition, out.estimate, total);
        let model = list
            .model
            .as_deref()
            .or(call.model.as_deref())
            .unwrap_or_default();
        let tokens = embeddings::apportion(total.unwrap_or(0), weights);
        let mut entries = Vec::with_capacity(items.len());
        for ((item, embedding), tokens) in items.iter().zip(&list.embeddings).zip(tokens) {
            let meta = EntryMeta {
                key: item.key,
                ttl: item.ttl,
                ..meta.clone()
            };
            let body = embeddings::write_answer(&[(embedding, tokens)], model);
            let entry = Arc::new(StoredAnswer::from_upstream(&meta, status, &headers, body));
            self.store(entry.clone()).await;
            entries.push(entry);
        }
        Ok(entries)
    }
}
