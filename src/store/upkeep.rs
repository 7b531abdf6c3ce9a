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
}

impl Upkeep {
    pub(super) fn new(conn: &Connection, limits: StoreLimits, listener: PurgeListener) -> Upkeep {
        Upkeep {
            limits,
            listener,
            generation: purge_generation(conn).unwrap_or_default(),
            last_check: Instant::now(),
            last_sweep: Instant::now(),
        }
    }

    /// Runs what is due; cheap to call on every turn of the writer loop.
    pub(super) fn run(&mut self, conn: &mut Connection) {
        if self.last_check.elapsed() < HIT_FLUSH_INTERVAL {
            return;
        }
        self.last_check = Instant::now();
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
            self.last_sweep = Instant::now();
            match sweep(conn, self.limits.max_disk) {
                Ok(Swept {
                    expired: 0,
                    for_size: 0,
                }) => {}
                Ok(Swept { expired, for_size }) => {
                    tracing::info!(expired, for_size, "removed entries from the cache database")
                }
                Err(e) => tracing::error!(error = %e, "sweeping the cache database failed"),
            }
        }
    }
}

/// What one sweep removed.
struct Swept {
    expired: u64,
    for_size: u64,
}

/// Removes expired entries, then least recently used ones until the stored answers fit in
/// `max_disk`.
fn sweep(conn: &mut Connection, max_disk: Option<u64>) -> Result<Swept, rusqlite::Error> {
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
        let mut excess = total.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX));
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
                    excess = excess.saturating_sub(row.get::<_, i64>(1)?);
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
    Ok(Swept { expired, for_size })
}
