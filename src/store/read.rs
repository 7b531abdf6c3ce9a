//! Reading stored answers: a small pool of read-only connections, used only from blocking
//! threads (`spawn_blocking`), never from an async worker.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{BUSY_TIMEOUT, StoreError};
use crate::entry::{KeptEntry, Slot, StoredAnswer, unix_ms};
use crate::key::CacheKey;
use crate::route::Route;

/// Read connections kept open between reads.
const MAX_IDLE_READERS: usize = 4;

/// Page cache of one read connection, in KiB (as SQLite's negative `cache_size`).
const READER_CACHE_KIB: i64 = -512;

/// Read-only connections to one database file, opened on demand and kept when idle.
pub(super) struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    pub(super) fn new(path: PathBuf) -> ReaderPool {
        ReaderPool {
            path,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on a pooled read connection (opening one if none is idle). Blocking.
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let idle = self.idle.lock().ok().and_then(|mut pool| pool.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.busy_timeout(BUSY_TIMEOUT)?;
                // Point lookups by key need the B-tree's inner pages, not SQLite's default
                // 2 MiB of cache each (up to four idle readers are kept).
                conn.pragma_update(None, "cache_size", READER_CACHE_KIB)?;
                conn
            }
        };
        let result = f(&conn);
        if let Ok(mut pool) = self.idle.lock()
            && pool.len() < MAX_IDLE_READERS
        {
            pool.push(conn);
        }
        result
    }
}

/// The entry stored under `key`, unless it is missing or expired.
pub(super) fn read_entry(
    conn: &Connection,
    key: CacheKey,
) -> Result<Option<StoredAnswer>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT namespace, route, model, status, headers, body, created_at, expires_at,
                bucket_of, bucket_slot
         FROM entries WHERE key = ?1 AND expires_at > ?2",
    )?;
    let row = stmt
        .query_row(params![key.to_hex(), unix_ms(SystemTime::now())], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, u16>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Vec<u8>>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, i64>(9)?,
            ))
        })
        .optional()?;
    let Some((namespace, route, model, status, headers, body, created_at, expires_at, of, index)) =
        row
    else {
        return Ok(None);
    };
    let damaged = |what: String| StoreError::Damaged {
        key: key.to_hex(),
        what,
    };
    let route =
        Route::from_name(&route).ok_or_else(|| damaged(format!("unknown route {route:?}")))?;
    let bucket = match of {
        None => None,
        Some(of) => {
            let slot = CacheKey::from_hex(&of)
                .zip(u8::try_from(index).ok())
                .map(|(of, index)| Slot { of, index })
                .filter(|slot| slot.names(&key));
            Some(slot.ok_or_else(|| damaged(format!("not answer {index} of bucket {of:?}")))?)
        }
    };
    let header_pairs =
        serde_json::from_str(&headers).map_err(|e| damaged(format!("headers: {e}")))?;
    // Usage and the billed model are read from the body (the token columns are a copy of it
    // for the inspector).
    Ok(Some(StoredAnswer::read_back(KeptEntry {
        key,
        bucket,
        namespace,
        route,
        model,
        status,
        header_pairs,
        body: Bytes::from(body),
        created_at,
        expires_at,
    })))
}
