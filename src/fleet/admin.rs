//! The inspector's access to a fleet's Redis (`stats`, `list`, `show` and `purge` with
//! `--redis URL`): blocking, as the command line is.
//!
//! Entries are read with `SCAN` (never `KEYS`, which blocks the server) in pages, and decoded
//! as the replicas wrote them; with the fleet secret, entries not sealed with it are left out
//! and counted ([`Admin::untrusted`]). A purge deletes entries and announces it on the fleet's
//! channel (sealed with the secret, without which replicas that have one ignore it), so that
//! every replica drops its copies.

use std::time::Duration;

use super::events::{Message, Says, seal_message};
use super::seal::{FleetSecret, Seal, Sealed};
use super::{Layout, codec};
use crate::entry::StoredAnswer;
use crate::key::CacheKey;

/// Keys asked for in one `SCAN` step, and read in one `MGET`.
const PAGE: usize = 500;

/// The fleet's Redis could not be used, with why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AdminError(String);

impl From<redis::RedisError> for AdminError {
    fn from(e: redis::RedisError) -> Self {
        AdminError(e.to_string())
    }
}

/// A blocking connection to a fleet's Redis, for the inspector.
pub struct Admin {
    conn: redis::Connection,
    layout: Layout,
    shown: String,
    seal: Option<Seal>,
    untrusted: u64,
}

impl Admin {
    /// Connects to the Redis at `url`, with a short timeout; `secret` is the fleet's, if it
    /// has one.
    pub fn open(url: &str, secret: Option<&FleetSecret>) -> Result<Admin, AdminError> {
        let client = redis::Client::open(url)?;
        let timeout = Duration::from_secs(5);
        let conn = client.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        Ok(Admin {
            conn,
            layout: Layout::default(),
            shown: client.get_connection_info().addr().to_string(),
            seal: secret.map(Seal::new),
            untrusted: 0,
        })
    }

    /// Entries read so far that were not sealed with the fleet's secret (left out).
    pub fn untrusted(&self) -> u64 {
        self.untrusted
    }

    /// The Redis server, without any password.
    pub fn server(&self) -> &str {
        &self.shown
    }

    /// Every stored answer, read page by page, with the size of its value in Redis.
    pub fn entries(&mut self) -> Result<Vec<(StoredAnswer, u64)>, AdminError> {
        let names: Vec<String> =
            redis::Commands::scan_match::<_, String>(&mut self.conn, self.layout.entries())?
                .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(names.len());
        for page in names.chunks(PAGE) {
            let values: Vec<Option<Vec<u8>>> =
                redis::cmd("MGET").arg(page).query(&mut self.conn)?;
            for (name, value) in page.iter().zip(values) {
                let (Some(key), Some(value)) = (self.layout.entry_key(name), value) else {
                    continue;
                };
                let opened = match &self.seal {
                    Some(seal) => seal.open(Sealed::Entry, name, &value),
                    None => Some(value.as_slice()),
                };
                let entry = opened.and_then(|v| codec::decode_entry(key, v, codec::MAX_INFLATED));
                match entry {
                    Some(entry) => out.push((entry, value.len() as u64)),
                    None => self.untrusted += 1,
                }
            }
        }
        Ok(out)
    }

    /// Deletes the stored answers under `keys` and tells every replica (each key, or
    /// everything when `all`).
    pub fn purge(&mut self, keys: &[CacheKey], all: bool) -> Result<(), AdminError> {
        for page in keys.chunks(PAGE) {
            let names: Vec<String> = page.iter().map(|k| self.layout.entry(k)).collect();
            let _: i64 = redis::cmd("DEL").arg(&names).query(&mut self.conn)?;
            if !all {
                for key in page {
                    self.announce(Says::Purged(*key))?;
                }
            }
        }
        if all {
            self.announce(Says::PurgedAll)?;
        }
        Ok(())
    }

    fn announce(&mut self, says: Says) -> Result<(), AdminError> {
        let channel = self.layout.channel();
        let mut message = Message {
            from: "inspector".to_owned(),
            says,
        }
        .encode();
        if let Some(seal) = &self.seal {
            message = seal_message(seal, &channel, &message, std::time::SystemTime::now());
        }
        let _: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(message)
            .query(&mut self.conn)?;
        Ok(())
    }
}
