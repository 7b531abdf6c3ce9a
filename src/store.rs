//! The disk tier: stored answers in one SQLite file.
//!
//! This module owns the database: opening it (WAL mode, migrations from `migrations/` applied in
//! order), the credential-fingerprint salt kept in it, reads, and the one writer thread that
//! owns the write connection and commits in batches. It must never run SQLite on an async
//! worker thread: reads go through `spawn_blocking`, writes through the writer's queue, so the
//! request path only ever enqueues.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use rusqlite_migration::{M, MigrationDefinitionError, Migrations};
use tokio::sync::oneshot;

use crate::entry::{StoredAnswer, Usage, unix_ms};
use crate::key::CacheKey;
use crate::route::Route;

/// The schema, one migration per file in `migrations/`, applied in order at open.
fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("../migrations/0001_entries.sql")),
        M::up(include_str!("../migrations/0002_counters.sql")),
        M::up(include_str!("../migrations/0003_embedding_inputs.sql")),
    ])
}

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 1024;
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
}

impl Default for StoreLimits {
    /// No size bound; a sweep every minute.
    fn default() -> Self {
        StoreLimits {
            max_disk: None,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }
}

/// Called when another process (the inspector) purged entries.
type PurgeListener = Arc<Mutex<Option<Box<dyn Fn() + Send>>>>;
/// Read connections kept open between reads.
const MAX_IDLE_READERS: usize = 4;
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
    /// A blocking task could not run.
    #[error("database task failed: {0}")]
    Task(String),
}

enum WriteOp {
    Put(Arc<StoredAnswer>),
    Flush(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// Hits on one key not yet committed, and what they add to the counters of its route and
/// model: those are added up per key on each hit and per route and model only when taken,
/// so that a hit does one map update, not three.
struct HitTally {
    count: i64,
    last_at: i64,
    route: &'static str,
    model: Box<str>,
    counts: Counts,
}

/// What requests did, per route and model: the `counters` table's columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// Requests answered.
    pub requests: i64,
    /// Answered from the cache.
    pub hits: i64,
    /// Answered by an identical request's upstream call.
    pub coalesced: i64,
    /// Answered by their own upstream call.
    pub misses: i64,
    /// Embedding requests answered partly from the cache.
    pub partials: i64,
    /// Not cacheable (or `no-store`), passed through.
    pub bypasses: i64,
    /// Calls made to the upstream.
    pub upstream_calls: i64,
    /// Upstream `429` answers absorbed by retrying.
    pub upstream_429s: i64,
    /// Prompt tokens the provider did not have to process thanks to the cache.
    pub saved_prompt_tokens: i64,
    /// Completion tokens the provider did not have to generate thanks to the cache.
    pub saved_completion_tokens: i64,
    /// Embedding inputs received.
    pub inputs: i64,
    /// Embedding inputs that did not go upstream: cached, shared with an identical input in
    /// flight, or repeated within their request.
    pub inputs_saved: i64,
}

impl Counts {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.hits += other.hits;
        self.coalesced += other.coalesced;
        self.misses += other.misses;
        self.partials += other.partials;
        self.bypasses += other.bypasses;
        self.upstream_calls += other.upstream_calls;
        self.upstream_429s += other.upstream_429s;
        self.saved_prompt_tokens += other.saved_prompt_tokens;
        self.saved_completion_tokens += other.saved_completion_tokens;
        self.inputs += other.inputs;
        self.inputs_saved += other.inputs_saved;
    }
}

/// Hit counts and counters kept in memory and committed by the writer with its next batch (or
/// within [`HIT_FLUSH_INTERVAL`]), so that counting costs a map update, not a thread wake-up.
#[derive(Default)]
struct Pending {
    /// By key. foldhash rather than SipHash: every hit does these lookups.
    hits: foldhash::HashMap<CacheKey, HitTally>,
    /// By route, then model: looked up by `&str`, so counting allocates only the first time.
    counters: foldhash::HashMap<String, foldhash::HashMap<String, Counts>>,
}

impl Pending {
    /// Counts a hit on `key` at `at` that adds `counts` to the counters of `route` and `model`
    /// (always the same for one key).
    fn hit(&mut self, key: CacheKey, at: i64, route: &'static str, model: &str, counts: &Counts) {
        let tally = self.hits.entry(key).or_insert_with(|| HitTally {
            count: 0,
            last_at: at,
            route,
            model: model.into(),
            counts: Counts::default(),
        });
        tally.count += 1;
        tally.last_at = tally.last_at.max(at);
        tally.counts.add(counts);
    }

    fn count(&mut self, route: &str, model: &str, counts: &Counts) {
        let by_model = match self.counters.get_mut(route) {
            Some(m) => m,
            None => self.counters.entry(route.to_owned()).or_default(),
        };
        match by_model.get_mut(model) {
            Some(c) => c.add(counts),
            None => {
                by_model.insert(model.to_owned(), *counts);
            }
        }
    }

    /// Adds what `other` counted into `self`.
    fn absorb(&mut self, other: Pending) {
        for (key, theirs) in other.hits {
            match self.hits.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut ours) => {
                    let ours = ours.get_mut();
                    ours.count += theirs.count;
                    ours.last_at = ours.last_at.max(theirs.last_at);
                    ours.counts.add(&theirs.counts);
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(theirs);
                }
            }
        }
        for (route, models) in other.counters {
            for (model, counts) in models {
                self.count(&route, &model, &counts);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.hits.is_empty() && self.counters.is_empty()
    }
}

/// [`Pending`] in shards: each thread counts into the shard it was given on first use, so
/// hits on many worker threads neither queue on one lock nor pass its cache lines around.
#[derive(Clone)]
struct SharedPending {
    shards: Arc<[Mutex<Pending>]>,
}

/// Shards per store; threads beyond this many share them.
const PENDING_SHARDS: usize = 16;

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % PENDING_SHARDS;
}

impl SharedPending {
    fn new() -> SharedPending {
        SharedPending {
            shards: (0..PENDING_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// Runs `f` on this thread's shard.
    fn with<R>(&self, f: impl FnOnce(&mut Pending) -> R) -> R {
        // A thread being torn down counts into the first shard.
        let shard = &self.shards[SHARD.try_with(|s| *s).unwrap_or(0)];
        f(&mut shard.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Everything counted so far, leaving every shard empty; the counters include the hits'.
    fn take(&self) -> Pending {
        let mut all = Pending::default();
        for shard in self.shards.iter() {
            let taken = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
            all.absorb(taken);
        }
        let hits = std::mem::take(&mut all.hits);
        for tally in hits.values() {
            all.count(tally.route, &tally.model, &tally.counts);
        }
        all.hits = hits;
        all
    }
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
    /// Operations sent to the writer and not yet committed (for the metrics).
    queued: Arc<AtomicUsize>,
    pending: SharedPending,
    on_purge: PurgeListener,
    readers: Mutex<Vec<Connection>>,
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
        let queued = Arc::new(AtomicUsize::new(0));
        let drained = queued.clone();
        let on_purge = PurgeListener::default();
        let listener = on_purge.clone();
        let writer = std::thread::Builder::new()
            .name("llm-dedup-writer".into())
            .spawn(move || {
                let upkeep = Upkeep::new(&conn, limits, listener);
                write_loop(conn, queue, for_writer, &drained, upkeep)
            })
            .map_err(|e| StoreError::Task(format!("cannot start the writer thread: {e}")))?;
        Ok(DiskStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                salt,
                writes,
                queued,
                pending,
                on_purge,
                readers: Mutex::new(Vec::new()),
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Operations queued for the writer and not yet committed.
    pub fn queue_depth(&self) -> usize {
        self.inner.queued.load(Ordering::Relaxed)
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
            inner.read(|conn| keys.iter().map(|key| read_entry(conn, *key)).collect())
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Queues `entry` to be written; it is on disk after the next commit.
    pub fn put(&self, entry: Arc<StoredAnswer>) -> Result<(), StoreError> {
        self.send(WriteOp::Put(entry))
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
        self.inner.queued.fetch_add(1, Ordering::Relaxed);
        self.inner.writes.send(op).map_err(|_| {
            self.inner.queued.fetch_sub(1, Ordering::Relaxed);
            StoreError::WriterStopped
        })
    }
}

impl Inner {
    /// Runs `f` on a pooled read connection (opening one if none is idle).
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let idle = self.readers.lock().ok().and_then(|mut pool| pool.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.busy_timeout(BUSY_TIMEOUT)?;
                conn
            }
        };
        let result = f(&conn);
        if let Ok(mut pool) = self.readers.lock() {
            if pool.len() < MAX_IDLE_READERS {
                pool.push(conn);
            }
        }
        result
    }
}

/// Opens (creating if needed) and migrates the database at `path` for writing.
pub(crate) fn open_for_writing(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(StoreError::MissingDirectory {
                path: path.to_owned(),
                dir: dir.to_owned(),
            });
        }
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

fn read_entry(conn: &Connection, key: CacheKey) -> Result<Option<StoredAnswer>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT namespace, route, model, status, headers, body, created_at, expires_at,
                prompt_tokens, completion_tokens, total_tokens
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
                Usage {
                    prompt_tokens: tokens_from_sql(r.get(8)?),
                    completion_tokens: tokens_from_sql(r.get(9)?),
                    total_tokens: tokens_from_sql(r.get(10)?),
                },
            ))
        })
        .optional()?;
    let Some((namespace, route, model, status, headers, body, created_at, expires_at, usage)) = row
    else {
        return Ok(None);
    };
    let damaged = |what: String| StoreError::Damaged {
        key: key.to_hex(),
        what,
    };
    let route =
        Route::from_name(&route).ok_or_else(|| damaged(format!("unknown route {route:?}")))?;
    let pairs: Vec<(String, String)> =
        serde_json::from_str(&headers).map_err(|e| damaged(format!("headers: {e}")))?;
    let headers = StoredAnswer::headers_from_pairs(&pairs);
    Ok(Some(StoredAnswer {
        key,
        namespace,
        route,
        model,
        status,
        hit_headers: crate::entry::hit_headers(&key, &headers),
        headers,
        body: Bytes::from(body),
        created_at,
        expires_at,
        usage,
    }))
}

// SQLite integers are signed 64-bit; token counts never come near the limit.
fn tokens_to_sql(n: Option<u64>) -> Option<i64> {
    n.and_then(|n| i64::try_from(n).ok())
}

fn tokens_from_sql(n: Option<i64>) -> Option<u64> {
    n.and_then(|n| u64::try_from(n).ok())
}

/// Records that entries were purged, for serving processes to notice.
pub(crate) fn bump_purge_generation(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT INTO meta (name, value) VALUES ('purge_generation', 1)
         ON CONFLICT (name) DO UPDATE SET value = value + 1",
        [],
    )?;
    Ok(())
}

fn purge_generation(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.query_row(
        "SELECT value FROM meta WHERE name = 'purge_generation'",
        [],
        |r| r.get(0),
    )
    .optional()
    .map(Option::unwrap_or_default)
}

/// The writer's periodic work besides committing: noticing purges, sweeping, bounding size.
struct Upkeep {
    limits: StoreLimits,
    listener: PurgeListener,
    generation: i64,
    last_check: std::time::Instant,
    last_sweep: std::time::Instant,
}

impl Upkeep {
    fn new(conn: &Connection, limits: StoreLimits, listener: PurgeListener) -> Upkeep {
        Upkeep {
            limits,
            listener,
            generation: purge_generation(conn).unwrap_or_default(),
            last_check: std::time::Instant::now(),
            last_sweep: std::time::Instant::now(),
        }
    }

    /// Runs what is due; cheap to call on every turn of the writer loop.
    fn run(&mut self, conn: &mut Connection) {
        if self.last_check.elapsed() < HIT_FLUSH_INTERVAL {
            return;
        }
        self.last_check = std::time::Instant::now();
        if let Ok(generation) = purge_generation(conn) {
            if generation != self.generation {
                self.generation = generation;
                if let Ok(listener) = self.listener.lock() {
                    if let Some(listener) = listener.as_ref() {
                        listener();
                    }
                }
            }
        }
        if self.last_sweep.elapsed() >= self.limits.sweep_interval {
            self.last_sweep = std::time::Instant::now();
            match sweep(conn, self.limits.max_disk) {
                Ok((0, 0)) => {}
                Ok((expired, for_size)) => {
                    tracing::info!(expired, for_size, "removed entries from the cache database")
                }
                Err(e) => tracing::error!(error = %e, "sweeping the cache database failed"),
            }
        }
    }
}

/// Removes expired entries, then least recently used ones until the stored answers fit in
/// `max_disk`. Returns how many of each were removed.
fn sweep(conn: &mut Connection, max_disk: Option<u64>) -> Result<(u64, u64), rusqlite::Error> {
    let tx = conn.transaction()?;
    let expired = tx.execute(
        "DELETE FROM entries WHERE expires_at <= ?1",
        [unix_ms(SystemTime::now())],
    )? as u64;
    let mut for_size = 0u64;
    if let Some(max) = max_disk {
        let total: i64 = tx.query_row("SELECT coalesce(sum(size), 0) FROM entries", [], |r| {
            r.get(0)
        })?;
        let mut excess = total - i64::try_from(max).unwrap_or(i64::MAX);
        if excess > 0 {
            let victims = {
                let mut stmt = tx.prepare(
                    "SELECT key, size FROM entries ORDER BY coalesce(last_hit_at, created_at)",
                )?;
                let mut rows = stmt.query([])?;
                let mut victims = Vec::new();
                while excess > 0 {
                    let Some(row) = rows.next()? else { break };
                    victims.push(row.get::<_, String>(0)?);
                    excess -= row.get::<_, i64>(1)?;
                }
                victims
            };
            let mut delete = tx.prepare("DELETE FROM entries WHERE key = ?1")?;
            for key in &victims {
                delete.execute([key])?;
            }
            for_size = victims.len() as u64;
        }
    }
    let mut bump = tx.prepare(
        "INSERT INTO meta (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
    )?;
    for (name, n) in [("evicted_expired", expired), ("evicted_for_size", for_size)] {
        if n > 0 {
            bump.execute(params![name, i64::try_from(n).unwrap_or(i64::MAX)])?;
        }
    }
    drop(bump);
    tx.commit()?;
    Ok((expired, for_size))
}

fn write_loop(
    mut conn: Connection,
    queue: Receiver<WriteOp>,
    pending: SharedPending,
    queued: &AtomicUsize,
    mut upkeep: Upkeep,
) {
    // Ends when every sender is gone (the store was dropped) or on Shutdown; either way, what
    // was queued and counted before is committed first.
    loop {
        let mut batch = Vec::new();
        match queue.recv_timeout(HIT_FLUSH_INTERVAL) {
            Ok(op) => batch.push(op),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let mut acks = Vec::new();
                let mut stop = false;
                if let Err(e) =
                    commit_batch(&mut conn, Vec::new(), pending.take(), &mut acks, &mut stop)
                {
                    tracing::error!(error = %e, "writing hit counts failed");
                }
                break;
            }
        }
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let taken = batch.len();
        let counted = pending.take();
        upkeep.run(&mut conn);
        if batch.is_empty() && counted.is_empty() {
            continue;
        }
        let mut acks = Vec::new();
        let mut stop = false;
        if let Err(e) = commit_batch(&mut conn, batch, counted, &mut acks, &mut stop) {
            tracing::error!(error = %e, "writing to the cache database failed; those entries stay in memory only");
        }
        queued.fetch_sub(taken, Ordering::Relaxed);
        for ack in acks {
            let _ = ack.send(());
        }
        if stop {
            break;
        }
    }
}

fn commit_batch(
    conn: &mut Connection,
    batch: Vec<WriteOp>,
    counted: Pending,
    acks: &mut Vec<oneshot::Sender<()>>,
    stop: &mut bool,
) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO entries (key, namespace, route, model, status, headers, body, created_at,
                                  expires_at, prompt_tokens, completion_tokens, total_tokens, size)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (key) DO UPDATE SET
                namespace = excluded.namespace, route = excluded.route, model = excluded.model,
                status = excluded.status, headers = excluded.headers, body = excluded.body,
                created_at = excluded.created_at, expires_at = excluded.expires_at,
                prompt_tokens = excluded.prompt_tokens,
                completion_tokens = excluded.completion_tokens,
                total_tokens = excluded.total_tokens, size = excluded.size",
        )?;
        let mut hit = tx.prepare_cached(
            "UPDATE entries SET hit_count = hit_count + ?2, last_hit_at = max(coalesce(last_hit_at, 0), ?3)
             WHERE key = ?1",
        )?;
        for op in batch {
            match op {
                WriteOp::Put(e) => {
                    // Serializing string pairs cannot fail.
                    let headers =
                        serde_json::to_string(&e.header_pairs()).unwrap_or_else(|_| "[]".into());
                    put.execute(params![
                        e.key.to_hex(),
                        e.namespace,
                        e.route.as_str(),
                        e.model,
                        e.status,
                        headers,
                        &e.body[..],
                        e.created_at,
                        e.expires_at,
                        tokens_to_sql(e.usage.prompt_tokens),
                        tokens_to_sql(e.usage.completion_tokens),
                        tokens_to_sql(e.usage.total_tokens),
                        i64::try_from(e.size()).unwrap_or(i64::MAX),
                    ])?;
                }
                WriteOp::Flush(ack) => acks.push(ack),
                WriteOp::Shutdown(ack) => {
                    acks.push(ack);
                    *stop = true;
                }
            }
        }
        // After the puts, so a hit on an entry stored in the same batch finds its row.
        for (key, tally) in counted.hits {
            hit.execute(params![key.to_hex(), tally.count, tally.last_at])?;
        }
        let mut count = tx.prepare_cached(
            "INSERT INTO counters (route, model, requests, hits, coalesced, misses, bypasses,
                                   upstream_calls, upstream_429s, saved_prompt_tokens,
                                   saved_completion_tokens, partials, inputs, inputs_saved)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT (route, model) DO UPDATE SET
                requests = requests + excluded.requests, hits = hits + excluded.hits,
                coalesced = coalesced + excluded.coalesced, misses = misses + excluded.misses,
                bypasses = bypasses + excluded.bypasses,
                upstream_calls = upstream_calls + excluded.upstream_calls,
                upstream_429s = upstream_429s + excluded.upstream_429s,
                saved_prompt_tokens = saved_prompt_tokens + excluded.saved_prompt_tokens,
                saved_completion_tokens = saved_completion_tokens + excluded.saved_completion_tokens,
                partials = partials + excluded.partials, inputs = inputs + excluded.inputs,
                inputs_saved = inputs_saved + excluded.inputs_saved",
        )?;
        let rows = counted.counters.into_iter().flat_map(|(route, models)| {
            models.into_iter().map(move |(m, c)| (route.clone(), m, c))
        });
        for (route, model, c) in rows {
            count.execute(params![
                route,
                model,
                c.requests,
                c.hits,
                c.coalesced,
                c.misses,
                c.bypasses,
                c.upstream_calls,
                c.upstream_429s,
                c.saved_prompt_tokens,
                c.saved_completion_tokens,
                c.partials,
                c.inputs,
                c.inputs_saved
            ])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryMeta;
    use http::{HeaderMap, StatusCode};

    #[test]
    fn counts_from_many_threads_are_all_taken() {
        let pending = SharedPending::new();
        let key = CacheKey::from_hex(&"ab".repeat(32)).expect("hex");
        let hit = Counts {
            requests: 1,
            hits: 1,
            saved_completion_tokens: 7,
            ..Counts::default()
        };
        let miss = Counts {
            requests: 1,
            misses: 1,
            ..Counts::default()
        };
        std::thread::scope(|scope| {
            for t in 0..PENDING_SHARDS as i64 + 3 {
                let pending = &pending;
                scope.spawn(move || {
                    for _ in 0..100 {
                        pending.with(|p| {
                            p.hit(key, 1_000 + t, "chat.completions", "m", &hit);
                            p.count("chat.completions", "m", &miss);
                        });
                    }
                });
            }
        });
        let threads = PENDING_SHARDS as i64 + 3;
        let taken = pending.take();
        assert_eq!(taken.hits[&key].count, 100 * threads);
        assert_eq!(taken.hits[&key].last_at, 1_000 + threads - 1);
        // The hits' counts join the other counts of their route and model.
        let counted = taken.counters["chat.completions"]["m"];
        assert_eq!(
            (counted.requests, counted.hits, counted.misses),
            (200 * threads, 100 * threads, 100 * threads)
        );
        assert_eq!(counted.saved_completion_tokens, 700 * threads);
        assert!(pending.take().is_empty(), "taking empties every shard");
    }

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
}
