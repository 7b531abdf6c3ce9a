//! The disk tier: stored answers in one SQLite file.
//!
//! This module owns the database: opening it (WAL mode, migrations from `migrations/` applied in
//! order), the credential-fingerprint salt kept in it, reads, and the one writer thread that
//! owns the write connection and commits in batches. It must never run SQLite on an async
//! worker thread: reads go through `spawn_blocking`, writes through the writer's queue, so the
//! request path only ever enqueues.
//!
//! Its files: `schema` (opening, migrations, the salt, the purge generation), `read` (the pool
//! of read-only connections), `writer` (the writer thread and its batches), `tally` (hits and
//! counters kept in memory until the next batch) and `upkeep` (purges made by others, sweeps).

mod read;
mod schema;
mod tally;
mod upkeep;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use crate::counts::Counts;
use crate::entry::{StoredAnswer, unix_ms};
use crate::error::{Error, ErrorKind};
use crate::key::CacheKey;

use read::ReaderPool;
pub(crate) use schema::{PurgeRule, load_or_create_salt, open_for_writing, record_purge};
use tally::SharedPending;
use upkeep::Upkeep;
use writer::{Queue, WriteOp};

/// Longest a hit count waits in memory before it is committed; also how often the writer
/// looks for a purge made by another process.
const HIT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How often expired entries are removed and the size bound enforced, by default.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// How the store keeps itself in bounds.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Largest total size of stored answers; least recently used entries go first.
    pub max_disk: Option<u64>,
    /// How often expired entries are removed and `max_disk` enforced.
    pub sweep_interval: Duration,
    /// Most bytes of answers waiting to be written (while the disk is slower than the traffic,
    /// or failing). Past it, an answer is kept in memory only.
    pub max_queued_bytes: u64,
}

impl Default for StoreLimits {
    /// No size bound; a sweep every minute; 32 MiB waiting at most.
    fn default() -> Self {
        StoreLimits {
            max_disk: None,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            max_queued_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Called when another process (the inspector) purged entries.
type PurgeListener = Arc<Mutex<Option<Box<dyn Fn() + Send>>>>;
/// How long a connection waits on a lock held by another process (the inspector, say).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The directory that should hold the database does not exist.
    #[error("cannot open database {}: directory {} does not exist", path.display(), dir.display())]
    MissingDirectory {
        /// The database path.
        path: PathBuf,
        /// Its missing parent directory.
        dir: PathBuf,
    },
    /// SQLite could not open or create the file.
    #[error("cannot open database {}", path.display())]
    Open {
        /// The database path.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The file exists but is not an SQLite database; it was left untouched.
    #[error("{} is not an SQLite database; it was left untouched", path.display())]
    NotADatabase {
        /// The database path.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The database was written by a newer llm-dedup with a schema this build does not know.
    #[error("{} was written by a newer llm-dedup (its schema is ahead of this build's); upgrade llm-dedup or use another --db", path.display())]
    TooNew {
        /// The database path.
        path: PathBuf,
    },
    /// Applying the schema failed.
    #[error("cannot prepare the schema of {}", path.display())]
    Migrate {
        /// The database path.
        path: PathBuf,
        /// What the migration said.
        source: rusqlite_migration::Error,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row could not be read back.
    #[error("entry {key} is damaged: {what}")]
    Damaged {
        /// The entry's key.
        key: String,
        /// What is wrong with it.
        what: String,
    },
    /// The writer thread is gone (the store was closed).
    #[error("the database writer has stopped")]
    WriterStopped,
    /// Too many answers are waiting to be written already (the disk is slow or failing).
    #[error("{queued} bytes of answers are already waiting to be written")]
    Backlog {
        /// Bytes waiting.
        queued: u64,
    },
    /// A blocking task could not run.
    #[error("database task failed: {0}")]
    Task(String),
}

/// The SQLite-backed tier. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    salt: [u8; 32],
    writes: Sender<WriteOp>,
    /// What is waiting for the writer, and what failed.
    queue: Arc<Queue>,
    max_queued_bytes: u64,
    pending: SharedPending,
    on_purge: PurgeListener,
    readers: ReaderPool,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl DiskStore {
    /// Opens (creating if needed) the database at `path`, applies the schema and starts the
    /// writer thread. A file that is not a database, or one from a newer schema, is an error and
    /// is left untouched; so is a path whose directory does not exist.
    pub fn open(path: &Path, limits: StoreLimits) -> Result<DiskStore, StoreError> {
        let conn = open_for_writing(path)?;
        let salt = load_or_create_salt(&conn)?;
        // Recorded so the inspector can show the bound the serving proxy keeps.
        match limits.max_disk {
            Some(max) => conn.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('max_disk', ?1)",
                [i64::try_from(max).unwrap_or(i64::MAX)],
            )?,
            None => conn.execute("DELETE FROM meta WHERE name = 'max_disk'", [])?,
        };
        // WAL lets readers (this process's pool, the inspector) run beside the writer.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.set_prepared_statement_cache_capacity(16);
        let (writes, queue) = mpsc::channel();
        let pending = SharedPending::new();
        let for_writer = pending.clone();
        let queued = Arc::new(Queue::default());
        let drained = queued.clone();
        let on_purge = PurgeListener::default();
        let listener = on_purge.clone();
        let writer = std::thread::Builder::new()
            .name("llm-dedup-writer".into())
            .spawn(move || {
                let upkeep = Upkeep::new(&conn, limits, listener);
                writer::write_loop(conn, queue, for_writer, drained, upkeep)
            })
            .map_err(|e| StoreError::Task(format!("cannot start the writer thread: {e}")))?;
        Ok(DiskStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                salt,
                writes,
                queue: queued,
                max_queued_bytes: limits.max_queued_bytes,
                pending,
                on_purge,
                readers: ReaderPool::new(path.to_owned()),
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Operations queued for the writer and not yet taken.
    pub fn queue_depth(&self) -> usize {
        self.inner.queue.ops.load(Ordering::Relaxed)
    }

    /// Writes that failed since the store was opened: batches that could not be committed
    /// (retried with the next), answers refused because too many were waiting.
    pub fn write_errors(&self) -> u64 {
        self.inner.queue.errors.load(Ordering::Relaxed)
    }

    /// The random salt for credential fingerprints, created with the database.
    pub fn salt(&self) -> &[u8; 32] {
        &self.inner.salt
    }

    /// Reads the entries for `keys` (each `None` if missing or expired), in one trip off the
    /// async workers.
    pub async fn get_many(
        &self,
        keys: Vec<CacheKey>,
    ) -> Result<Vec<Option<StoredAnswer>>, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.readers.read(|conn| {
                keys.iter()
                    .map(|key| read::read_entry(conn, *key))
                    .collect()
            })
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Queues `entry` to be written; it is on disk after the next commit. Refused (and
    /// counted as a write error) while [`StoreLimits::max_queued_bytes`] are waiting already.
    pub fn put(&self, entry: Arc<StoredAnswer>) -> Result<(), StoreError> {
        let queue = &self.inner.queue;
        let size = entry.size();
        let waiting = queue.bytes.fetch_add(size, Ordering::Relaxed);
        if waiting.saturating_add(size) > self.inner.max_queued_bytes {
            queue.bytes.fetch_sub(size, Ordering::Relaxed);
            queue.errors.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Backlog { queued: waiting });
        }
        self.send(WriteOp::Put(entry)).inspect_err(|_| {
            queue.bytes.fetch_sub(size, Ordering::Relaxed);
        })
    }

    /// Queues the removal of the entries under `keys`, or of every entry (`None`): another
    /// replica replaced or purged them. With `buckets`, every answer of their buckets goes too
    /// (a purge; a replaced answer is only that one). Removed with the next commit, with the
    /// answers queued for them before it.
    pub fn remove(&self, keys: Option<Vec<CacheKey>>, buckets: bool) -> Result<(), StoreError> {
        self.send(WriteOp::Remove(keys, buckets))
    }

    /// Counts a hit on `key` at `now` (hit count and last-hit time) and adds `counts` to the
    /// counters of `route` and `model` (one lock, one map update), committed within a second.
    pub fn record_hit(
        &self,
        key: CacheKey,
        route: &'static str,
        model: &str,
        counts: &Counts,
        now: SystemTime,
    ) {
        self.inner
            .pending
            .with(|pending| pending.hit(key, unix_ms(now), route, model, counts));
    }

    /// Calls `listener` (on the writer thread) whenever another process purges entries from
    /// the database, so that copies held elsewhere can be dropped.
    pub fn on_external_purge(&self, listener: impl Fn() + Send + 'static) {
        if let Ok(mut slot) = self.inner.on_purge.lock() {
            *slot = Some(Box::new(listener));
        }
    }

    /// Adds `counts` to the counters of `route` and `model`, committed within a second.
    pub fn record_counts(&self, route: &str, model: &str, counts: &Counts) {
        self.inner
            .pending
            .with(|pending| pending.count(route, model, counts));
    }

    /// Waits until everything queued before this call is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Flush(tx))?;
        rx.await.map_err(|_| StoreError::WriterStopped)
    }

    /// Commits everything queued, stops the writer and waits for it. Later writes fail with
    /// [`StoreError::WriterStopped`]; reads keep working.
    pub async fn close(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        // A writer already stopped has nothing left to commit.
        if self.send(WriteOp::Shutdown(tx)).is_ok() {
            rx.await.map_err(|_| StoreError::WriterStopped)?;
        }
        let handle = self.inner.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?
                .map_err(|_| StoreError::Task("the writer thread panicked".into()))?;
        }
        Ok(())
    }

    fn send(&self, op: WriteOp) -> Result<(), StoreError> {
        // Counted before sending, so the writer's decrement can never run ahead of it.
        let ops = &self.inner.queue.ops;
        ops.fetch_add(1, Ordering::Relaxed);
        self.inner.writes.send(op).map_err(|_| {
            ops.fetch_sub(1, Ordering::Relaxed);
            StoreError::WriterStopped
        })
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::with_source(ErrorKind::Cache, "cannot use the cache database", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryMeta;
    use crate::route::Route;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use rusqlite::Connection;

    async fn get(store: &DiskStore, key: CacheKey) -> Option<StoredAnswer> {
        let mut found = store.get_many(vec![key]).await.expect("read");
        found.pop().flatten()
    }

    fn entry(byte: u8, ttl: Duration) -> Arc<StoredAnswer> {
        let meta = EntryMeta {
            key: CacheKey::from_hex(&format!("{byte:02x}").repeat(32)).expect("hex"),
            namespace: "ns".into(),
            route: Route::ChatCompletions,
            model: Some("gpt-4o-mini".into()),
            ttl,
            bucket: None,
        };
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().expect("value"));
        Arc::new(StoredAnswer::from_upstream(
            &meta,
            StatusCode::OK,
            &h,
            Bytes::from_static(br#"{"id":"x","usage":{"prompt_tokens":1,"completion_tokens":2}}"#),
        ))
    }

    #[tokio::test]
    async fn entries_survive_close_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache.db");
        let store = DiskStore::open(&path, StoreLimits::default()).expect("open");
        let salt = *store.salt();
        let e = entry(1, Duration::from_secs(60));
        store.put(e.clone()).expect("queued");
        for _ in 0..2 {
            let now = SystemTime::now();
            store.record_hit(e.key, "embeddings", "", &Counts::default(), now);
        }
        store.close().await.expect("close");
        assert!(store.put(e.clone()).is_err(), "writes after close fail");

        let store = DiskStore::open(&path, StoreLimits::default()).expect("reopen");
        assert_eq!(store.salt(), &salt, "the salt is kept with the database");
        let back = get(&store, e.key).await.expect("present");
        assert_eq!(&back, e.as_ref());
        assert_eq!(back.usage.total_tokens, Some(3));
        let conn = Connection::open(&path).expect("open");
        let (hits, last): (i64, Option<i64>) = conn
            .query_row("SELECT hit_count, last_hit_at FROM entries", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("row");
        assert_eq!(hits, 2, "every hit is counted");
        assert!(last.is_some());
    }

    #[tokio::test]
    async fn expired_entries_are_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            DiskStore::open(&dir.path().join("c.db"), StoreLimits::default()).expect("open");
        let e = entry(2, Duration::ZERO);
        store.put(e.clone()).expect("queued");
        store.flush().await.expect("flush");
        assert_eq!(get(&store, e.key).await, None);
    }

    #[test]
    fn refuses_a_file_that_is_not_a_database_and_leaves_it_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notes.txt");
        let text = b"these are my notes, not a database\n".repeat(100);
        std::fs::write(&path, &text).expect("write");
        let err = DiskStore::open(&path, StoreLimits::default())
            .err()
            .expect("must fail");
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), text);
    }

    #[test]
    fn refuses_a_missing_directory_and_a_newer_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = DiskStore::open(&dir.path().join("nope/c.db"), StoreLimits::default())
            .err()
            .expect("must fail");
        assert!(matches!(err, StoreError::MissingDirectory { .. }), "{err}");

        let path = dir.path().join("future.db");
        let conn = Connection::open(&path).expect("create");
        conn.pragma_update(None, "user_version", 99)
            .expect("set version");
        drop(conn);
        let err = DiskStore::open(&path, StoreLimits::default())
            .err()
            .expect("must fail");
        assert!(matches!(err, StoreError::TooNew { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_file_that_turns_read_only_loses_nothing_once_it_is_writable_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let store = DiskStore::open(&path, StoreLimits::default()).expect("open");
        let first = entry(1, Duration::from_secs(60));
        store.put(first.clone()).expect("queued");
        store.flush().await.expect("flush");
        assert_eq!(store.write_errors(), 0);

        store.send(WriteOp::ReadOnly(true)).expect("sent");
        let second = entry(2, Duration::from_secs(60));
        store.put(second.clone()).expect("queued");
        store
            .flush()
            .await
            .expect("a failed commit still answers its flush");
        assert!(store.write_errors() >= 1, "the failure is counted");
        assert_eq!(get(&store, second.key).await, None, "not on disk yet");
        assert_eq!(
            get(&store, first.key).await.as_ref(),
            Some(first.as_ref()),
            "intact"
        );

        store.send(WriteOp::ReadOnly(false)).expect("sent");
        store.flush().await.expect("flush");
        assert_eq!(
            get(&store, second.key).await.as_ref(),
            Some(second.as_ref()),
            "kept and written once the file is writable again"
        );
        store.close().await.expect("close");
    }

    /// A removal (another replica's purge or refresh) takes the answers queued before it with
    /// it, even when the file was read-only and they waited: none is written after it.
    #[tokio::test]
    async fn a_removal_takes_the_answers_queued_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            DiskStore::open(&dir.path().join("c.db"), StoreLimits::default()).expect("open");
        store.send(WriteOp::ReadOnly(true)).expect("sent");
        let (kept, removed, all) = (
            entry(1, Duration::from_secs(60)),
            entry(2, Duration::from_secs(60)),
            entry(3, Duration::from_secs(60)),
        );
        store.put(kept.clone()).expect("queued");
        store.put(removed.clone()).expect("queued");
        store.flush().await.expect("flush");
        store.remove(Some(vec![removed.key]), false).expect("sent");
        store.send(WriteOp::ReadOnly(false)).expect("sent");
        store.flush().await.expect("flush");
        assert!(get(&store, kept.key).await.is_some(), "another key stays");
        assert_eq!(
            get(&store, removed.key).await,
            None,
            "written after its removal"
        );

        store.send(WriteOp::ReadOnly(true)).expect("sent");
        store.put(all.clone()).expect("queued");
        store.remove(None, false).expect("sent");
        store.send(WriteOp::ReadOnly(false)).expect("sent");
        store.flush().await.expect("flush");
        assert_eq!(
            get(&store, all.key).await,
            None,
            "written after removing everything"
        );
        assert_eq!(
            store.inner.queue.bytes.load(Ordering::Relaxed),
            0,
            "what was dropped is not counted as queued"
        );
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn the_queue_refuses_answers_past_its_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = StoreLimits {
            max_queued_bytes: 1_000,
            ..StoreLimits::default()
        };
        let store = DiskStore::open(&dir.path().join("c.db"), limits).expect("open");
        store.send(WriteOp::ReadOnly(true)).expect("sent");
        let mut refused = 0;
        for i in 0..20u8 {
            if let Err(StoreError::Backlog { .. }) = store.put(entry(i, Duration::from_secs(60))) {
                refused += 1;
            }
            store.flush().await.expect("flush");
        }
        assert!(refused >= 10, "{refused} refused");
        assert!(store.inner.queue.bytes.load(Ordering::Relaxed) <= 1_000);
    }
}
