//! The writer's periodic work besides committing: noticing a purge made by another process,
//! removing expired entries and keeping the stored answers under `--max-disk`.

use std::time::{Instant, SystemTime};

use rusqlite::{Connection, params};

use super::schema::purge_generation;
use super::{HIT_FLUSH_INTERVAL, PurgeListener, StoreLimits};
use crate::entry::unix_ms;

/// What is due when, and who to tell about a purge.
pub(super) struct Upkeep {
    limits: StoreLimits,
    listener: PurgeListener,
    generation: i64,
    last_check: Instant,
    last_sweep: Instant,
    /// The sweep under way, if one is: it removes a bounded step of entries per turn of the
    /// writer loop, each step in its own short transaction, so that answers and counts queued
    /// meanwhile are committed between steps instead of waiting for the whole sweep.
    trim: Option<Trim>,
}

impl Upkeep {
    pub(super) fn new(conn: &Connection, limits: StoreLimits, listener: PurgeListener) -> Upkeep {
        Upkeep {
            limits,
            listener,
            generation: purge_generation(conn).unwrap_or_default(),
            last_check: Instant::now(),
            last_sweep: Instant::now(),
            trim: None,
        }
    }

    /// A sweep is under way: the writer should come back without waiting for new work.
    pub(super) fn trimming(&self) -> bool {
        self.trim.is_some()
    }

    /// Runs what is due; cheap to call on every turn of the writer loop.
    pub(super) fn run(&mut self, conn: &mut Connection) {
        if let Some(trim) = self.trim.as_mut() {
            match trim.step(conn, self.limits.max_disk) {
                Ok(false) => {}
                Ok(true) => {
                    let Swept { expired, for_size } = trim.swept;
                    if expired + for_size > 0 {
                        tracing::info!(
                            expired,
                            for_size,
                            "removed entries from the cache database"
                        );
                    }
                    self.trim = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "sweeping the cache database failed");
                    self.trim = None;
                }
            }
        }
        if self.last_check.elapsed() < HIT_FLUSH_INTERVAL {
            return;
        }
        self.last_check = Instant::now();
        if let Ok(generation) = purge_generation(conn)
            && generation != self.generation
        {
            self.generation = generation;
            if let Ok(listener) = self.listener.lock()
                && let Some(listener) = listener.as_ref()
            {
                listener();
            }
        }
        if self.trim.is_none() && self.last_sweep.elapsed() >= self.limits.sweep_interval {
            self.last_sweep = Instant::now();
            self.trim = Some(Trim::default());
        }
    }
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy)]
struct Swept {
    expired: u64,
    for_size: u64,
}

/// Most entries removed in one step: the keys of one step are all a sweep holds in memory,
/// and one step's transaction is all it makes the writer wait for, however far over
/// `max_disk` the database is.
const EVICT_STEP: usize = 1_000;

/// A sweep in progress: expired entries first, then least recently used ones until the stored
/// answers fit in `max_disk`.
#[derive(Debug, Default)]
struct Trim {
    /// Bytes still to remove for size, once the expired entries are gone.
    excess: Option<i64>,
    swept: Swept,
}

impl Trim {
    /// Removes one step of entries; `true` when the sweep is done.
    fn step(
        &mut self,
        conn: &mut Connection,
        max_disk: Option<u64>,
    ) -> Result<bool, rusqlite::Error> {
        let tx = conn.transaction()?;
        let Some(excess) = self.excess else {
            let expired = tx.execute(
                "DELETE FROM entries WHERE key IN
                   (SELECT key FROM entries WHERE expires_at <= ?1 LIMIT ?2)",
                params![unix_ms(SystemTime::now()), EVICT_STEP as i64],
            )?;
            bump(&tx, "evicted_expired", expired as u64)?;
            tx.commit()?;
            self.swept.expired += expired as u64;
            if expired < EVICT_STEP {
                self.excess = Some(match max_disk {
                    Some(max) => {
                        let total: i64 = conn.query_row(
                            "SELECT coalesce(sum(size), 0) FROM entries",
                            [],
                            |r| r.get(0),
                        )?;
                        total.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX))
                    }
                    None => 0,
                });
            }
            return Ok(self.excess.is_some_and(|e| e <= 0));
        };
        let mut victims = Vec::with_capacity(EVICT_STEP);
        let mut left = excess;
        {
            let mut oldest = tx.prepare_cached(
                "SELECT key, size FROM entries ORDER BY coalesce(last_hit_at, created_at) LIMIT ?1",
            )?;
            let mut rows = oldest.query([EVICT_STEP as i64])?;
            while left > 0 {
                let Some(row) = rows.next()? else { break };
                victims.push(row.get::<_, String>(0)?);
                left = left.saturating_sub(row.get::<_, i64>(1)?);
            }
        }
        {
            let mut delete = tx.prepare_cached("DELETE FROM entries WHERE key = ?1")?;
            for key in &victims {
                delete.execute([key])?;
            }
        }
        bump(&tx, "evicted_for_size", victims.len() as u64)?;
        tx.commit()?;
        self.swept.for_size += victims.len() as u64;
        self.excess = Some(left);
        Ok(left <= 0 || victims.is_empty())
    }
}

/// Adds `n` to the counter `name` of the `meta` table.
fn bump(tx: &rusqlite::Transaction<'_>, name: &str, n: u64) -> Result<(), rusqlite::Error> {
    if n > 0 {
        tx.prepare_cached(
            "INSERT INTO meta (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        )?
        .execute(params![name, i64::try_from(n).unwrap_or(i64::MAX)])?;
    }
    Ok(())
}

/// A whole sweep at once, as the writer would make it over several turns.
#[cfg(test)]
fn sweep(conn: &mut Connection, max_disk: Option<u64>) -> Result<Swept, rusqlite::Error> {
    let mut trim = Trim::default();
    while !trim.step(conn, max_disk)? {}
    Ok(trim.swept)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database far over its bound (more victims than one step) loses its expired entries,
    /// then comes down to the bound, least recently used first.
    #[test]
    fn a_database_far_over_its_bound_is_swept_in_steps_expired_first_then_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::super::DiskStore::open(
            &dir.path().join("c.db"),
            super::super::StoreLimits::default(),
        )
        .expect("open");
        drop(store);
        let mut conn = Connection::open(dir.path().join("c.db")).expect("open");
        let n = 3 * EVICT_STEP as i64 + 7;
        let far = unix_ms(SystemTime::now()) + 3_600_000;
        for i in 0..n {
            conn.execute(
                "INSERT INTO entries (key, namespace, route, status, headers, body, created_at,
                 expires_at, size) VALUES (?1, '', 'chat.completions', 200, '[]', x'00', ?2, ?3, 100)",
                params![format!("{i:064x}"), i, far],
            )
            .expect("insert");
        }
        let expired = EVICT_STEP as i64 + 500;
        for i in 0..expired {
            conn.execute(
                "INSERT INTO entries (key, namespace, route, status, headers, body, created_at,
                 expires_at, size) VALUES (?1, '', 'chat.completions', 200, '[]', x'00', ?2, 1, 100)",
                params![format!("e{i:063x}"), n + i],
            )
            .expect("insert");
        }
        let swept = sweep(&mut conn, Some(100 * 500)).expect("sweep");
        assert_eq!(
            swept.expired, expired as u64,
            "expired entries go first, whatever their age"
        );
        assert_eq!(swept.for_size, (n - 500) as u64);
        let (left, oldest): (i64, i64) = conn
            .query_row("SELECT count(*), min(created_at) FROM entries", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("count");
        assert_eq!((left, oldest), (500, n - 500), "the newest 500 are kept");
    }
}
