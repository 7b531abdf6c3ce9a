//! The engine's side of embeddings: per-input lookups, input-level coalescing, and inputs of
//! concurrent requests merged into shared upstream calls. What an input is and how answers are
//! read and written is [`crate::embeddings`]'s business.
//!
//! # The path of an embeddings request
//!
//! 1. Its `input` is split into inputs; each distinct input gets the key a request for it alone
//!    would get.
//! 2. Inputs found in the cache (memory, then the database in one read) are done.
//! 3. Each missing input joins the flight of an identical input already on its way upstream,
//!    or leads a flight of its own and is added to the open call of its group: same upstream
//!    path, model and options, credential and kind of input. A call goes when its window ends
//!    or it is full ([`EmbedSettings`]); it runs in its own task, so callers that hang up
//!    cancel nothing.
//! 4. A merged call's answer is split per input; each is stored, then its flight completes. An
//!    error answer completes every flight of the call with that answer, and nothing is stored.
//! 5. The request is answered once every input is resolved, in its own order.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::future::join_all;
use serde_json::Map;

use super::*;
use crate::embeddings::{EmbeddingList, InputKind};
use crate::inflight::Waiter;

/// An embeddings request whose `input` splits into inputs.
pub(super) struct Request {
    pub out: Outbound,
    /// The parsed body (an object).
    pub body: Value,
    pub kind: InputKind,
    /// The inputs, in order, as [`embeddings::split`] gave them.
    pub inputs: Vec<Value>,
    pub ttl: Duration,
}

/// What one input's flight resolves to; every waiter gets a clone.
#[derive(Clone)]
pub(super) enum InputOutcome {
    /// Embedded and stored.
    Embedded(Arc<StoredAnswer>),
    /// The upstream refused the call the input was in: its answer, passed on as it came.
    Refused(Arc<(StatusCode, HeaderMap, Bytes)>),
    /// No answer at all.
    Failed(Error),
}

type InputFlight = Flight<CacheKey, InputOutcome>;

/// Where the embedding of one distinct input of a request comes from.
enum Source {
    Cache(Arc<StoredAnswer>),
    /// An upstream call; `led` when this request added the input to it.
    Flight {
        waiter: Waiter<InputOutcome>,
        led: bool,
    },
}

/// What the inputs of one merged call share: the request they are sent as, less `input`.
struct Call {
    out: Outbound,
    fields: Map<String, Value>,
    namespace: String,
    model: Option<String>,
}

/// One input waiting in a call.
struct Item {
    key: CacheKey,
    input: Value,
    /// The request that added it, told apart from the others in its call.
    origin: u64,
    ttl: Duration,
    /// Whether an answer stored meanwhile may serve it: not for a refresh (`no-cache`), and
    /// only one young enough for its request's `max-age`.
    reuse: Option<Option<Duration>>,
    flight: InputFlight,
}

/// A call being filled.
struct OpenCall {
    id: u64,
    call: Arc<Call>,
    items: Vec<Item>,
    /// Upper bound of the tokens of `items`.
    tokens: u64,
}

/// Inputs that may share a call: same request apart from `input` (the key of the request
/// without it), same end user, same credential, same kind of input.
type Group = (CacheKey, [u8; 32], [u8; 32], InputKind);

/// Who a request says its end user is (`user`): the key leaves it out, since it never changes
/// an embedding, but a call carries one, and the provider's abuse monitoring reads it. So
/// only requests of one end user share a call.
fn end_user(template: &Value) -> [u8; 32] {
    let user = template
        .get("user")
        .map(Value::to_string)
        .unwrap_or_default();
    *blake3::hash(user.as_bytes()).as_bytes()
}

/// The open calls, one per group at most.
pub(super) struct Batcher {
    settings: EmbedSettings,
    open: Mutex<HashMap<Group, OpenCall>>,
    /// Numbers calls and the requests whose inputs go in them.
    ids: AtomicU64,
}

impl Batcher {
    pub(super) fn new(settings: EmbedSettings) -> Batcher {
        Batcher {
            settings: EmbedSettings {
                max_inputs: settings.max_inputs.max(1),
                ..settings
            },
            open: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(0),
        }
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    fn open_call(&self, call: &Arc<Call>) -> OpenCall {
        OpenCall {
            id: self.next_id(),
            call: call.clone(),
            items: Vec::new(),
            tokens: 0,
        }
    }

    /// Whether `input` may join `open` within the limits (a call always takes one input).
    fn fits(&self, open: &OpenCall, input: &Value) -> bool {
        open.items.is_empty()
            || (open.items.len() < self.settings.max_inputs
                && open.tokens + embeddings::token_bound(input) <= self.settings.max_tokens)
    }

    /// Adds a request's inputs to the open call of `group`. Returns the calls ready to go
    /// (full ones; every one when merging is off) and the ids of calls opened meanwhile, each
    /// of which goes when its window ends.
    fn add(&self, group: Group, call: &Arc<Call>, items: Vec<Item>) -> (Vec<OpenCall>, Vec<u64>) {
        let (mut ready, mut opened) = (Vec::new(), Vec::new());
        if self.settings.batch_window.is_zero() {
            let mut open = self.open_call(call);
            for item in items {
                if !self.fits(&open, &item.input) {
                    ready.push(std::mem::replace(&mut open, self.open_call(call)));
                }
                open.push(item);
            }
            ready.push(open);
            return (ready, opened);
        }
        let mut table = self.open.lock().unwrap_or_else(|e| e.into_inner());
        for item in items {
            let open = table.entry(group).or_insert_with(|| {
                let open = self.open_call(call);
                opened.push(open.id);
                open
            });
            if !self.fits(open, &item.input) {
                let fresh = self.open_call(call);
                opened.push(fresh.id);
                ready.push(std::mem::replace(open, fresh));
            }
            open.push(item);
            if open.items.len() >= self.settings.max_inputs {
                ready.extend(table.remove(&group));
            }
        }
        (ready, opened)
    }

    /// Takes call `id` of `group` out of the table, unless it has gone already (full).
    fn take(&self, group: &Group, id: u64) -> Option<OpenCall> {
        let mut table = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if table.get(group).is_some_and(|open| open.id == id) {
            table.remove(group)
        } else {
            None
        }
    }
}

impl OpenCall {
    fn push(&mut self, item: Item) {
        self.tokens += embeddings::token_bound(&item.input);
        self.items.push(item);
    }
}

/// `items` in groups by the request they came from, in the order of their first items.
fn by_origin(items: Vec<Item>) -> Vec<Vec<Item>> {
    let mut parts: Vec<Vec<Item>> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    for item in items {
        let at = *index.entry(item.origin).or_insert(parts.len());
        match parts.get_mut(at) {
            Some(part) => part.push(item),
            None => parts.push(vec![item]),
        }
    }
    parts
}

/// Sets (or, with `None`, removes) the `input` of a request body; returns the previous one.
fn set_input(body: &mut Value, input: Option<Value>) -> Option<Value> {
    let fields = body.as_object_mut()?;
    match input {
        Some(input) => fields.insert("input".to_owned(), input),
        None => fields.remove("input"),
    }
}

impl Dedup {
    /// Answers an embeddings request input by input: from the cache where it can, from
    /// merged upstream calls for the rest.
    pub(super) async fn embeddings(
        &self,
        request: Request,
        controls: &CacheControls,
    ) -> Result<Answer, Error> {
        let inner = &self.inner;
        let Request {
            out,
            body: mut template,
            kind,
            inputs,
            ttl,
        } = request;
        let model = route::model_of(&out.path_and_query, &template);
        let namespace = controls.namespace.as_str();
        set_input(&mut template, None);
        let group_key = self.key(Route::Embeddings, &out, &template, namespace, 256);

        let (mut distinct, slots) = self.distinct_inputs(&out, &mut template, namespace, inputs);
        let found = if controls.no_cache {
            vec![None; distinct.len()]
        } else {
            let keys = distinct.iter().map(|(key, _)| *key);
            inner.lookup_many(keys, controls.max_age).await
        };
        if let ([Some(entry)], [_]) = (found.as_slice(), slots.as_slice()) {
            // One input, cached: its entry is the whole answer.
            inner.metrics.embedding_inputs(1, 0, 0);
            inner.count_inputs(model.as_deref(), 1, 1, Counts::default());
            return Ok(inner.hit(entry, SystemTime::now()));
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
        let origin = inner.batcher.next_id();
        for ((key, input), entry) in distinct.iter_mut().zip(found) {
            if let Some(entry) = entry {
                sources.push(Source::Cache(entry));
                continue;
            }
            let role = if controls.no_cache {
                // A refresh: its own flight, outside the shared table.
                Role::Leader(InFlight::detached(*key))
            } else {
                inner.inputs.join(key)
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
                reuse: (!controls.no_cache).then_some(controls.max_age),
                flight,
            });
        }
        let partition = out.partition;
        if !mine.is_empty() {
            let user = end_user(&template);
            let fields = match template {
                Value::Object(fields) => fields,
                _ => Map::new(),
            };
            let call = Arc::new(Call {
                out: Outbound {
                    body: Bytes::new(),
                    estimate: 0,
                    ..out
                },
                fields,
                namespace: namespace.to_owned(),
                model: model.clone(),
            });
            inner.enqueue((group_key, user, partition, kind), &call, mine);
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
                Ok((_, InputOutcome::Refused(answer))) => {
                    inner.record(
                        Some(Route::Embeddings),
                        model.as_deref(),
                        role,
                        Usage::default(),
                    );
                    let (status, mut headers, body) = answer.as_ref().clone();
                    headers.insert(CACHE_HEADER, HeaderValue::from_static(role.as_str()));
                    return Ok(Answer {
                        status,
                        headers,
                        body: AnswerBody::Full(body),
                        cache: role,
                        key: None,
                    });
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
        inner.assemble(&entries, &slots, model.as_deref())
    }
}

impl Dedup {
    /// Each distinct input of a request once, with the key a request for it alone would have
    /// (`template` is the request without `input`), and for every position of the request the
    /// index of its distinct input.
    fn distinct_inputs(
        &self,
        out: &Outbound,
        template: &mut Value,
        namespace: &str,
        inputs: Vec<Value>,
    ) -> (Vec<(CacheKey, Value)>, Vec<usize>) {
        let mut distinct: Vec<(CacheKey, Value)> = Vec::new();
        let mut seen: HashMap<CacheKey, usize> = HashMap::new();
        let mut slots = Vec::with_capacity(inputs.len());
        for input in inputs {
            let size = usize::try_from(embeddings::token_bound(&input)).unwrap_or(0) + 256;
            set_input(template, Some(input));
            let key = self.key(Route::Embeddings, out, template, namespace, size);
            let input = set_input(template, None).unwrap_or_default();
            let next = distinct.len();
            let d = *seen.entry(key).or_insert(next);
            if d == next {
                distinct.push((key, input));
            }
            slots.push(d);
        }
        (distinct, slots)
    }
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

impl Inner {
    /// The cached entries for `keys`: memory first, then one database read for the rest.
    async fn lookup_many(
        &self,
        keys: impl Iterator<Item = CacheKey>,
        max_age: Option<Duration>,
    ) -> Vec<Option<Arc<StoredAnswer>>> {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for key in keys {
            let entry = self.lookup_memory(&key, max_age).await;
            if entry.is_none() {
                missing.push((found.len(), key));
            }
            found.push(entry);
        }
        if !missing.is_empty() {
            let keys = missing.iter().map(|(_, key)| *key).collect();
            let read = self.lookup_disk_many(keys, max_age).await;
            for ((at, _), entry) in missing.into_iter().zip(read) {
                found[at] = entry;
            }
        }
        found
    }

    /// Adds inputs to their group's open call; sends the calls that are ready and arranges
    /// for new ones to go when their window ends.
    fn enqueue(self: &Arc<Self>, group: Group, call: &Arc<Call>, items: Vec<Item>) {
        let (ready, opened) = self.batcher.add(group, call, items);
        for open in ready {
            let inner = self.clone();
            self.tasks.spawn(async move { inner.send_call(open).await });
        }
        let window = self.batcher.settings.batch_window;
        for id in opened {
            let inner = self.clone();
            self.tasks.spawn(async move {
                tokio::time::sleep(window).await;
                if let Some(open) = inner.batcher.take(&group, id) {
                    inner.send_call(open).await;
                }
            });
        }
    }

    /// Sends one merged call and completes the flight of each of its inputs.
    async fn send_call(&self, open: OpenCall) {
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
                Some(max_age) => self.lookup_memory(&item.key, max_age).await,
                None => None,
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
            Err(InputOutcome::Refused(answer))
                if may_split
                    && answer.0 == StatusCode::BAD_REQUEST
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
        };
        let refused =
            |status, headers, body| InputOutcome::Refused(Arc::new((status, headers, body)));
        let response = match self.send_governed(out, &meta).await {
            Ok(Upstreamed::Success(response)) => response,
            Ok(Upstreamed::Refused {
                status,
                headers,
                body,
            }) => {
                return Err(refused(status, headers, body));
            }
            Err(e) => return Err(InputOutcome::Failed(e)),
        };
        let status = response.status();
        let headers = upstream::response_headers(response.headers());
        let body = response
            .bytes()
            .await
            .map_err(|e| InputOutcome::Failed(self.upstream.error(e)))?;
        if !status.is_success() {
            return Err(refused(status, headers, body));
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

    /// Answers a request from the entries of its distinct inputs (`slots` maps each position
    /// to one), counting what the cache saved.
    fn assemble(
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
        let saved = Usage {
            prompt_tokens: Some(saved_tokens),
            completion_tokens: None,
            total_tokens: Some(saved_tokens),
        };
        // Metrics and counters, the request's and its inputs' in one update of the tally.
        self.metrics.outcome(Some(Route::Embeddings), cache, saved);
        self.metrics.embedding_inputs(cached, shared, sent);
        let request = answered(cache, saved);
        self.count_inputs(model, positions, positions - sent, request);

        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(CACHE_HEADER, HeaderValue::from_static(cache.as_str()));
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
    fn count_inputs(&self, model: Option<&str>, inputs: u64, saved: u64, counts: Counts) {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let counts = Counts {
            inputs: n(inputs),
            inputs_saved: n(saved),
            ..counts
        };
        self.persist_counts(Route::Embeddings.as_str(), model, &counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(table: &InFlight<CacheKey, InputOutcome>, n: u8, input: Value) -> Item {
        let key = CacheKey::from_hex(&format!("{n:02x}").repeat(32)).expect("hex");
        let Role::Leader(flight) = table.join(&key) else {
            panic!("fresh key");
        };
        Item {
            key,
            input,
            origin: u64::from(n % 3),
            ttl: Duration::from_secs(60),
            reuse: Some(None),
            flight,
        }
    }

    fn call() -> Arc<Call> {
        Arc::new(Call {
            out: Outbound {
                method: Method::POST,
                path_and_query: "/v1/embeddings".into(),
                headers: HeaderMap::new(),
                body: Bytes::new(),
                partition: [0; 32],
                estimate: 0,
            },
            fields: Map::new(),
            namespace: String::new(),
            model: None,
        })
    }

    fn group() -> Group {
        (
            CacheKey::from_hex(&"00".repeat(32)).expect("hex"),
            [0; 32],
            [0; 32],
            InputKind::Text,
        )
    }

    #[test]
    fn calls_fill_up_to_the_input_and_token_limits() {
        let table = InFlight::default();
        let batcher = Batcher::new(EmbedSettings {
            batch_window: Duration::from_millis(5),
            max_inputs: 3,
            max_tokens: 10,
        });
        let call = call();
        let items = (0..7).map(|n| item(&table, n, Value::from("ab"))).collect();
        let (ready, opened) = batcher.add(group(), &call, items);
        // 7 inputs, 3 a call: two full calls go at once, the third waits for its window.
        assert_eq!(
            ready.iter().map(|c| c.items.len()).collect::<Vec<_>>(),
            [3, 3]
        );
        assert_eq!(opened.len(), 3);
        let last = batcher.take(&group(), opened[2]).expect("open");
        assert_eq!(last.items.len(), 1);
        assert!(batcher.take(&group(), opened[0]).is_none(), "sent already");

        // Tokens: 4 + 4 fit in 10, a third does not; one input beyond the bound goes alone.
        let items = vec![
            item(&table, 10, Value::from("abcd")),
            item(&table, 11, Value::from("efgh")),
            item(&table, 12, Value::from("ijkl")),
            item(&table, 13, Value::from("x".repeat(50))),
        ];
        let (ready, opened) = batcher.add(group(), &call, items);
        assert_eq!(
            ready.iter().map(|c| c.items.len()).collect::<Vec<_>>(),
            [2, 1]
        );
        let last = batcher.take(&group(), *opened.last().expect("opened"));
        assert_eq!(last.map(|c| c.items.len()), Some(1));
    }

    #[test]
    fn without_a_window_each_request_goes_alone() {
        let table = InFlight::default();
        let batcher = Batcher::new(EmbedSettings {
            batch_window: Duration::ZERO,
            max_inputs: 2,
            max_tokens: 1000,
        });
        let items = (0..5).map(|n| item(&table, n, Value::from("a"))).collect();
        let (ready, opened) = batcher.add(group(), &call(), items);
        assert_eq!(
            ready.iter().map(|c| c.items.len()).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        assert!(opened.is_empty());
        assert!(batcher.open.lock().expect("lock").is_empty());
    }

    #[test]
    fn a_split_call_keeps_each_requests_inputs_together_and_in_order() {
        let table = InFlight::default();
        // Origins 0, 1, 2, 0, 1, 2, 0 (the helper's `n % 3`).
        let items = (0..7).map(|n| item(&table, n, Value::from(n))).collect();
        let parts: Vec<Vec<u64>> = by_origin(items)
            .iter()
            .map(|part| part.iter().filter_map(|i| i.input.as_u64()).collect())
            .collect();
        assert_eq!(parts, [vec![0, 3, 6], vec![1, 4], vec![2, 5]]);
    }
}
