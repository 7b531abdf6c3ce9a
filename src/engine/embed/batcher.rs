//! Merging: the open call of each group of inputs, filled up to the provider's limits and sent
//! when its window ends or it is full.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};

use super::InputOutcome;
use crate::controls::CacheControls;
use crate::embeddings::{self, EmbedSettings, InputKind};
use crate::engine::classify::Outbound;
use crate::inflight::Flight;
use crate::key::{CacheKey, Partition};

type InputFlight = Flight<CacheKey, InputOutcome>;

/// What the inputs of one merged call share: the request they are sent as, less `input`.
pub(super) struct Call {
    pub out: Outbound,
    pub fields: Map<String, Value>,
    pub namespace: String,
    pub model: Option<String>,
}

/// One input waiting in a call.
pub(super) struct Item {
    pub key: CacheKey,
    pub input: Value,
    /// The request that added it, told apart from the others in its call.
    pub origin: u64,
    pub ttl: Duration,
    /// Whether an answer stored meanwhile may serve it.
    pub reuse: Reuse,
    pub flight: InputFlight,
}

/// A call being filled.
pub(super) struct OpenCall {
    id: u64,
    pub call: Arc<Call>,
    pub items: Vec<Item>,
    /// Upper bound of the tokens of `items`.
    tokens: u64,
}

/// Whether an answer stored while an input waited for its call may serve it instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reuse {
    /// No: the request asked for a fresh answer (`no-cache`).
    Never,
    /// Yes, whatever its age.
    Any,
    /// Yes, if it is no older than the request's `max-age`.
    YoungerThan(Duration),
}

impl Reuse {
    /// What a request's controls allow.
    pub(super) fn for_request(controls: &CacheControls) -> Reuse {
        match (controls.no_cache, controls.max_age) {
            (true, _) => Reuse::Never,
            (false, None) => Reuse::Any,
            (false, Some(max)) => Reuse::YoungerThan(max),
        }
    }
}

/// Inputs that may share a call: same request apart from `input`, same end user, same
/// credential, same kind of input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Group {
    /// The key of the request without its `input`: same route, model, options, namespace.
    pub request: CacheKey,
    /// Who the request says its end user is (see `end_user`).
    pub end_user: [u8; 32],
    /// The credential.
    pub partition: Partition,
    /// Texts and token arrays never share a call.
    pub kind: InputKind,
}

pub(in crate::engine) struct Batcher {
    settings: EmbedSettings,
    open: Mutex<HashMap<Group, OpenCall>>,
    /// Numbers calls and the requests whose inputs go in them.
    ids: AtomicU64,
}

impl Batcher {
    pub(in crate::engine) fn new(settings: EmbedSettings) -> Batcher {
        Batcher {
            settings: EmbedSettings {
                max_inputs: settings.max_inputs.max(1),
                ..settings
            },
            open: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(0),
        }
    }

    /// Most inputs one request may carry: what the provider takes in one request
    /// ([`MAX_INPUTS`](crate::embeddings::MAX_INPUTS)), or more if calls were allowed more.
    pub(in crate::engine) fn most_inputs(&self) -> usize {
        self.settings.max_inputs.max(crate::embeddings::MAX_INPUTS)
    }

    /// How long a call waits for more inputs.
    pub(super) fn window(&self) -> Duration {
        self.settings.batch_window
    }

    /// A fresh number for a call or a request.
    pub(super) fn next_id(&self) -> u64 {
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
    pub(super) fn add(
        &self,
        group: Group,
        call: &Arc<Call>,
        items: Vec<Item>,
    ) -> (Vec<OpenCall>, Vec<u64>) {
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
    pub(super) fn take(&self, group: &Group, id: u64) -> Option<OpenCall> {
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
pub(super) fn by_origin(items: Vec<Item>) -> Vec<Vec<Item>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::{InFlight, Role};
    use bytes::Bytes;
    use http::{HeaderMap, Method};

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
            reuse: Reuse::Any,
            flight,
        }
    }

    fn call() -> Arc<Call> {
        Arc::new(Call {
            out: Outbound {
                method: Method::POST,
                path_and_query: "/v1/embeddings".into(),
                headers: HeaderMap::new(),
                proxy_credential: None,
                body: Bytes::new(),
                partition: Partition::from_bytes([0; 32]),
                estimate: 0,
                via: None,
            },
            fields: Map::new(),
            namespace: String::new(),
            model: None,
        })
    }

    fn group() -> Group {
        Group {
            request: CacheKey::from_hex(&"00".repeat(32)).expect("hex"),
            end_user: [0; 32],
            partition: Partition::from_bytes([0; 32]),
            kind: InputKind::Text,
        }
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
