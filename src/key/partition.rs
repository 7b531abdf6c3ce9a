//! Who asked: the credential partition of a request, from its credential headers.

use std::fmt;

use super::put;
use crate::headers::{CONTEXT_HEADERS, CREDENTIAL_HEADERS, FALLBACK_CREDENTIAL_HEADERS};

/// The credential partition of a request: a keyed blake3 hash of its credential headers under
/// the database's salt. Rate budgets are kept per partition, and so is the cache unless it is
/// shared. It cannot be turned back into the credential, nor tested against a guessed one
/// without the salt.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition([u8; 32]);

impl Partition {
    /// The partition of the credential headers `(lowercase name, value)` under `salt`, with
    /// the default credential headers ([`CREDENTIAL_HEADERS`]); see [`CredentialHeaders`].
    pub fn new<'a, I>(salt: &[u8; 32], headers: I) -> Partition
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        CredentialHeaders::default().partition(salt, headers)
    }

    /// A partition from its raw bytes (as [`Partition::as_bytes`] gave them).
    pub fn from_bytes(bytes: [u8; 32]) -> Partition {
        Partition(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// This partition as seen through one caller's own HTTP client (`client` its identity):
    /// the credential such a client adds as a default header never reaches the engine, so
    /// its callers are kept apart from every other client's, each with the partition its own
    /// headers (a cookie, say) give.
    pub(crate) fn of_client(&self, client: &[u8; 16]) -> Partition {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(b"llm-dedup caller client");
        hasher.update(client);
        Partition(*hasher.finalize().as_bytes())
    }
}

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell partitions apart in a log or a test failure.
        let hex = blake3::Hash::from_bytes(self.0).to_hex();
        write!(f, "Partition({}…)", &hex[..12])
    }
}

/// The request headers that identify a caller: [`CREDENTIAL_HEADERS`] (secrets), then, for a
/// request that presents none of those, [`FALLBACK_CREDENTIAL_HEADERS`] (`Cookie`); whatever
/// the operator adds (`--credential-header`) for a gateway that authenticates otherwise; and,
/// beside any of these, [`CONTEXT_HEADERS`] (organization, project), which tell apart callers
/// of one credential but never stand in for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialHeaders {
    /// Secrets: headers that always count.
    always: Vec<String>,
    /// Headers that always count too, but are no secret: their presence does not make the
    /// fallbacks count less.
    context: Vec<String>,
    /// Headers that count when none of `always` is present.
    fallback: Vec<String>,
}

impl Default for CredentialHeaders {
    fn default() -> Self {
        let owned = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect();
        CredentialHeaders {
            always: owned(CREDENTIAL_HEADERS),
            context: owned(CONTEXT_HEADERS),
            fallback: owned(FALLBACK_CREDENTIAL_HEADERS),
        }
    }
}

impl CredentialHeaders {
    /// The default set and `extra` header names (any case), which always count (naming a
    /// fallback header such as `cookie` makes it count always). A name that is not a valid
    /// header name, or one that never reaches the upstream (hop-by-hop, `host`, llm-dedup's
    /// own controls), is an error naming it.
    pub fn with_extra<I, S>(extra: I) -> Result<CredentialHeaders, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = CredentialHeaders::default();
        for name in extra {
            let name = name.as_ref().trim();
            let parsed = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            let lower = parsed.as_str();
            let never_forwarded = crate::headers::HOP_BY_HOP.contains(&lower)
                && lower != crate::headers::PROXY_AUTHORIZATION;
            if never_forwarded
                || matches!(lower, "host" | "content-length" | "content-type")
                || lower.starts_with(crate::headers::OWN_PREFIX)
            {
                return Err(format!(
                    "{name:?} cannot identify a caller: it is a transport or control header"
                ));
            }
            set.fallback.retain(|n| n != lower);
            set.context.retain(|n| n != lower);
            if !set.always.iter().any(|n| n == lower) {
                set.always.push(lower.to_owned());
            }
        }
        Ok(set)
    }

    /// Whether `name` (lowercase) may identify a caller.
    #[inline]
    pub fn contains(&self, name: &str) -> bool {
        self.names().any(|n| n == name)
    }

    /// The names, lowercase: the secrets, the context headers, then the fallbacks.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.always
            .iter()
            .chain(&self.context)
            .chain(&self.fallback)
            .map(String::as_str)
    }

    /// The partition of a request's headers `(lowercase name, value)` under `salt`: a keyed
    /// hash of its credential headers (the fallbacks only when no secret is present) and its
    /// context headers. The order of `headers` does not matter; a request with none has the
    /// partition of "no credential".
    pub(crate) fn partition<'a, I>(&self, salt: &[u8; 32], headers: I) -> Partition
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        let mut found: Vec<(&str, &[u8])> = Vec::new();
        let mut fallback: Vec<(&str, &[u8])> = Vec::new();
        let mut context: Vec<(&str, &[u8])> = Vec::new();
        for (name, value) in headers {
            if self.always.iter().any(|n| n == name) {
                found.push((name, value));
            } else if self.context.iter().any(|n| n == name) {
                context.push((name, value));
            } else if self.fallback.iter().any(|n| n == name) {
                fallback.push((name, value));
            }
        }
        if found.is_empty() {
            found = fallback;
        }
        found.append(&mut context);
        found.sort_unstable();
        let mut preimage = Vec::with_capacity(128);
        for (name, value) in found {
            put(&mut preimage, name.as_bytes());
            put(&mut preimage, value);
        }
        Partition(*blake3::keyed_hash(salt, &preimage).as_bytes())
    }
}

/// What the key says about who asked: the credential partition, or nothing when the cache is
/// shared.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CredentialFingerprint(Option<Partition>);

impl CredentialFingerprint {
    /// The fingerprint used with a shared cache: every caller gets the same one.
    pub const SHARED: CredentialFingerprint = CredentialFingerprint(None);

    /// The fingerprint of a partition.
    pub fn of(partition: Partition) -> CredentialFingerprint {
        CredentialFingerprint(Some(partition))
    }

    /// The partition, unless the cache is shared.
    pub(super) fn partition(&self) -> Option<&Partition> {
        self.0.as_ref()
    }

    /// Fingerprints the credential headers `(lowercase name, value)` under `salt` (see
    /// [`Partition::new`]).
    pub fn new<'a, I>(salt: &[u8; 32], headers: I) -> CredentialFingerprint
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        CredentialFingerprint::of(Partition::new(salt, headers))
    }
}
