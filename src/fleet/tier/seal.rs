//! The fleet secret and what it authenticates (`--fleet-secret`).
//!
//! Redis is a boundary: whoever can write to it must not be able to plant answers, obey-able
//! messages or a peer address. With a secret, every record a replica writes is sealed with a
//! keyed blake3 hash over what it is, where it lives and what it holds ([`Seal::seal`]), and a
//! record read back is used only if its seal holds ([`Seal::open`]); what fails is ignored
//! and counted (`llm_dedup_redis_rejected_total{kind}`). The partition salt is derived from
//! the secret too, so Redis never holds it. Without a secret, a replica trusts Redis entirely
//! (and says so once at start-up), and the peer read-back is off.
//!
//! The keys are derived from the secret with blake3's `derive_key`, one per use, so a seal
//! can never be taken for a peer token, nor either for the salt.

use std::time::{Duration, SystemTime};

use crate::entry::unix_ms;
use crate::key::{CacheKey, Partition};

/// Bytes of a seal (a blake3 hash, compared in constant time).
pub const SEAL_LEN: usize = 32;

/// What a sealed value starts with (never the start of an unsealed one: `codec.rs` writes
/// `LDE`/`LDR` tags, a lease is a replica's id).
pub const SEALED_TAG: &[u8] = b"LDS1\0";

/// Bytes a seal adds to a value: the tag, the deadline and the seal itself.
pub const SEALED_OVERHEAD: usize = SEALED_TAG.len() + 8 + SEAL_LEN;

/// How far replicas' clocks may disagree: a sealed value is taken this long past its
/// deadline.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// How long a message on the events channel is obeyed after it was sent (a replayed purge
/// is stale once this passed).
pub const MESSAGE_FRESH: Duration = Duration::from_secs(30);

/// How long a peer token is good for.
pub const PEER_TOKEN_LIFE: Duration = Duration::from_secs(60);

/// What a sealed record is: part of what is sealed, so a record of one kind never passes for
/// another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    Entry,
    Refusal,
    Lease,
    Stream,
    Message,
}

impl Sealed {
    fn tag(self) -> &'static [u8] {
        match self {
            Sealed::Entry => b"entry",
            Sealed::Refusal => b"refusal",
            Sealed::Lease => b"lease",
            Sealed::Stream => b"stream",
            Sealed::Message => b"message",
        }
    }
}

/// The secret every replica of a fleet, and the inspector, shares (`--fleet-secret`): at
/// least [`FleetSecret::MIN_LEN`] bytes, never shown (its `Debug` form hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct FleetSecret(Vec<u8>);

impl FleetSecret {
    /// The fewest bytes a secret may have.
    pub const MIN_LEN: usize = 16;

    /// `secret`, if it is long enough (a trailing newline, as a file or `echo` leaves one,
    /// is not part of it).
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<FleetSecret, String> {
        let mut secret = secret.into();
        while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            secret.pop();
        }
        if secret.len() < FleetSecret::MIN_LEN {
            return Err(format!(
                "the fleet secret must be at least {} bytes (for example the output of \
                 `openssl rand -hex 32`)",
                FleetSecret::MIN_LEN
            ));
        }
        Ok(FleetSecret(secret))
    }
}

impl std::fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetSecret(..)")
    }
}

/// What was read from Redis and not trusted (`llm_dedup_redis_rejected_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// A stored answer whose seal does not hold.
    Entry,
    /// A shared error answer whose seal does not hold.
    Refusal,
    /// A lease another replica did not take.
    Lease,
    /// A relayed stream's record whose seal does not hold, or a head that is not a 2xx.
    Stream,
    /// A message on the events channel not sealed by this fleet, or stale.
    Message,
    /// A peer asking for a stream without a valid token.
    PeerToken,
    /// A value that does not decode (sealed or not): skipped, Redis stays on.
    Malformed,
}

impl Rejected {
    /// Every kind, in the order of [`Rejected::index`].
    pub const ALL: [Rejected; 7] = [
        Rejected::Entry,
        Rejected::Refusal,
        Rejected::Lease,
        Rejected::Stream,
        Rejected::Message,
        Rejected::PeerToken,
        Rejected::Malformed,
    ];

    /// Its label.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Entry => "entry",
            Rejected::Refusal => "refusal",
            Rejected::Lease => "lease",
            Rejected::Stream => "stream",
            Rejected::Message => "message",
            Rejected::PeerToken => "peer_token",
            Rejected::Malformed => "malformed",
        }
    }

    /// Its place in [`Rejected::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The fleet secret's keys.
pub struct Seal {
    records: [u8; 32],
    peers: [u8; 32],
    salt: [u8; 32],
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seal(..)")
    }
}

impl Seal {
    /// The keys of `secret`.
    pub fn new(secret: &FleetSecret) -> Seal {
        let secret = &secret.0;
        Seal {
            records: blake3::derive_key("llm-dedup 2026 fleet records", secret),
            peers: blake3::derive_key("llm-dedup 2026 fleet peer tokens", secret),
            salt: blake3::derive_key("llm-dedup 2026 fleet partition salt", secret),
        }
    }

    /// The credential salt every replica of the fleet derives alike.
    pub fn salt(&self) -> [u8; 32] {
        self.salt
    }

    /// The seal of `parts` as a record of `kind` (each part length-prefixed, so no two lists
    /// of parts seal alike).
    pub fn mac(&self, kind: Sealed, parts: &[&[u8]]) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.records);
        for part in std::iter::once(kind.tag()).chain(parts.iter().copied()) {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hasher.finalize()
    }

    /// `value` sealed as a record of `kind` stored under `name`, good until `until` (unix ms):
    /// [`SEALED_TAG`], the deadline, the value, the seal. The tag makes a sealed value
    /// unreadable as an unsealed one, so a replica without the secret skips it (counted as
    /// malformed) instead of serving the seal as part of a body.
    pub fn seal(&self, kind: Sealed, name: &str, value: &[u8], until: i64) -> Vec<u8> {
        let deadline = until.to_le_bytes();
        let mac = self.mac(kind, &[name.as_bytes(), &deadline, value]);
        let mut sealed = Vec::with_capacity(SEALED_OVERHEAD + value.len());
        sealed.extend_from_slice(SEALED_TAG);
        sealed.extend_from_slice(&deadline);
        sealed.extend_from_slice(value);
        sealed.extend_from_slice(mac.as_bytes());
        sealed
    }

    /// The value of a record sealed by [`Seal::seal`], if its seal holds and its deadline
    /// had not passed at `now` (unix ms; replicas' clocks may differ by [`CLOCK_SKEW`]): a
    /// sealed value copied back after its time is as good as a forged one.
    pub fn open<'a>(
        &self,
        kind: Sealed,
        name: &str,
        sealed: &'a [u8],
        now: i64,
    ) -> Option<&'a [u8]> {
        let rest = sealed.strip_prefix(SEALED_TAG)?;
        let (deadline, rest) = rest.split_first_chunk::<8>()?;
        let (value, mac) = rest.split_last_chunk::<SEAL_LEN>()?;
        let until = i64::from_le_bytes(*deadline);
        if now > until.saturating_add(CLOCK_SKEW.as_millis() as i64) {
            return None;
        }
        let mac = blake3::Hash::from(*mac);
        (self.mac(kind, &[name.as_bytes(), deadline, value]) == mac).then_some(value)
    }

    /// A token that lets this replica ask another for the rest of the stream under `key`, on
    /// behalf of `partition`, until `PEER_TOKEN_LIFE` from `now`: `{partition}.{until}.{mac}`.
    pub fn peer_token(&self, key: &CacheKey, partition: &Partition, now: SystemTime) -> String {
        let until = unix_ms(now + PEER_TOKEN_LIFE);
        let mac = self.peer_mac(key, partition, until);
        format!("{}.{until}.{}", hex(partition.as_bytes()), mac.to_hex())
    }

    /// The partition a peer token speaks for, if it is one of this fleet's for `key` and has
    /// not expired at `now`.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub fn check_peer_token(
        &self,
        key: &CacheKey,
        token: &str,
        now: SystemTime,
    ) -> Option<Partition> {
        let mut parts = token.split('.');
        let (partition, until, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let partition = Partition::from_bytes(unhex32(partition)?);
        let until: i64 = until.parse().ok()?;
        let mac = blake3::Hash::from_hex(mac).ok()?;
        let now = unix_ms(now);
        let fresh = until >= now && until - now <= PEER_TOKEN_LIFE.as_millis() as i64;
        (fresh && self.peer_mac(key, &partition, until) == mac).then_some(partition)
    }

    fn peer_mac(&self, key: &CacheKey, partition: &Partition, until: i64) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.peers);
        hasher.update(key.as_bytes());
        hasher.update(partition.as_bytes());
        hasher.update(&until.to_le_bytes());
        hasher.finalize()
    }
}

/// 64 lowercase hex characters.
fn hex(bytes: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*bytes).to_hex().to_string()
}

/// 32 bytes from 64 hex characters.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
fn unhex32(text: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(text).ok().map(|h| *h.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealing(secret: &str) -> Seal {
        Seal::new(&FleetSecret::new(secret).expect("long enough"))
    }

    #[test]
    fn a_secret_is_long_enough_and_never_shown() {
        assert!(FleetSecret::new("short").is_err());
        assert!(
            FleetSecret::new("fifteen bytes!!\n").is_err(),
            "the newline is not counted"
        );
        let secret = FleetSecret::new("sixteen bytes!!!\n").expect("sixteen");
        assert_eq!(secret, FleetSecret::new("sixteen bytes!!!").expect("same"));
        assert!(!format!("{secret:?}").contains("sixteen"));
    }

    fn key(b: u8) -> CacheKey {
        CacheKey::from_hex(&format!("{b:02x}").repeat(32)).expect("key")
    }

    #[test]
    fn a_sealed_value_opens_only_as_what_and_where_it_was_sealed() {
        let seal = sealing("a secret of sixteen bytes or more");
        let now = 1_000_000;
        let sealed = seal.seal(Sealed::Entry, "e:1", b"value", now + 10_000);
        assert_eq!(
            seal.open(Sealed::Entry, "e:1", &sealed, now),
            Some(&b"value"[..])
        );
        assert_eq!(seal.open(Sealed::Entry, "e:2", &sealed, now), None, "moved");
        assert_eq!(
            seal.open(Sealed::Refusal, "e:1", &sealed, now),
            None,
            "another kind"
        );
        let other = sealing("another fleet's secret, sixteen+");
        assert_eq!(
            other.open(Sealed::Entry, "e:1", &sealed, now),
            None,
            "another fleet"
        );
        let late = now + 10_000 + CLOCK_SKEW.as_millis() as i64 + 1;
        assert_eq!(
            seal.open(Sealed::Entry, "e:1", &sealed, late),
            None,
            "replayed late"
        );
        for at in 0..sealed.len() {
            let mut forged = sealed.clone();
            forged[at] ^= 1;
            assert_eq!(
                seal.open(Sealed::Entry, "e:1", &forged, now),
                None,
                "byte {at}"
            );
        }
        // A later deadline written over the real one breaks the seal.
        let mut extended = sealed.clone();
        extended[SEALED_TAG.len()..SEALED_TAG.len() + 8]
            .copy_from_slice(&(now + 1_000_000).to_le_bytes());
        assert_eq!(seal.open(Sealed::Entry, "e:1", &extended, late), None);
        for short in [&sealed[..SEALED_OVERHEAD - 1], b"short", b""] {
            assert_eq!(seal.open(Sealed::Entry, "e:1", short, now), None);
        }
        assert!(
            crate::fleet::tier::codec::decode_entry(key(1), &sealed, 1 << 20).is_none(),
            "a replica without the secret cannot read a sealed value as an entry"
        );
    }

    #[test]
    fn a_peer_token_speaks_for_one_key_and_one_partition_for_a_minute() {
        let seal = sealing("a secret of sixteen bytes or more");
        let partition = Partition::from_bytes([7; 32]);
        let now = SystemTime::now();
        let token = seal.peer_token(&key(1), &partition, now);
        assert_eq!(seal.check_peer_token(&key(1), &token, now), Some(partition));
        assert_eq!(
            seal.check_peer_token(&key(2), &token, now),
            None,
            "another key"
        );
        let later = now + PEER_TOKEN_LIFE + Duration::from_secs(1);
        assert_eq!(
            seal.check_peer_token(&key(1), &token, later),
            None,
            "expired"
        );
        let other = sealing("another fleet's secret, sixteen+");
        assert_eq!(other.check_peer_token(&key(1), &token, now), None);
        let forged = token.replace(&hex(&[7; 32]), &hex(&[8; 32]));
        assert_eq!(
            seal.check_peer_token(&key(1), &forged, now),
            None,
            "another partition"
        );
        for bad in ["", "a.b.c", "..", "x.1.y.z"] {
            assert_eq!(seal.check_peer_token(&key(1), bad, now), None, "{bad:?}");
        }
        // A token made to last longer than a token may is not taken either.
        let until = unix_ms(now + PEER_TOKEN_LIFE * 10);
        let long = format!(
            "{}.{until}.{}",
            hex(partition.as_bytes()),
            seal.peer_mac(&key(1), &partition, until).to_hex()
        );
        assert_eq!(seal.check_peer_token(&key(1), &long, now), None);
    }
}
