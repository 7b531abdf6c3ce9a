//! The inspector's access to a cache file (the `sqlite` feature): [`Inspector`].

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, ToSql, params_from_iter};

use super::{EntrySummary, ExportedEntry, Group, InspectError, Selection, SortBy, Stats, hex};
use crate::counts::{COUNTERS, Counts};
use crate::entry::unix_ms;
use crate::key::CacheKey;
use crate::prices::PriceTable;
use crate::store::{self, PurgeRule, StoreError};

impl From<StoreError> for InspectError {
    fn from(e: StoreError) -> InspectError {
        InspectError::Store(Box::new(e))
    }
}

impl From<rusqlite::Error> for InspectError {
    fn from(e: rusqlite::Error) -> InspectError {
        InspectError::Sqlite(Box::new(e))
    }
}

/// An open cache database.
pub struct Inspector {
    pub(super) conn: Connection,
    path: PathBuf,
}

const SUMMARY_COLUMNS: &str = "key, namespace, route, model, size, hit_count, created_at, \
     expires_at, last_hit_at, bucket_of, bucket_slot, 1";

/// [`SUMMARY_COLUMNS`] of a whole bucket, grouped by `coalesce(bucket_of, key)`.
const BUCKET_COLUMNS: &str = "coalesce(bucket_of, key), min(namespace), min(route), min(model), \
     sum(size), sum(hit_count), min(created_at), max(expires_at), max(last_hit_at), NULL, 0, \
     count(*)";

/// The columns of a whole entry after its summary's.
const ENTRY_COLUMNS: &str = "status, headers, body, prompt_tokens, completion_tokens, total_tokens";

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<EntrySummary> {
    Ok(EntrySummary {
        key: r.get(0)?,
        namespace: r.get(1)?,
        route: r.get(2)?,
        model: r.get(3)?,
        size: r.get::<_, i64>(4)?.try_into().unwrap_or(0),
        hit_count: r.get::<_, i64>(5)?.try_into().unwrap_or(0),
        created_at: r.get(6)?,
        expires_at: r.get(7)?,
        last_hit_at: r.get(8)?,
        bucket_of: r.get(9)?,
        slot: r.get::<_, i64>(10)?.try_into().unwrap_or(0),
        answers: r.get::<_, i64>(11)?.try_into().unwrap_or(1),
    })
}

/// A whole entry: its summary, then [`ENTRY_COLUMNS`].
fn whole(r: &rusqlite::Row<'_>) -> rusqlite::Result<ExportedEntry> {
    let headers: String = r.get(13)?;
    let body: Vec<u8> = r.get(14)?;
    let tokens = |i: usize| -> rusqlite::Result<Option<u64>> {
        Ok(r.get::<_, Option<i64>>(i)?
            .and_then(|n| u64::try_from(n).ok()))
    };
    let (body, body_hex) = match String::from_utf8(body) {
        Ok(text) => (Some(text), None),
        Err(e) => (None, Some(hex(e.as_bytes()))),
    };
    Ok(ExportedEntry {
        summary: summary(r)?,
        status: r.get(12)?,
        headers: serde_json::from_str(&headers).unwrap_or_default(),
        body,
        body_hex,
        prompt_tokens: tokens(15)?,
        completion_tokens: tokens(16)?,
        total_tokens: tokens(17)?,
        other_answers: Vec::new(),
    })
}

impl Inspector {
    /// Opens an existing cache database (never creates one). A file that is not a database,
    /// or one written by a newer llm-dedup, is an error and is left untouched.
    pub fn open(path: &Path) -> Result<Inspector, InspectError> {
        if !path.is_file() {
            return Err(InspectError::Missing(path.to_owned()));
        }
        Inspector::create_or_open(path)
    }

    /// Opens the database of a running proxy to read its figures: read-only, no migrations
    /// (the proxy made them when it opened the file).
    pub fn open_read_only(path: &Path) -> Result<Inspector, InspectError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(Inspector {
            conn,
            path: path.to_owned(),
        })
    }

    /// Opens the cache database at `path`, creating it if there is none (for `import`).
    pub fn create_or_open(path: &Path) -> Result<Inspector, InspectError> {
        let conn = store::open_for_writing(path)?;
        Ok(Inspector {
            conn,
            path: path.to_owned(),
        })
    }

    /// Everything `stats` reports, read as one snapshot: a serving process that sweeps or
    /// commits meanwhile cannot make the counts disagree with each other.
    pub fn stats(&self) -> Result<Stats, InspectError> {
        let now = unix_ms(SystemTime::now());
        // A read-only transaction; dropping it at the end releases the snapshot.
        let snapshot = self.conn.unchecked_transaction()?;
        let c: &Connection = &snapshot;
        let (entries, entry_bytes, oldest, newest): (i64, i64, Option<i64>, Option<i64>) = c
            .query_row(
                "SELECT count(*), coalesce(sum(size), 0), min(created_at), max(created_at)
                 FROM entries",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
        let expired: i64 = c.query_row(
            "SELECT count(*) FROM entries WHERE expires_at <= ?1",
            [now],
            |r| r.get(0),
        )?;
        let meta_int = |name: &str| -> Result<Option<i64>, rusqlite::Error> {
            c.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
        };
        let sums: Vec<String> = Counts::COLUMNS
            .iter()
            .map(|c| format!("sum({c})"))
            .collect();
        let sums = sums.join(", ");
        let groups = |column: &str| -> Result<Vec<Group>, rusqlite::Error> {
            let sql = format!(
                "SELECT {column}, {sums} FROM counters
                 GROUP BY {column} ORDER BY sum(requests) DESC, {column}"
            );
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([], |r| {
                let mut values = [0i64; COUNTERS];
                for (i, v) in values.iter_mut().enumerate() {
                    *v = r.get(i + 1)?;
                }
                Ok(Group {
                    name: r.get(0)?,
                    counts: Counts::from_values(values),
                })
            })?;
            rows.collect()
        };
        let by_route = groups("route")?;
        let by_model = groups("model")?;
        let mut totals = Counts::default();
        for g in &by_route {
            totals.add(&g.counts);
        }
        let file_bytes = ["", "-wal"]
            .iter()
            .filter_map(|suffix| {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                std::fs::metadata(p).ok().map(|m| m.len())
            })
            .sum();
        let non_negative = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(Stats {
            database: self.path.display().to_string(),
            created_at: meta_int("created_at")?,
            file_bytes,
            entries: non_negative(entries),
            entry_bytes: non_negative(entry_bytes),
            expired_entries: non_negative(expired),
            oldest_entry_at: oldest,
            newest_entry_at: newest,
            max_disk_bytes: meta_int("max_disk")?.map(non_negative),
            evicted_expired: meta_int("evicted_expired")?.map_or(0, non_negative),
            evicted_for_size: meta_int("evicted_for_size")?.map_or(0, non_negative),
            totals,
            by_model,
            by_route,
            prices: PriceTable::built_in().info().clone(),
            live: None,
        })
    }

    /// Entries matching `selection`, in `order`, at most `limit`: one row a key, the answers
    /// of a bucket counted together.
    pub fn list(
        &self,
        selection: &Selection,
        order: SortBy,
        limit: Option<usize>,
    ) -> Result<Vec<EntrySummary>, InspectError> {
        let Condition {
            sql: condition,
            args,
            ..
        } = self.condition(selection)?;
        let order = match order {
            SortBy::Recent => "max(coalesce(last_hit_at, created_at)) DESC",
            SortBy::Hits => "sum(hit_count) DESC, max(coalesce(last_hit_at, created_at)) DESC",
            SortBy::Size => "sum(size) DESC",
        };
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let sql = format!(
            "SELECT {BUCKET_COLUMNS} FROM entries WHERE {condition}
             GROUP BY coalesce(bucket_of, key) ORDER BY {order} LIMIT {limit}"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(params_from_iter(args.iter()), summary)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The entry whose key is, or uniquely starts with, `prefix` (at least 4 hex digits), with
    /// the other answers of its bucket. The key of a bucket whose first answer is gone shows
    /// the first of those left.
    pub fn show(&self, prefix: &str) -> Result<ExportedEntry, InspectError> {
        let key = self.resolve(prefix)?;
        let bucket: String = self
            .conn
            .query_row(
                "SELECT coalesce(bucket_of, key) FROM entries WHERE key = ?1",
                [&key],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or_else(|| key.clone());
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM entries
             WHERE key = ?1 OR bucket_of = ?1 ORDER BY bucket_slot"
        ))?;
        let mut answers: Vec<ExportedEntry> = stmt
            .query_map([&bucket], whole)?
            .collect::<Result<_, _>>()?;
        if answers.is_empty() {
            return Err(InspectError::UnknownKey(key));
        }
        let at = answers
            .iter()
            .position(|a| a.summary.key == key)
            .unwrap_or(0);
        let mut entry = answers.remove(at);
        entry.other_answers = answers;
        Ok(entry)
    }

    /// The entry stored under `key` (64 hex digits), alone.
    pub(super) fn entry(&self, key: &str) -> Result<ExportedEntry, InspectError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SUMMARY_COLUMNS}, {ENTRY_COLUMNS} FROM entries WHERE key = ?1"
        ))?;
        stmt.query_row([key], whole).map_err(InspectError::from)
    }

    /// Removes the entries matching `selection` and returns them. An empty selection removes
    /// every entry. A serving proxy stops answering them within a second.
    pub fn purge(&mut self, selection: &Selection) -> Result<Vec<EntrySummary>, InspectError> {
        let Condition {
            sql: condition,
            args,
            rule,
        } = self.condition(selection)?;
        let tx = self.conn.transaction()?;
        let removed = {
            let mut stmt = tx.prepare(&format!(
                "DELETE FROM entries WHERE {condition} RETURNING {SUMMARY_COLUMNS}"
            ))?;
            let rows = stmt.query_map(params_from_iter(args.iter()), summary)?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        // Recorded even when nothing was removed yet: a serving proxy may have the answers it
        // selects in its write queue.
        store::record_purge(&tx, &rule)?;
        tx.commit()?;
        Ok(removed)
    }

    /// Number of entries, for progress reports.
    pub fn entry_count(&self) -> Result<u64, InspectError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM entries", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The full key for `prefix`.
    fn resolve(&self, prefix: &str) -> Result<String, InspectError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.len() < 4 || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InspectError::InvalidKey(prefix));
        }
        // A stored answer's key, or a bucket's (whose first answer may be gone).
        let mut stmt = self.conn.prepare(
            "SELECT key FROM entries WHERE key >= ?1 AND key < ?1 || 'g'
             UNION SELECT bucket_of FROM entries WHERE bucket_of >= ?1 AND bucket_of < ?1 || 'g'
             ORDER BY 1 LIMIT 3",
        )?;
        let matches = stmt
            .query_map([&prefix], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        match matches.len() {
            0 => Err(InspectError::UnknownKey(prefix)),
            1 => Ok(matches.into_iter().next().unwrap_or_default()),
            _ => Err(InspectError::AmbiguousKey { prefix, matches }),
        }
    }

    /// What `selection` selects, its key prefix resolved and its times made absolute.
    fn rule(&self, selection: &Selection) -> Result<PurgeRule, InspectError> {
        let now = unix_ms(SystemTime::now());
        Ok(PurgeRule {
            key: selection
                .key
                .as_deref()
                .map(|key| match CacheKey::from_hex(key.trim()) {
                    // A whole key is taken as it is, stored or not yet: a serving proxy may
                    // hold its answer in its write queue, and the purge must remove it there.
                    Some(whole) => Ok(whole.to_hex()),
                    None => self.resolve(key),
                })
                .transpose()?,
            model: selection.model.clone(),
            route: selection.route.clone(),
            created_before: selection
                .older_than
                .map(|age| now.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))),
            expired_by: selection.expired.then_some(now),
        })
    }

    /// A SQL condition and its arguments for `selection`, and what it selects.
    fn condition(&self, selection: &Selection) -> Result<Condition, InspectError> {
        let rule = self.rule(selection)?;
        let mut parts = vec!["1".to_owned()];
        let mut args: Vec<Box<dyn ToSql>> = Vec::new();
        let mut add = |column: &str, op: &str, value: Box<dyn ToSql>| {
            args.push(value);
            parts.push(format!("{column} {op} ?{}", args.len()));
        };
        if let Some(model) = &rule.model {
            add("model", "=", Box::new(model.clone()));
        }
        if let Some(route) = &rule.route {
            add("route", "=", Box::new(route.clone()));
        }
        if let Some(cutoff) = rule.created_before {
            add("created_at", "<", Box::new(cutoff));
        }
        if let Some(now) = rule.expired_by {
            add("expires_at", "<=", Box::new(now));
        }
        if let Some(key) = &rule.key {
            // Every answer of its bucket.
            args.push(Box::new(key.clone()));
            parts.push(format!("(key = ?{0} OR bucket_of = ?{0})", args.len()));
        }
        Ok(Condition {
            sql: parts.join(" AND "),
            args,
            rule,
        })
    }
}

/// A selection as SQL: a condition on `entries`, its arguments, and what it selects.
struct Condition {
    sql: String,
    args: Vec<Box<dyn ToSql>>,
    rule: PurgeRule,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    /// Another process (here a thread with its own connection) removes entries and counts
    /// them, one transaction each, while `stats` runs: every report must add up.
    #[test]
    fn stats_is_one_snapshot_while_another_connection_sweeps() {
        const ENTRIES: i64 = 400;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let inspector = Inspector::create_or_open(&path).expect("opened");
        let mut writer = store::open_for_writing(&path).expect("second connection");
        for i in 0..ENTRIES {
            writer
                .execute(
                    "INSERT INTO entries (key, namespace, route, status, headers, body,
                                          created_at, expires_at, size)
                     VALUES (?1, '', 'chat.completions', 200, '[]', x'7b7d', 0, ?2, 2)",
                    params![format!("{i:064x}"), i64::MAX],
                )
                .expect("inserted");
        }
        let sweeper = std::thread::spawn(move || {
            for i in 0..ENTRIES {
                let tx = writer.transaction().expect("begun");
                tx.execute("DELETE FROM entries WHERE key = ?1", [format!("{i:064x}")])
                    .expect("deleted");
                tx.execute(
                    "INSERT INTO meta (name, value) VALUES ('evicted_for_size', 1)
                     ON CONFLICT (name) DO UPDATE SET value = value + 1",
                    [],
                )
                .expect("counted");
                tx.commit().expect("committed");
            }
        });
        while !sweeper.is_finished() {
            let stats = inspector.stats().expect("stats");
            assert_eq!(
                stats.entries + stats.evicted_for_size,
                ENTRIES as u64,
                "{} entries and {} evicted",
                stats.entries,
                stats.evicted_for_size
            );
        }
        sweeper.join().expect("sweeper");
        assert_eq!(
            inspector.stats().expect("stats").evicted_for_size,
            ENTRIES as u64
        );
    }
}
