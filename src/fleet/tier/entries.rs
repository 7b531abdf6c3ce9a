//! Stored answers in Redis (`e:{key}`, in the compact form of `codec.rs`, sealed with the
//! fleet secret when there is one), and the fleet's credential salt (in Redis only for a fleet
//! without a secret).

use std::time::SystemTime;

use super::conn::CONNECT_TIMEOUT;
use super::seal::{Rejected, Sealed};
use super::topology;
use super::{Fleet, Unavailable, codec};
use crate::entry::{StoredAnswer, unix_ms};
use crate::key::CacheKey;

/// Room beyond `--max-stream` for what an entry holds besides its body (its headers, times,
/// the seal): a value longer than the bound and this is never a replica's.
const ENTRY_SLACK: u64 = 1 << 20;

/// `GETRANGE name 0 most`: the value under `name`, never more than one byte past `most` (a
/// longer one is known to be too long without reading it whole); empty when there is none.
async fn bounded_get<C: redis::aio::ConnectionLike>(
    c: &mut C,
    name: String,
    most: u64,
) -> redis::RedisResult<Vec<u8>> {
    redis::cmd("GETRANGE")
        .arg(name)
        .arg(0)
        .arg(most)
        .query_async(c)
        .await
}

impl Fleet {
    /// The fleet's credential salt: the one the fleet secret gives; without a secret, the one
    /// in Redis, or `ours` stored there if there is none yet (blocking, with a short timeout).
    /// `None` if Redis cannot be reached or holds no usable salt.
    pub fn shared_salt(&self, ours: &[u8; 32]) -> Option<[u8; 32]> {
        if let Some(salt) = self.secret_salt() {
            // Derived from the secret: nothing to read, and nothing in Redis to test
            // credentials against.
            return Some(salt);
        }
        let inner = &self.inner;
        let read = || -> redis::RedisResult<Vec<u8>> {
            let mut conn =
                topology::blocking(&inner.client, self.cluster_blocking()?, CONNECT_TIMEOUT)?;
            let conn = conn.as_mut();
            let key = inner.layout.salt();
            let _: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&ours[..])
                .arg("NX")
                .query(conn)?;
            redis::cmd("GET").arg(&key).query(conn)
        };
        match read() {
            Ok(bytes) => match <[u8; 32]>::try_from(bytes.as_slice()) {
                Ok(salt) => Some(salt),
                Err(_) => {
                    self.rejected(Rejected::Malformed);
                    None
                }
            },
            Err(e) => {
                self.failed("salt", &e.to_string());
                None
            }
        }
    }

    /// The stored answer under `key`, if Redis has one that has not expired.
    pub async fn get(&self, key: &CacheKey) -> Result<Option<StoredAnswer>, Unavailable> {
        let name = self.inner.layout.entry(key);
        let most = self.read_bound();
        let bytes: Vec<u8> = self
            .call("get", |mut c| async move {
                bounded_get(&mut c, name, most).await
            })
            .await?;
        Ok(self.fresh(*key, &bytes))
    }

    /// The most bytes read of a value (an entry's bound, with room for its headers and seal):
    /// a larger value was not written by a replica, and is never read whole.
    fn read_bound(&self) -> u64 {
        self.inner.max_entry.saturating_add(ENTRY_SLACK)
    }

    /// The stored answers under `keys`, in one trip; `None` for each one missing (all of them
    /// when Redis cannot be used).
    pub async fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<StoredAnswer>> {
        if keys.is_empty() {
            return Vec::new();
        }
        let names: Vec<String> = keys.iter().map(|k| self.inner.layout.entry(k)).collect();
        let most = self.read_bound();
        // One bounded read a key, sent together on the multiplexed connection (one trip, and
        // no command naming keys of several cluster slots).
        let read: Result<Vec<Vec<u8>>, Unavailable> = self
            .call("mget", |c| async move {
                let reads = names.into_iter().map(|name| {
                    let mut c = c.clone();
                    async move { bounded_get(&mut c, name, most).await }
                });
                futures_util::future::try_join_all(reads).await
            })
            .await;
        match read {
            Ok(values) if values.len() == keys.len() => keys
                .iter()
                .zip(values)
                .map(|(key, v)| self.fresh(*key, &v))
                .collect(),
            _ => vec![None; keys.len()],
        }
    }

    /// Writes `entry`, to expire with it.
    pub async fn put(&self, entry: &StoredAnswer) {
        let left = entry.expires_at.saturating_sub(unix_ms(SystemTime::now()));
        let Ok(ms) = u64::try_from(left) else { return };
        if ms == 0 {
            return;
        }
        let name = self.inner.layout.entry(&entry.key);
        let value = self.seal_value(
            Sealed::Entry,
            &name,
            codec::encode_entry(entry),
            entry.expires_at,
        );
        self.set_px(name, value, ms).await;
    }

    /// `value` as this replica writes it under `name`: sealed, good until `until` (unix ms),
    /// when the fleet has a secret.
    pub(super) fn seal_value(
        &self,
        kind: Sealed,
        name: &str,
        value: Vec<u8>,
        until: i64,
    ) -> Vec<u8> {
        match &self.inner.seal {
            Some(seal) => seal.seal(kind, name, &value, until),
            None => value,
        }
    }

    /// What a value read under `name` holds, if this replica may trust it: its seal holds
    /// (with a secret), or anything (without one). A value whose seal fails is counted.
    pub(super) fn opened<'a>(
        &self,
        kind: Sealed,
        rejected: Rejected,
        name: &str,
        value: &'a [u8],
    ) -> Option<&'a [u8]> {
        let Some(seal) = &self.inner.seal else {
            return Some(value);
        };
        let opened = seal.open(kind, name, value, unix_ms(SystemTime::now()));
        if opened.is_none() {
            self.rejected(rejected);
        }
        opened
    }

    /// `GET name`: the value under `name`, if any, as one call under the fault rule.
    pub(super) async fn value_at(
        &self,
        what: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, Unavailable> {
        let name = name.to_owned();
        self.call(what, |mut c| async move {
            redis::cmd("GET").arg(name).query_async(&mut c).await
        })
        .await
    }

    /// `SET name value PX ms`.
    pub(super) async fn set_px(&self, name: String, value: Vec<u8>, ms: u64) {
        let _: Result<(), Unavailable> = self
            .call("set", |mut c| async move {
                redis::cmd("SET")
                    .arg(name)
                    .arg(value)
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut c)
                    .await
            })
            .await;
    }

    /// An entry read from Redis, if this replica may trust it, it decodes within the bound
    /// and it has not expired. A value that cannot be used is counted and is a miss; Redis
    /// stays on (one bad value says nothing of the others).
    fn fresh(&self, key: CacheKey, bytes: &[u8]) -> Option<StoredAnswer> {
        if bytes.is_empty() {
            return None;
        }
        if bytes.len() as u64 > self.read_bound() {
            self.rejected(Rejected::Malformed);
            return None;
        }
        let name = self.inner.layout.entry(&key);
        let value = self.opened(Sealed::Entry, Rejected::Entry, &name, bytes)?;
        let entry = codec::decode_entry(key, value, self.inner.max_entry);
        if entry.is_none() {
            self.rejected(Rejected::Malformed);
        }
        entry.filter(|e| e.is_fresh(SystemTime::now()))
    }
}
