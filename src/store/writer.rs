//! The writer thread: the one owner of the write connection. It takes queued operations in
//! batches, commits each batch with the counts tallied meanwhile in one transaction, and runs
//! the store's upkeep between batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};

use rusqlite::{Connection, params, params_from_iter};
use tokio::sync::oneshot;

use super::HIT_FLUSH_INTERVAL;
use super::schema::purges_since;
use super::tally::{MAX_MODELS_PER_ROUTE, OTHER_MODELS, Pending, SharedPending};
use super::upkeep::Upkeep;
use crate::counts::Counts;
use crate::entry::StoredAnswer;
use crate::throttle::LogGate;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 1024;

/// What the writer is asked to do.
pub(super) enum WriteOp {
    Put(Arc<StoredAnswer>),
    /// Answer once everything queued before is committed.
    Flush(oneshot::Sender<()>),
    /// Commit everything queued before, answer, and stop.
    Shutdown(oneshot::Sender<()>),
    /// Remove these entries (all of them with `None`); with `true`, every answer of their
    /// buckets too.
    Remove(Option<Vec<crate::key::CacheKey>>, bool),
    /// Make the write connection read-only (`true`) or writable again: a file that turns
    /// read-only, as a test needs it.
    #[cfg(test)]
    ReadOnly(bool),
}

/// Runs the writer until every sender is gone (the store was dropped) or a shutdown; either
/// way, what was queued and counted before is committed first.
///
/// # Faults
///
/// A batch that cannot be committed (the file turned read-only, another writer holds the lock
/// past the busy timeout, the disk is full) is counted in [`Queue::errors`], logged at most
/// once a minute, and kept: its answers and counts go again with the next batch, until the
/// fault clears. What is kept stays within the queue's bound, since new answers are refused
/// while it is full ([`super::DiskStore::put`]).
pub(super) fn write_loop(
    conn: Connection,
    queue: Receiver<WriteOp>,
    pending: SharedPending,
    shared: Arc<Queue>,
    upkeep: Upkeep,
) {
    let mut writer = Writer {
        conn,
        pending,
        shared,
        upkeep,
        carried: Vec::new(),
        carried_counts: Pending::default(),
        failing_since: None,
        gate: LogGate::per_minute(),
    };
    loop {
        let mut batch = Vec::new();
        // While a sweep is under way, its next step is due as soon as this batch is committed.
        let wait = if writer.upkeep.trimming() {
            std::time::Duration::ZERO
        } else {
            HIT_FLUSH_INTERVAL
        };
        match queue.recv_timeout(wait) {
            Ok(op) => batch.push(op),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                writer.commit(Vec::new());
                break;
            }
        }
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        writer.shared.ops.fetch_sub(batch.len(), Ordering::Relaxed);
        writer.upkeep.run(&mut writer.conn);
        let done = writer.commit(batch);
        for ack in done.acks {
            let _ = ack.send(());
        }
        if done.stop {
            break;
        }
    }
}

/// What the request path and the writer share about the queue between them.
#[derive(Debug, Default)]
pub(super) struct Queue {
    /// Operations sent to the writer and not yet taken (for the metrics).
    pub ops: AtomicUsize,
    /// Bytes of answers sent to the writer and not yet written.
    pub bytes: AtomicU64,
    /// Writes that failed: batches that could not be committed, answers refused because the
    /// queue was full.
    pub errors: AtomicU64,
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    pending: SharedPending,
    shared: Arc<Queue>,
    upkeep: Upkeep,
    /// Answers of batches that could not be committed, to go with the next one.
    carried: Vec<Arc<StoredAnswer>>,
    /// Counts of batches that could not be committed.
    carried_counts: Pending,
    /// When commits started failing, while they do.
    failing_since: Option<std::time::Instant>,
    gate: LogGate,
}

/// What a batch asked of the writer besides its writes.
#[derive(Default)]
struct Done {
    /// Flushes and shutdowns to answer now that the batch is done with.
    acks: Vec<oneshot::Sender<()>>,
    /// A shutdown was among them.
    stop: bool,
}

impl Writer {
    /// Commits `batch`, the counts tallied meanwhile and whatever earlier failed batches left,
    /// in one transaction. Whether or not that succeeds, the flushes and the shutdown in
    /// `batch` are returned, so that nobody waits forever on a failed commit.
    fn commit(&mut self, batch: Vec<WriteOp>) -> Done {
        let mut done = Done::default();
        let mut puts = std::mem::take(&mut self.carried);
        for op in batch {
            match op {
                WriteOp::Put(entry) => puts.push(entry),
                WriteOp::Flush(ack) => done.acks.push(ack),
                WriteOp::Shutdown(ack) => {
                    done.acks.push(ack);
                    done.stop = true;
                }
                WriteOp::Remove(keys, buckets) => {
                    // Answers queued before the removal go with it.
                    let before = puts.len();
                    let mut dropped = 0;
                    puts.retain(|e| {
                        let keep = keys.as_ref().is_some_and(|keys| {
                            let of = e.bucket.map(|slot| slot.of).filter(|_| buckets);
                            !keys.contains(&e.key) && of.is_none_or(|of| !keys.contains(&of))
                        });
                        if !keep {
                            dropped += e.size();
                        }
                        keep
                    });
                    if puts.len() < before {
                        self.shared.bytes.fetch_sub(dropped, Ordering::Relaxed);
                    }
                    if let Err(e) = remove(&mut self.conn, keys.as_deref(), buckets) {
                        self.shared.errors.fetch_add(1, Ordering::Relaxed);
                        if let Some(held) = self.gate.open() {
                            tracing::error!(error = %e, failures_since_last_line = held,
                                "removing entries another replica replaced or purged failed");
                        }
                    }
                }
                #[cfg(test)]
                WriteOp::ReadOnly(on) => {
                    let _ = self.conn.pragma_update(None, "query_only", on);
                }
            }
        }
        let mut counted = self.pending.take();
        counted.absorb(std::mem::take(&mut self.carried_counts));
        if puts.is_empty() && counted.is_empty() {
            return done;
        }
        match write_all(&mut self.conn, &puts, &counted) {
            Ok(()) => {
                let written: u64 = puts.iter().map(|e| e.size()).sum();
                self.shared.bytes.fetch_sub(written, Ordering::Relaxed);
                if let Some(since) = self.failing_since.take() {
                    tracing::info!(
                        after = ?since.elapsed(),
                        "writing to the cache database works again; what was kept is written"
                    );
                }
            }
            Err(e) => {
                self.shared.errors.fetch_add(1, Ordering::Relaxed);
                self.failing_since
                    .get_or_insert_with(std::time::Instant::now);
                if let Some(held) = self.gate.open() {
                    tracing::error!(
                        error = %e,
                        answers = puts.len(),
                        failures_since_last_line = held,
                        "writing to the cache database failed; answers are served from memory \
                         and written once it works again"
                    );
                }
                self.carried = puts;
                self.carried_counts = counted;
            }
        }
        done
    }
}

/// Removes the entries under `keys` (with `buckets`, and the other answers of their buckets),
/// or every entry.
fn remove(
    conn: &mut Connection,
    keys: Option<&[crate::key::CacheKey]>,
    buckets: bool,
) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    match keys {
        None => {
            tx.execute("DELETE FROM entries", [])?;
        }
        Some(keys) => {
            let mut delete = tx.prepare_cached(if buckets {
                "DELETE FROM entries WHERE key = ?1 OR bucket_of = ?1"
            } else {
                "DELETE FROM entries WHERE key = ?1"
            })?;
            for key in keys {
                delete.execute([key.to_hex()])?;
            }
        }
    }
    tx.commit()
}

fn write_all(
    conn: &mut Connection,
    puts: &[Arc<StoredAnswer>],
    counted: &Pending,
) -> Result<(), rusqlite::Error> {
    // The write lock first (waiting out another writer for the busy timeout): a transaction
    // that reads first would fail at once, not wait, when it came to write.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        // A purge made after an answer was stored, but before it is written here, removes it
        // too: another process purged while it waited in the queue.
        let oldest = puts.iter().map(|e| e.created_at).min();
        let purges = match oldest {
            Some(oldest) => purges_since(&tx, oldest)?,
            None => Vec::new(),
        };
        let purged = |e: &StoredAnswer| {
            purges
                .iter()
                .any(|(at, rule)| *at >= e.created_at && rule.matches(e))
        };
        let mut put = tx.prepare_cached(
            "INSERT INTO entries (key, namespace, route, model, status, headers, body, created_at,
                                  expires_at, prompt_tokens, completion_tokens, total_tokens, size,
                                  bucket_of, bucket_slot)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT (key) DO UPDATE SET
                namespace = excluded.namespace, route = excluded.route, model = excluded.model,
                status = excluded.status, headers = excluded.headers, body = excluded.body,
                created_at = excluded.created_at, expires_at = excluded.expires_at,
                prompt_tokens = excluded.prompt_tokens,
                completion_tokens = excluded.completion_tokens,
                total_tokens = excluded.total_tokens, size = excluded.size,
                bucket_of = excluded.bucket_of, bucket_slot = excluded.bucket_slot",
        )?;
        for e in puts.iter().filter(|e| !purged(e)) {
            // Serializing string pairs cannot fail.
            let headers = serde_json::to_string(&e.header_pairs()).unwrap_or_else(|_| "[]".into());
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
                e.bucket.map(|slot| slot.of.to_hex()),
                e.bucket.map_or(0, |slot| slot.index),
            ])?;
        }
        // After the puts, so a hit on an entry stored in the same batch finds its row.
        let mut hit = tx.prepare_cached(
            "UPDATE entries SET hit_count = hit_count + ?2, last_hit_at = max(coalesce(last_hit_at, 0), ?3)
             WHERE key = ?1",
        )?;
        for (key, tally) in &counted.hits {
            hit.execute(params![key.to_hex(), tally.count, tally.last_at])?;
        }
        let mut count = tx.prepare_cached(&add_counts_sql())?;
        for (route, models) in &counted.counters {
            for (model, counts) in models {
                let model = counter_model(&tx, route, model)?;
                let values = counts.values();
                let args = [route as &dyn rusqlite::ToSql, &model]
                    .into_iter()
                    .chain(values.iter().map(|v| v as &dyn rusqlite::ToSql));
                count.execute(params_from_iter(args))?;
            }
        }
    }
    tx.commit()
}

/// The model name `model`'s counters of `route` go to in the database: its own, unless the
/// route already has [`MAX_MODELS_PER_ROUTE`] other models counted; then [`OTHER_MODELS`].
fn counter_model<'a>(
    tx: &rusqlite::Transaction<'_>,
    route: &str,
    model: &'a str,
) -> Result<&'a str, rusqlite::Error> {
    let known: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM counters WHERE route = ?1 AND model = ?2)")?
        .query_row(params![route, model], |r| r.get(0))?;
    if known || model == OTHER_MODELS {
        return Ok(model);
    }
    let others: i64 = tx
        .prepare_cached("SELECT count(*) FROM counters WHERE route = ?1 AND model != ?2")?
        .query_row(params![route, OTHER_MODELS], |r| r.get(0))?;
    let full = usize::try_from(others).unwrap_or(usize::MAX) >= MAX_MODELS_PER_ROUTE;
    Ok(if full { OTHER_MODELS } else { model })
}

/// `INSERT ... ON CONFLICT DO UPDATE` that adds one row of [`Counts`] to the counters of a
/// route and model, with the route, the model and the counts' values as parameters.
fn add_counts_sql() -> String {
    let columns = Counts::COLUMNS;
    let placeholders: Vec<String> = (3..3 + columns.len()).map(|i| format!("?{i}")).collect();
    let updates: Vec<String> = columns
        .iter()
        .map(|c| format!("{c} = {c} + excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO counters (route, model, {}) VALUES (?1, ?2, {})
         ON CONFLICT (route, model) DO UPDATE SET {}",
        columns.join(", "),
        placeholders.join(", "),
        updates.join(", ")
    )
}

// SQLite integers are signed 64-bit; token counts never come near the limit.
fn tokens_to_sql(n: Option<u64>) -> Option<i64> {
    n.and_then(|n| i64::try_from(n).ok())
}
