//! Stored answers in Redis (`e:{key}`, in the compact form of `codec.rs`), and the fleet's
//! credential salt.

use std::time::SystemTime;

use super::conn::CONNECT_TIMEOUT;
use super::{Fleet, Unavailable, codec};
use crate::entry::{StoredAnswer, unix_ms};
use crate::key::CacheKey;

impl Fleet {
    /// The fleet's credential salt: the one in Redis, or `ours` stored there if there is none
    /// yet. Blocking, with a short timeout; `None` if Redis cannot be reached.
    pub fn shared_salt(&self, ours: &[u8; 32]) -> Option<[u8; 32]> {
        let inner = &self.inner;
        let read = || -> redis::RedisResult<Vec<u8>> {
            let mut conn = inner.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
            conn.set_read_timeout(Some(CONNECT_TIMEOUT))?;
            conn.set_write_timeout(Some(CONNECT_TIMEOUT))?;
            let key = inner.layout.salt();
            let _: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&ours[..])
                .arg("NX")
                .query(&mut conn)?;
            redis::cmd("GET").arg(&key).query(&mut conn)
        };
        match read() {
            Ok(bytes) => match <[u8; 32]>::try_from(bytes.as_slice()) {
                Ok(salt) => Some(salt),
                Err(_) => {
                    self.failed("salt", "the fleet's salt in Redis is not 32 bytes");
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
        let bytes: Option<Vec<u8>> = self
            .call("get", |mut c| async move {
                redis::cmd("GET").arg(name).query_async(&mut c).await
            })
            .await?;
        Ok(bytes.and_then(|b| self.fresh(*key, &b)))
    }

    /// The stored answers under `keys`, in one trip; `None` for each one missing (all of them
    /// when Redis cannot be used).
    pub async fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<StoredAnswer>> {
        if keys.is_empty() {
            return Vec::new();
        }
        let names: Vec<String> = keys.iter().map(|k| self.inner.layout.entry(k)).collect();
        let read: Result<Vec<Option<Vec<u8>>>, Unavailable> = self
            .call("mget", |mut c| async move {
                redis::cmd("MGET").arg(&names).query_async(&mut c).await
            })
            .await;
        match read {
            Ok(values) if values.len() == keys.len() => keys
                .iter()
                .zip(values)
                .map(|(key, v)| v.and_then(|b| self.fresh(*key, &b)))
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
        self.set_px(name, codec::encode_entry(entry), ms).await;
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

    /// An entry read from Redis, if it decodes and has not expired.
    fn fresh(&self, key: CacheKey, bytes: &[u8]) -> Option<StoredAnswer> {
        let entry = codec::decode_entry(key, bytes);
        if entry.is_none() {
            self.failed(
                "decode",
                "an entry in Redis could not be read; treated as a miss",
            );
        }
        entry.filter(|e| e.is_fresh(SystemTime::now()))
    }
}
