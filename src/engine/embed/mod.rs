//! The engine's side of embeddings: per-input lookups, input-level coalescing, and inputs of
//! concurrent requests merged into shared upstream calls. What an input is and how answers are
//! read and written is [`crate::embeddings`]'s business.
//!
//! # The path of an embeddings request
//!
//! 1. Its `input` is split into inputs; each distinct input gets the key a request for it alone
//!    would get (this file).
//! 2. Inputs found in the cache (memory, then the database in one read) are done.
//! 3. Each missing input joins the flight of an identical input already on its way upstream,
//!    or leads a flight of its own and is added to the open call of its group (`batcher`):
//!    same upstream path, model and options, end user, credential and kind of input. A call
//!    goes when its window ends or it is full ([`EmbedSettings`](crate::EmbedSettings)); it
//!    runs in its own task, so callers that hang up cancel nothing (`call`).
//! 4. A merged call's answer is split per input; each is stored, then its flight completes. An
//!    error answer completes every flight of the call with that answer, and nothing is stored.
//! 5. The request is answered once every input is resolved, in its own order (`assemble`).

mod assemble;
mod batcher;
mod call;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use serde_json::{Map, Value};

pub(super) use batcher::Batcher;

use super::Engine;
use super::classify::Outbound;
use super::count::Saved;
use crate::answer::{Answer, CacheStatus, Refusal};
use crate::controls::CacheControls;
use crate::counts::Counts;
use crate::embeddings::InputKind;
use crate::entry::StoredAnswer;
use crate::error::{Error, ErrorKind};
use crate::inflight::{InFlight, Role, Waiter};
use crate::key::CacheKey;
use crate::route::{self, Route};

use batcher::{Call, Group, Item, Reuse};

/// An embeddings request whose `input` splits into inputs, keyed: the request without its
/// `input` once, then each distinct input from that key ([`CacheKey::of_input`]).
pub(super) struct Request {
    pub out: Outbound,
    /// The request's other fields (the body without `input`).
    pub template: Map<String, Value>,
    pub kind: InputKind,
    /// The key of the request without its input: what its inputs' keys derive from, and the
    /// name of the calls its inputs may share.
    pub template_key: CacheKey,
    /// Each distinct input once, with its key.
    pub distinct: Vec<(CacheKey, Value)>,
    /// For every position of the request, the index of its distinct input.
    pub slots: Vec<usize>,
    pub model: Option<String>,
    pub ttl: Duration,
}

/// What one input's flight resolves to; every waiter gets a clone.
#[derive(Clone)]
pub(super) enum InputOutcome {
    /// Embedded and stored.
    Embedded(Arc<StoredAnswer>),
    /// The upstream refused the call the input was in: its answer, passed on as it came.
    Refused(Arc<Refusal>),
    /// No answer at all.
    Failed(Error),
}

/// Where the embedding of one distinct input of a request comes from.
enum Source {
    Cache(Arc<StoredAnswer>),
    /// An upstream call; `led` when this request added the input to it.
    Flight {
        waiter: Waiter<InputOutcome>,
        led: bool,
    },
}

/// Where an input's embedding came from, as far as one request is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Cache,
    /// An identical input of another request, on its way upstream.
    Shared,
    /// This request's own input, sent upstream.
    Upstream,
}

/// Who a request says its end user is (`user`): the key leaves it out, since it never changes
/// an embedding, but a call carries one, and the provider's abuse monitoring reads it. So
/// only requests of one end user share a call.
fn end_user(template: &Map<String, Value>) -> [u8; 32] {
    let user = template
        .get("user")
        .map(Value::to_string)
        .unwrap_or_default();
    *blake3::hash(user.as_bytes()).as_bytes()
}

impl Engine {
    /// Keys an embeddings request whose parsed `body` splits into `inputs` of `kind`: the
    /// request without its input is canonicalized and hashed once, and each distinct input's
    /// key derives from that key and the input, so the cost grows with the request's size,
    /// never with its size times its inputs.
    pub(super) fn key_embeddings(
        &self,
        out: Outbound,
        body: Value,
        kind: InputKind,
        inputs: Vec<Value>,
        controls: &CacheControls,
    ) -> Request {
        let model = route::model_of(&out.path_and_query, &body);
        let mut body = body;
        if let Some(fields) = body.as_object_mut() {
            fields.remove("input");
        }
        let (template_key, _) = self.key(
            Route::Embeddings,
            &out,
            &body,
            &controls.namespace,
            out.body.len(),
        );
        let template = match body {
            Value::Object(fields) => fields,
            _ => Map::new(),
        };
        let mut distinct: Vec<(CacheKey, Value)> = Vec::new();
        let mut seen: HashMap<CacheKey, usize> = HashMap::new();
        let mut slots = Vec::with_capacity(inputs.len());
        for input in inputs {
            let key = CacheKey::of_input(&template_key, &input);
            let next = distinct.len();
            let d = *seen.entry(key).or_insert(next);
            if d == next {
                distinct.push((key, input));
            }
            slots.push(d);
        }
        Request {
            out,
            template,
            kind,
            template_key,
            distinct,
            slots,
            model,
            ttl: controls.ttl.unwrap_or(self.ttl),
        }
    }

    /// Answers an embeddings request input by input: from the cache where it can, from
    /// merged upstream calls for the rest.
    pub(super) async fn embeddings(
        self: &Arc<Self>,
        request: Request,
        controls: &CacheControls,
    ) -> Result<Answer, Error> {
        let Request {
            out,
            template,
            kind,
            template_key,
            mut distinct,
            slots,
            model,
            ttl,
        } = request;
        let namespace = controls.namespace.as_str();
        // A refresh, or a caller a shared cache may not answer yet: calls of its own.
        let own_calls = controls.no_cache || !self.may_share(&out.partition);
        let found = if own_calls {
            vec![None; distinct.len()]
        } else {
            let keys = distinct.iter().map(|(key, _)| *key);
            self.lookup_many(keys, controls.max_age).await
        };
        if let ([Some(entry)], [_]) = (found.as_slice(), slots.as_slice()) {
            // One input, cached: its entry is the whole answer.
            self.metrics.embedding_inputs(1, 0, 0);
            self.count_inputs(model.as_deref(), 1, 1, Counts::default());
            return Ok(self.hit(entry, SystemTime::now()));
        }
        let uncached = found.iter().filter(|f| f.is_none()).count();
        if controls.only_if_cached && uncached > 0 {
            return Err(Error::new(
                ErrorKind::NotCached,
                format!(
                    "{uncached} of the {} distinct inputs are not cached (only-if-cached)",
                    distinct.len()
                ),
            ));
        }

        // The rest: join an identical input on its way upstream, or add it to a call.
        let mut sources = Vec::with_capacity(distinct.len());
        let mut mine = Vec::new();
        let origin = self.batcher.next_id();
        for ((key, input), entry) in distinct.iter_mut().zip(found) {
            if let Some(entry) = entry {
                sources.push(Source::Cache(entry));
                continue;
            }
            let role = if own_calls {
                // Its own flight, outside the shared table.
                Role::Leader(InFlight::detached(*key))
            } else if self.shared_cache {
                // Inputs of one partition share flights: an error answer to one caller's call
                // must not reach another's request.
                self.inputs.join(&key.for_partition(&out.partition))
            } else {
                self.inputs.join(key)
            };
            let flight = match role {
                Role::Follower(waiter) => {
                    sources.push(Source::Flight { waiter, led: false });
                    continue;
                }
                Role::Leader(flight) => flight,
            };
            // From here on the flight is owned by the call it joins, never by this request:
            // nothing awaits until every input is queued, so a client that hangs up cannot
            // abandon inputs other requests wait on.
            sources.push(Source::Flight {
                waiter: flight.waiter(),
                led: true,
            });
            mine.push(Item {
                key: *key,
                input: std::mem::take(input),
                origin,
                ttl,
                reuse: Reuse::for_request(controls),
                flight,
            });
        }
        let partition = out.partition;
        if !mine.is_empty() {
            let group = Group {
                request: template_key,
                end_user: end_user(&template),
                partition,
                kind,
            };
            let call = Arc::new(Call {
                out: Outbound {
                    body: bytes::Bytes::new(),
                    estimate: 0,
                    ..out
                },
                fields: template,
                namespace: namespace.to_owned(),
                model: model.clone(),
            });
            self.enqueue(group, &call, mine);
        }

        let resolved = join_all(sources.into_iter().map(|source| async move {
            match source {
                Source::Cache(entry) => Ok((Via::Cache, InputOutcome::Embedded(entry))),
                Source::Flight { waiter, led } => {
                    let origin = if led { Via::Upstream } else { Via::Shared };
                    waiter.wait().await.map(|outcome| (origin, outcome))
                }
            }
        }))
        .await;
        let led_any = resolved.iter().any(|r| matches!(r, Ok((Via::Upstream, _))));
        let role = if led_any {
            CacheStatus::Miss
        } else {
            CacheStatus::Coalesced
        };
        let mut entries = Vec::with_capacity(resolved.len());
        for r in resolved {
            match r {
                Ok((origin, InputOutcome::Embedded(entry))) => entries.push((origin, entry)),
                Ok((_, InputOutcome::Refused(refusal))) => {
                    self.record(
                        Some(Route::Embeddings),
                        model.as_deref(),
                        role,
                        Saved::default(),
                    );
                    return Ok(refusal.answer(role));
                }
                Ok((_, InputOutcome::Failed(e))) => return Err(e),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Abandoned,
                        "the upstream call for an input of this request was abandoned",
                    ));
                }
            }
        }
        self.assemble(&entries, &slots, model.as_deref())
    }
}
