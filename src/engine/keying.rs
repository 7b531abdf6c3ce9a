//! Phase 3, keying: the name of a request's stored answer, and the partition whose budget it
//! draws on.
//!
//! The engine remembers the key of each exact request it has parsed ([`KnownKeys`]): a
//! byte-identical repeat, the common case (SDK retries, re-run jobs), skips JSON parsing and
//! canonicalization. That memo caches a pure function, so it never needs invalidating: a
//! request it does not recognise just takes the full path.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use serde_json::Value;

use super::classify::{Bypassed, Outbound, Parsed};
use super::{Engine, embed};
use crate::controls::CacheControls;
use crate::entry::EntryMeta;
use crate::error::{Error, ErrorKind};
use crate::governor;
use crate::headers::PROXY_AUTHORIZATION;
use crate::key::{
    self, CacheKey, CanonicalBody, CredentialFingerprint, KeyParts, Partition, Traits,
};
use crate::memory::ExactRequest;
use crate::route::{self, Route};
use crate::upstream::CallerClient;

/// What the engine knows about a cacheable request once it is keyed.
pub(super) struct Keyed {
    pub key: CacheKey,
    /// The model the request names.
    pub model: Option<String>,
    /// Tokens the provider will charge up front, roughly.
    pub estimate: u32,
    /// The credential partition (the exact bytes cover the credential headers).
    pub partition: Partition,
    /// Its answer follows state the provider can change ([`Traits::mutable`]): cached only
    /// when the caller asks for a lifetime.
    pub mutable: bool,
    /// It asks for a sample ([`key::is_sampled`]): `--bucket` applies to it.
    pub sampled: bool,
}

impl Keyed {
    /// What will be stored with the answer to this request on `route`.
    pub(super) fn meta(&self, route: Route, controls: &CacheControls, ttl: Duration) -> EntryMeta {
        EntryMeta {
            key: self.key,
            namespace: controls.namespace.clone(),
            route,
            model: self.model.clone(),
            ttl: controls.ttl.unwrap_or(ttl),
            bucket: None,
        }
    }
}

/// What one remembered request holds besides its model name: the digest, the `Keyed` in its
/// `Arc`, and moka's bookkeeping (measured with `tests/memory.rs`, rounded up).
const KNOWN_KEY_BYTES: u32 = 480;

/// The keys of requests seen before, by a digest of their exact bytes.
///
/// # Memory
///
/// Bounded in bytes (each entry weighs [`KNOWN_KEY_BYTES`] plus its model name), at a
/// sixteenth of the memory tier's bound: a memo of a pure function can always be smaller.
pub(super) struct KnownKeys(moka::sync::Cache<[u8; 32], Arc<Keyed>>);

impl KnownKeys {
    /// A memo of at most `max_bytes`.
    pub(super) fn new(max_bytes: u64) -> KnownKeys {
        KnownKeys(
            moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, keyed: &Arc<Keyed>| {
                    let model = keyed.model.as_ref().map_or(0, String::len);
                    KNOWN_KEY_BYTES.saturating_add(u32::try_from(model).unwrap_or(u32::MAX))
                })
                .build(),
        )
    }

    /// What was remembered of `exact`, if it was keyed before.
    pub(super) fn get(&self, exact: &ExactRequest) -> Option<Arc<Keyed>> {
        self.0.get(exact.digest())
    }

    fn remember(&self, digest: [u8; 32], keyed: Arc<Keyed>) {
        self.0.insert(digest, keyed);
    }
}

/// What a cacheable request seen for the first time turned out to be, once parsed and keyed.
pub(super) enum Prepared {
    /// An ordinary request, keyed (the key is remembered for its exact bytes).
    Keyed(Outbound, Arc<Keyed>),
    /// An embeddings request, keyed input by input.
    Embeddings(embed::Request),
    /// A request that goes around the cache anyway (a stateful Responses request).
    Bypass(Bypassed),
}

/// Bodies at least this large are parsed and keyed (and their prefixes taken) on a blocking
/// thread: a few megabytes of
/// JSON take milliseconds, which must not hold up the async threads that answer hits.
pub(super) const KEY_OFF_THREAD: usize = 64 * 1024;

impl Engine {
    /// Everything that goes into a request's cache key, as received (headers in the order
    /// sent, body unparsed), each part prefixed by its length. Equal bytes mean equal keys;
    /// the converse does not hold, and need not: a request not recognised takes the full path.
    #[inline]
    pub(super) fn exact_request(&self, out: &Outbound, namespace: &str) -> ExactRequest {
        let mut preimage = Vec::with_capacity(out.body.len() + 256);
        let mut part = |bytes: &[u8]| {
            preimage.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            preimage.extend_from_slice(bytes);
        };
        part(b"llm-dedup exact request");
        part(namespace.as_bytes());
        part(out.method.as_str().as_bytes());
        part(out.path_and_query.as_bytes());
        for (name, value) in &out.headers {
            let name = name.as_str();
            if self.credentials.contains(name) || self.key_headers.contains(name) {
                part(name.as_bytes());
                part(value.as_bytes());
            }
        }
        if let Some(value) = &out.proxy_credential {
            part(PROXY_AUTHORIZATION.as_bytes());
            part(value.as_bytes());
        }
        if let Some(caller) = &out.via {
            part(b"llm-dedup caller client");
            part(&caller.id);
        }
        part(&out.body);
        ExactRequest::new(preimage)
    }

    /// The credential partition of a request with these forwarded `headers` and this
    /// `Proxy-Authorization`: its credential headers, salted and hashed. Rate budgets are kept
    /// per partition (providers count limits per key, organization and project), and so is
    /// the cache unless it is shared.
    pub(super) fn partition(
        &self,
        headers: &HeaderMap,
        proxy_credential: Option<&HeaderValue>,
        via: Option<&CallerClient>,
    ) -> Partition {
        let forwarded = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()));
        let to_proxy = proxy_credential.map(|v| (PROXY_AUTHORIZATION, v.as_bytes()));
        let partition = self
            .credentials
            .partition(&self.salt, forwarded.chain(to_proxy));
        match via {
            Some(caller) => partition.of_client(&caller.id),
            None => partition,
        }
    }

    /// Parses and keys a cacheable request seen for the first time (by its exact bytes, whose
    /// digest is `exact`): on a blocking thread when its body is large. One pass over the body
    /// whatever its shape: an embeddings request's other fields are canonicalized once, not
    /// once per input.
    pub(super) async fn prepare(
        self: &Arc<Self>,
        route: Route,
        out: Outbound,
        controls: &CacheControls,
        exact: &ExactRequest,
    ) -> Result<Prepared, Error> {
        let digest = *exact.digest();
        if out.body.len() < KEY_OFF_THREAD {
            return self.prepare_here(route, out, controls, digest);
        }
        // As many at once as there are cores: more would only queue for them, each holding
        // its parsed body meanwhile.
        let permit =
            self.keying.clone().acquire_owned().await.map_err(|e| {
                Error::with_source(ErrorKind::Cache, "keying the request failed", e)
            })?;
        let (engine, controls) = (self.clone(), controls.clone());
        tokio::task::spawn_blocking(move || {
            let prepared = engine.prepare_here(route, out, &controls, digest);
            drop(permit);
            prepared
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Cache, "keying the request failed", e))?
    }

    fn prepare_here(
        &self,
        route: Route,
        mut out: Outbound,
        controls: &CacheControls,
        digest: [u8; 32],
    ) -> Result<Prepared, Error> {
        out.partition = self.partition(
            &out.headers,
            out.proxy_credential.as_ref(),
            out.via.as_ref(),
        );
        Ok(match self.parse(route, &out)? {
            Parsed::Plain(body) => {
                let keyed = self.remember_key(route, &out, &body, &controls.namespace, digest);
                Prepared::Keyed(out, keyed)
            }
            Parsed::Embeddings { body, kind, inputs } => {
                Prepared::Embeddings(self.key_embeddings(out, body, kind, inputs, controls))
            }
            Parsed::Bypass { reason, model } => {
                Prepared::Bypass(out.bypassed(Some(route), model, reason))
            }
        })
    }

    /// Keys a request whose parsed `body` is new, and remembers the key for its exact bytes
    /// (whose digest is `exact`).
    fn remember_key(
        &self,
        route: Route,
        out: &Outbound,
        body: &Value,
        namespace: &str,
        exact: [u8; 32],
    ) -> Arc<Keyed> {
        let (key, traits) = self.key(route, out, body, namespace, out.body.len());
        let keyed = Arc::new(Keyed {
            key,
            model: route::model_of(&out.path_and_query, body),
            estimate: governor::estimate_tokens(out.body.len(), body),
            partition: out.partition,
            mutable: traits.mutable,
            sampled: key::is_sampled(route, body),
        });
        self.known_keys.remember(exact, keyed.clone());
        keyed
    }

    /// The cache key of a request with this route, body and namespace, and what keying it
    /// learned of it; `size_hint` is about the size of `body` as JSON. `out.partition` must be
    /// known.
    pub(super) fn key(
        &self,
        route: Route,
        out: &Outbound,
        body: &Value,
        namespace: &str,
        size_hint: usize,
    ) -> (CacheKey, Traits) {
        let behaviour = self.key_headers.of(out
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes())));
        let behaviour: Vec<(&str, &[u8])> =
            behaviour.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let (canonical, traits) =
            CanonicalBody::with_traits(route, body, &self.key_policy, size_hint);
        // Shared only what any credential would be answered the same: not an answer the
        // provider keeps for the caller's organization, nor one made from its private objects.
        let own = traits.private || key::bound_to_partition(route, body);
        let credential = if self.shared_cache && !own {
            CredentialFingerprint::SHARED
        } else {
            CredentialFingerprint::of(out.partition)
        };
        let path_and_query = key::canonical_path_and_query(&out.path_and_query);
        let key = KeyParts {
            namespace,
            upstream: &self.upstream_identity,
            method: out.method.as_str(),
            path_and_query: &path_and_query,
            credential,
            behaviour: &behaviour,
            body: &canonical,
            exact_body: traits.inexact.then_some(&out.body[..]),
        }
        .key();
        (key, traits)
    }
}
