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
//! | `err:{key}:partition` | an error answer for waiters of one partition, kept 10 s |
//! | `budget:{partition}:{pause,left,rpm,win}` | the partition's shared rate budget |
//! | `p:{digest}` | a prompt prefix one replica writes in the provider's cache, or `warm` |
//! | `salt` | the fleet's credential salt |
//! | channel `events` | what replicas and the inspector tell each other (`events.rs`) |
//!
//! The braces are written as they are shown: `{key}` and `{partition}` are Redis Cluster hash
//! tags (the hex inside them picks the slot), so everything of one cache key (its entry,
//! lease, stream and error answers: the lease script drops the stream as it takes the
//! lease) lives in one slot, and so do a partition's four budget keys, which one script
//! reads and writes together. No command or script of the fleet names keys of two slots.

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
        format!("{}e:{{{}}}", self.prefix, key.to_hex())
    }

    /// A pattern matching every stored answer's name (for `SCAN`).
    pub fn entries(&self) -> String {
        format!("{}e:*", self.prefix)
    }

    /// The key a stored answer's name names, if it names one.
    pub fn entry_key(&self, name: &str) -> Option<CacheKey> {
        name.strip_prefix(&self.prefix)?
            .strip_prefix("e:{")?
            .strip_suffix('}')
            .and_then(CacheKey::from_hex)
    }

    /// The lease of the flight for `key`.
    pub fn lease(&self, key: &CacheKey) -> String {
        format!("{}lease:{{{}}}", self.prefix, key.to_hex())
    }

    /// The stream relayed live for `key`.
    pub fn stream(&self, key: &CacheKey) -> String {
        format!("{}s:{{{}}}", self.prefix, key.to_hex())
    }

    /// An error answer for `key` kept for waiters of `partition`.
    pub fn refusal(&self, key: &CacheKey, partition: &Partition) -> String {
        format!(
            "{}err:{{{}}}:{}",
            self.prefix,
            key.to_hex(),
            hex(partition.as_bytes())
        )
    }

    /// The keys of `partition`'s budget, in the order the budget script takes them.
    pub fn budget(&self, partition: &Partition) -> [String; 4] {
        let base = format!("{}budget:{{{}}}:", self.prefix, hex(partition.as_bytes()));
        ["pause", "left", "rpm", "win"].map(|what| format!("{base}{what}"))
    }

    /// The prompt prefix `digest`: who writes it in the provider's cache, or that it is warm.
    pub fn prefix(&self, digest: &[u8; 32]) -> String {
        format!("{}p:{{{}}}", self.prefix, hex(digest))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot Redis Cluster puts `name` in: CRC16 (XMODEM) of its hash tag, or of the whole
    /// name without one, modulo 16384.
    fn slot(name: &str) -> u16 {
        let tagged = name
            .find('{')
            .and_then(|open| {
                let rest = &name[open + 1..];
                rest.find('}')
                    .filter(|close| *close > 0)
                    .map(|close| &rest[..close])
            })
            .unwrap_or(name);
        let mut crc: u16 = 0;
        for byte in tagged.bytes() {
            crc ^= u16::from(byte) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc % 16384
    }

    #[test]
    fn what_one_script_touches_lives_in_one_slot() {
        // The slot function itself, against Redis's documented example.
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        let layout = Layout::default();
        for b in [0u8, 1, 0x5a, 0xff] {
            let key = CacheKey::from_hex(&format!("{b:02x}").repeat(32)).expect("key");
            let partition = Partition::from_bytes([b; 32]);
            let one = slot(&layout.entry(&key));
            assert_eq!(slot(&layout.lease(&key)), one);
            assert_eq!(slot(&layout.stream(&key)), one);
            assert_eq!(slot(&layout.refusal(&key, &partition)), one);
            let budget = layout.budget(&partition).map(|name| slot(&name));
            assert!(budget.iter().all(|s| *s == budget[0]), "{budget:?}");
            assert_eq!(layout.entry_key(&layout.entry(&key)), Some(key));
        }
        // Different keys spread over the slots (the prefix is no hash tag).
        let spread: std::collections::HashSet<u16> = (0u8..=255)
            .map(|b| {
                let key = CacheKey::from_hex(&format!("{b:02x}").repeat(32)).expect("key");
                slot(&layout.entry(&key))
            })
            .collect();
        assert!(spread.len() > 200, "{}", spread.len());
        assert_eq!(layout.entry_key("llm-dedup:v2:e:nothex"), None);
    }
}
