//! Where the fleet keeps things in Redis: every key name and the events channel, in one place.
//!
//! Everything lives under `llm-dedup:v{KEY_VERSION}:` (old keys simply stop matching when the
//! key version changes):
//!
//! | name | holds |
//! |---|---|
//! | `e:{key}` | a stored answer, expiring with it (`codec.rs`) |
//! | `lease:{key}` | the replica calling the upstream for `key`, renewed while it does |
//! | `s:{key}` | a streamed answer relayed live (a Redis Stream), kept a minute after its end |
//! | `err:{key}:{partition}` | an error answer for waiters of one partition, kept 10 s |
//! | `budget:{partition}:{pause,left,rpm,win}` | the partition's shared rate budget |
//! | `salt` | the fleet's credential salt |
//! | channel `events` | what replicas and the inspector tell each other (`events.rs`) |

use crate::key::{CacheKey, KEY_VERSION, Partition};

/// The names of one fleet's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            prefix: format!("llm-dedup:v{KEY_VERSION}:"),
        }
    }
}

impl Layout {
    /// The stored answer under `key`.
    pub fn entry(&self, key: &CacheKey) -> String {
        format!("{}e:{}", self.prefix, key.to_hex())
    }

    /// A pattern matching every stored answer's name (for `SCAN`).
    pub fn entries(&self) -> String {
        format!("{}e:*", self.prefix)
    }

    /// The key a stored answer's name names, if it names one.
    pub fn entry_key(&self, name: &str) -> Option<CacheKey> {
        name.strip_prefix(&self.prefix)?
            .strip_prefix("e:")
            .and_then(CacheKey::from_hex)
    }

    /// The lease of the flight for `key`.
    pub fn lease(&self, key: &CacheKey) -> String {
        format!("{}lease:{}", self.prefix, key.to_hex())
    }

    /// The stream relayed live for `key`.
    pub fn stream(&self, key: &CacheKey) -> String {
        format!("{}s:{}", self.prefix, key.to_hex())
    }

    /// An error answer for `key` kept for waiters of `partition`.
    pub fn refusal(&self, key: &CacheKey, partition: &Partition) -> String {
        format!(
            "{}err:{}:{}",
            self.prefix,
            key.to_hex(),
            hex(partition.as_bytes())
        )
    }

    /// The keys of `partition`'s budget, in the order the budget script takes them.
    pub fn budget(&self, partition: &Partition) -> [String; 4] {
        let base = format!("{}budget:{}:", self.prefix, hex(partition.as_bytes()));
        ["pause", "left", "rpm", "win"].map(|what| format!("{base}{what}"))
    }

    /// The fleet's credential salt.
    pub fn salt(&self) -> String {
        format!("{}salt", self.prefix)
    }

    /// The channel replicas and the inspector publish events on.
    pub fn channel(&self) -> String {
        format!("{}events", self.prefix)
    }
}

/// 64 lowercase hex characters.
fn hex(bytes: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*bytes).to_hex().to_string()
}
