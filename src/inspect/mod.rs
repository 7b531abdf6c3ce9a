//! The inspector: what a cache file holds and what it saved, for operators.
//!
//! This module owns the queries behind `llm-dedup stats | list | show | purge | export |
//! import` and the proxy's `/_llm-dedup/stats`. It works on the same SQLite file a proxy may be
//! serving: reads run in WAL snapshots, writes (purge, import) are short transactions, and a
//! purge bumps a generation number in `meta` that a serving proxy watches to drop its memory
//! tier, so purged answers stop being served within a second. It formats nothing for humans;
//! the command line does that.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::counts::Counts;
use crate::prices::PricesInfo;

pub use crate::engine::LiveFigures;

#[cfg(feature = "sqlite")]
mod disk;
#[cfg(feature = "redis")]
mod fleet;
#[cfg(feature = "sqlite")]
mod transfer;

#[cfg(feature = "sqlite")]
pub use disk::Inspector;
#[cfg(feature = "redis")]
pub use fleet::{FleetGroup, FleetInspector, FleetStats};
#[cfg(feature = "sqlite")]
pub use transfer::{IMPORT_CHUNK, ImportReport};

/// Why an inspection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    /// There is no file at the path.
    #[error("no cache database at {}", .0.display())]
    Missing(PathBuf),
    /// The file could not be used as a cache database (it is not one, it is newer than this
    /// build, its directory is missing, ...).
    #[error(transparent)]
    Store(BoxError),
    /// A query failed.
    #[error("database error: {0}")]
    Sqlite(BoxError),
    /// A key or key prefix is not hexadecimal.
    #[error("{0:?} is not a cache key or key prefix (hex digits expected)")]
    InvalidKey(String),
    /// No entry has that key or prefix.
    #[error("no entry with key {0}")]
    UnknownKey(String),
    /// More than one entry starts with that prefix.
    #[error("key prefix {prefix} is ambiguous: it matches {}, ...", .matches.join(", "))]
    AmbiguousKey {
        /// The prefix given.
        prefix: String,
        /// The first keys it matches.
        matches: Vec<String>,
    },
    /// The fleet's Redis could not be used.
    #[error("Redis: {0}")]
    Redis(String),
    /// A line of an import is not an exported entry.
    #[error("line {line}: {message}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// Reading or writing entries failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The cause of a database failure, as the database library gave it.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counters for one model or route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Group {
    /// The model or route name (`""` for requests that named no model).
    pub name: String,
    /// What its requests did.
    #[serde(flatten)]
    pub counts: Counts,
}

/// What a cache file holds and what it saved, since the database was created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// The database path.
    pub database: String,
    /// When the database was created (Unix ms).
    pub created_at: Option<i64>,
    /// Bytes the database takes on disk (file and write-ahead log).
    pub file_bytes: u64,
    /// Entries stored.
    pub entries: u64,
    /// Bytes of stored answers (bodies and headers).
    pub entry_bytes: u64,
    /// Entries past their TTL, not served, waiting for the sweep.
    pub expired_entries: u64,
    /// Oldest and newest entry (Unix ms).
    pub oldest_entry_at: Option<i64>,
    /// Newest entry (Unix ms).
    pub newest_entry_at: Option<i64>,
    /// The size bound set by the serving proxy (`--max-disk`), if any.
    pub max_disk_bytes: Option<u64>,
    /// Entries removed because they expired.
    pub evicted_expired: u64,
    /// Entries removed to stay under the size bound.
    pub evicted_for_size: u64,
    /// Totals over every route and model.
    pub totals: Counts,
    /// By model, most requests first.
    pub by_model: Vec<Group>,
    /// By route, most requests first.
    pub by_route: Vec<Group>,
    /// The prices `saved_usd` is reckoned at: the built-in table's date, and the `--prices`
    /// file of the serving proxy when it reports its own stats.
    pub prices: PricesInfo,
    /// What the serving proxy is doing right now (only in its own `/_llm-dedup/stats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveFigures>,
}

/// One entry, without its body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntrySummary {
    /// The key (64 hex characters).
    pub key: String,
    /// Its namespace.
    pub namespace: String,
    /// Its route.
    pub route: String,
    /// The model named by the request.
    pub model: Option<String>,
    /// Bytes counted against the size bound.
    pub size: u64,
    /// Times it was served.
    pub hit_count: u64,
    /// When it was stored (Unix ms).
    pub created_at: i64,
    /// When it stops being served (Unix ms).
    pub expires_at: i64,
    /// When it was last served (Unix ms).
    pub last_hit_at: Option<i64>,
    /// When this is one answer beyond the first of a bucket: the bucket's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_of: Option<String>,
    /// Its place in that bucket (1 to 19; 0, left out, for the first answer of a key).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub slot: u8,
    /// How many answers its key holds (more than one for a bucket of sampled answers), in
    /// `list`; sizes, hits and times are then the bucket's whole.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub answers: u64,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

/// One entry in full: the form of `show --json` and of each line of `export`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportedEntry {
    /// Its summary.
    #[serde(flatten)]
    pub summary: EntrySummary,
    /// The HTTP status.
    pub status: u16,
    /// Replayed response headers.
    pub headers: Vec<(String, String)>,
    /// The body, when it is UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body: Option<String>,
    /// The body in hex, when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_hex: Option<String>,
    /// Prompt tokens of the answer.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens of the answer.
    pub completion_tokens: Option<u64>,
    /// Total tokens of the answer.
    pub total_tokens: Option<u64>,
    /// In `show`: the other answers of its bucket, in their places (an export has a line
    /// each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_answers: Vec<ExportedEntry>,
}

/// The order of `list`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortBy {
    /// Most recently used first (the default).
    #[default]
    Recent,
    /// Most hits first.
    Hits,
    /// Largest first.
    Size,
}

/// Which entries `list` and `purge` select; every criterion given must hold.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only entries of this model.
    pub model: Option<String>,
    /// Only entries of this route.
    pub route: Option<String>,
    /// Only entries stored longer ago than this.
    pub older_than: Option<Duration>,
    /// Only the entry with this key or unique key prefix.
    pub key: Option<String>,
    /// Only entries past their TTL.
    pub expired: bool,
}

/// `bytes` in lowercase hexadecimal.
#[cfg(any(feature = "sqlite", feature = "redis"))]
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
