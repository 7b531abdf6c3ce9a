//! The request headers and the query, in one form for the key.

use crate::headers::BEHAVIOUR_HEADERS;

use super::CredentialHeaders;

/// The request headers whose values change the answer, so they enter the key:
/// [`BEHAVIOUR_HEADERS`] and whatever the operator adds (`--key-header`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHeaders {
    names: Vec<String>,
}

impl Default for KeyHeaders {
    fn default() -> Self {
        KeyHeaders {
            names: BEHAVIOUR_HEADERS.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

impl KeyHeaders {
    /// The default set and `extra` header names (any case). A name that is not a valid header
    /// name, or one that never reaches the upstream (hop-by-hop, `host`, llm-dedup's own
    /// controls), or one that identifies a caller (those partition the cache instead), is an
    /// error naming it.
    pub fn with_extra<I, S>(extra: I) -> Result<KeyHeaders, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = KeyHeaders::default();
        let callers = CredentialHeaders::default();
        for name in extra {
            let name = name.as_ref().trim();
            let parsed = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            let lower = parsed.as_str();
            if crate::headers::HOP_BY_HOP.contains(&lower)
                || matches!(lower, "host" | "content-length" | "accept-encoding")
                || lower.starts_with(crate::headers::OWN_PREFIX)
            {
                return Err(format!(
                    "{name:?} cannot change an answer: it is a transport or control header"
                ));
            }
            if callers.contains(lower) {
                return Err(format!(
                    "{name:?} identifies a caller: it partitions the cache already"
                ));
            }
            if !set.names.iter().any(|n| n == lower) {
                set.names.push(lower.to_owned());
            }
        }
        Ok(set)
    }

    /// Whether `name` (lowercase) enters the key.
    #[inline]
    pub fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// The key headers among `headers` (`(lowercase name, value)`), in one form whatever the
    /// order, case or spelling the client sent: sorted by name, the values of one name in the
    /// order sent, and `anthropic-beta` read as a set (every line and comma-separated item,
    /// trimmed, sorted, each once).
    pub fn of<'a, I>(&self, headers: I) -> Vec<(&'a str, Vec<u8>)>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        let mut found: Vec<(&'a str, Vec<u8>)> = Vec::new();
        let mut betas: Vec<&[u8]> = Vec::new();
        let mut beta_name = None;
        for (name, value) in headers {
            if name == crate::headers::ANTHROPIC_BETA && self.contains(name) {
                beta_name = Some(name);
                betas.extend(value.split(|b| *b == b',').map(<[u8]>::trim_ascii));
            } else if self.contains(name) {
                found.push((name, value.to_vec()));
            }
        }
        if let Some(name) = beta_name {
            betas.retain(|b| !b.is_empty());
            betas.sort_unstable();
            betas.dedup();
            found.push((name, betas.join(&b","[..])));
        }
        // Stable: values of one name keep their order.
        found.sort_by_key(|(name, _)| *name);
        found
    }
}

/// A path and query in one form for the key: the query's parameters sorted (each as sent),
/// empty ones dropped, so that their order never splits the key.
pub fn canonical_path_and_query(path_and_query: &str) -> std::borrow::Cow<'_, str> {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.into();
    };
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort_unstable();
    if pairs.is_empty() {
        return path.into();
    }
    format!("{path}?{}", pairs.join("&")).into()
}
