//! The database file itself: opening it for writing with its schema, the credential salt, and
//! the purge generation that tells a serving process another one removed entries.
//!
//! Migrations live in `migrations/`, one file per version, applied in order at open. A file
//! that is not a database, or one from a newer schema, is refused and left untouched.

use std::path::Path;
use std::time::SystemTime;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use rusqlite_migration::{M, MigrationDefinitionError, Migrations};

use super::{BUSY_TIMEOUT, StoreError};
use crate::entry::{StoredAnswer, unix_ms};

/// The schema, one migration per file in `migrations/`, applied in order at open.
fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("../../migrations/0001_entries.sql")),
        M::up(include_str!("../../migrations/0002_counters.sql")),
        M::up(include_str!("../../migrations/0003_embedding_inputs.sql")),
        M::up(include_str!("../../migrations/0004_saved_money.sql")),
        M::up(include_str!("../../migrations/0005_purges.sql")),
        M::up(include_str!("../../migrations/0006_provider_cache.sql")),
        M::up(include_str!("../../migrations/0007_buckets.sql")),
    ])
}

/// Opens (creating if needed) and migrates the database at `path` for writing.
pub(crate) fn open_for_writing(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(StoreError::MissingDirectory {
            path: path.to_owned(),
            dir: dir.to_owned(),
        });
    }
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    // Read the header before anything writes, so a file that is not a database stays untouched.
    if let Err(source) = conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())) {
        return Err(match source.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => StoreError::NotADatabase {
                path: path.to_owned(),
                source,
            },
            _ => open_err(source),
        });
    }
    migrations()
        .to_latest(&mut conn)
        .map_err(|source| match source {
            rusqlite_migration::Error::MigrationDefinition(
                MigrationDefinitionError::DatabaseTooFarAhead,
            ) => StoreError::TooNew {
                path: path.to_owned(),
            },
            source => StoreError::Migrate {
                path: path.to_owned(),
                source,
            },
        })?;
    Ok(conn)
}

/// The database's salt for credential fingerprints, created on first use.
pub(crate) fn load_or_create_salt(conn: &Connection) -> Result<[u8; 32], StoreError> {
    let fresh: [u8; 32] = rand::random();
    conn.execute(
        "INSERT OR IGNORE INTO meta (name, value) VALUES ('salt', ?1)",
        params![&fresh[..]],
    )?;
    conn.execute(
        "INSERT OR IGNORE INTO meta (name, value) VALUES ('created_at', ?1)",
        params![unix_ms(SystemTime::now())],
    )?;
    let salt: Vec<u8> = conn.query_row("SELECT value FROM meta WHERE name = 'salt'", [], |r| {
        r.get(0)
    })?;
    salt.try_into().map_err(|_| StoreError::Damaged {
        key: "meta.salt".into(),
        what: "salt is not 32 bytes".into(),
    })
}

/// Records that entries were purged, for serving processes to notice.
fn bump_purge_generation(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT INTO meta (name, value) VALUES ('purge_generation', 1)
         ON CONFLICT (name) DO UPDATE SET value = value + 1",
        [],
    )?;
    Ok(())
}

/// What one purge removed: the entries matching every criterion given (all of them when none
/// is). Recorded with the purge, so that answers queued before it are not written after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PurgeRule {
    /// Only the entry with this key (64 hex characters).
    pub key: Option<String>,
    /// Only entries of this model.
    pub model: Option<String>,
    /// Only entries of this route (its stored name).
    pub route: Option<String>,
    /// Only entries stored before this time (Unix ms).
    pub created_before: Option<i64>,
    /// Only entries expired at this time (Unix ms).
    pub expired_by: Option<i64>,
}

impl PurgeRule {
    /// Whether the purge selects `entry`.
    pub(crate) fn matches(&self, entry: &StoredAnswer) -> bool {
        self.key.as_ref().is_none_or(|k| {
            // A key selects every answer of its bucket.
            *k == entry.key.to_hex() || entry.bucket.is_some_and(|slot| *k == slot.of.to_hex())
        }) && self
            .model
            .as_ref()
            .is_none_or(|m| Some(m) == entry.model.as_ref())
            && self
                .route
                .as_ref()
                .is_none_or(|r| r == entry.route.as_str())
            && self.created_before.is_none_or(|t| entry.created_at < t)
            && self.expired_by.is_none_or(|t| entry.expires_at <= t)
    }
}

/// How long a purge is remembered: an answer queued longer than this before it is written
/// (the database locked by another writer for a day) is not checked against it.
pub(super) const PURGES_KEPT_MS: i64 = 24 * 3600 * 1000;

/// Records a purge made now with `rule`, and forgets purges older than [`PURGES_KEPT_MS`].
pub(crate) fn record_purge(conn: &Connection, rule: &PurgeRule) -> Result<(), rusqlite::Error> {
    let now = unix_ms(SystemTime::now());
    conn.execute(
        "DELETE FROM purges WHERE at < ?1",
        [now.saturating_sub(PURGES_KEPT_MS)],
    )?;
    conn.execute(
        "INSERT INTO purges (at, key, model, route, created_before, expired_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            now,
            rule.key,
            rule.model,
            rule.route,
            rule.created_before,
            rule.expired_by
        ],
    )?;
    bump_purge_generation(conn)
}

/// The purges made at `since` (Unix ms) or later, each with its time.
pub(super) fn purges_since(
    conn: &Connection,
    since: i64,
) -> Result<Vec<(i64, PurgeRule)>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT at, key, model, route, created_before, expired_by FROM purges WHERE at >= ?1",
    )?;
    let rows = stmt.query_map([since], |r| {
        Ok((
            r.get(0)?,
            PurgeRule {
                key: r.get(1)?,
                model: r.get(2)?,
                route: r.get(3)?,
                created_before: r.get(4)?,
                expired_by: r.get(5)?,
            },
        ))
    })?;
    rows.collect()
}

/// How many purges other processes have recorded.
pub(super) fn purge_generation(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.query_row(
        "SELECT value FROM meta WHERE name = 'purge_generation'",
        [],
        |r| r.get(0),
    )
    .optional()
    .map(Option::unwrap_or_default)
}
