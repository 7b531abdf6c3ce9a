//! Export and import: every entry as one JSON line, and back.
//!
//! An export starts with a header line carrying the database's credential salt, so that an
//! import into an empty database makes per-credential keys match again. An import never
//! overwrites: keys already present are skipped.

use std::io::{BufRead, Write};

use rusqlite::ToSql;
use serde::{Deserialize, Serialize};

use std::time::SystemTime;

use super::{ExportedEntry, InspectError, Inspector, hex};
use crate::controls::MAX_TTL;
use crate::entry::{Slot, unix_ms};
use crate::headers::REPLAYED_HEADERS;
use crate::key::CacheKey;
use crate::route::{MAX_MODEL_CHARS, Route};
use crate::store;
use crate::usage::MAX_TOKENS;

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// Entries added.
    pub imported: u64,
    /// Entries skipped because their key was already present.
    pub skipped: u64,
    /// Entries left out because a value in them is out of range: stored in the future,
    /// expiring before they were stored or already expired, times no clock holds, a
    /// namespace no request could have.
    pub rejected: u64,
    /// The export came from a database with another credential salt and this one already had
    /// entries, so its salt was kept: imported entries stored per credential will not be found
    /// (those stored with `--shared-cache` will).
    pub salt_mismatch: bool,
}

/// The first line of an export: what it is, and the salt its keys were made with.
#[derive(Debug, Serialize, Deserialize)]
struct ExportHeader {
    format: String,
    version: u32,
    salt: String,
}

const EXPORT_FORMAT: &str = "llm-dedup-export";

impl Inspector {
    /// Writes every entry as one JSON line; calls `progress` after each. Returns the count.
    pub fn export(
        &self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, InspectError> {
        let header = ExportHeader {
            format: EXPORT_FORMAT.into(),
            version: 1,
            salt: hex(&store::load_or_create_salt(&self.conn)?),
        };
        serde_json::to_writer(&mut *out, &header).map_err(std::io::Error::from)?;
        out.write_all(b"\n")?;
        let mut stmt = self
            .conn
            .prepare("SELECT key FROM entries ORDER BY created_at")?;
        let keys = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut n = 0;
        for key in keys {
            // An entry purged meanwhile is simply not exported.
            let entry = match self.entry(&key) {
                Ok(e) => e,
                Err(InspectError::Sqlite(e))
                    if matches!(
                        e.downcast_ref::<rusqlite::Error>(),
                        Some(rusqlite::Error::QueryReturnedNoRows)
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            serde_json::to_writer(&mut *out, &entry).map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
            n += 1;
            progress(n);
        }
        out.flush()?;
        Ok(n)
    }

    /// Adds the entries of an export, skipping keys already present; calls `progress` after
    /// each line. Commits every [`IMPORT_CHUNK`] entries, so a serving proxy is never blocked
    /// for long. A malformed line stops the import with its line number; entries imported
    /// before it are kept.
    pub fn import(
        &mut self,
        input: &mut dyn BufRead,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ImportReport, InspectError> {
        let mut report = ImportReport::default();
        let was_empty = self.entry_count()? == 0;
        let mut lines = input.lines().enumerate();
        let mut finished = false;
        while !finished {
            let tx = self.conn.transaction()?;
            let mut outcome = Ok(());
            for _ in 0..IMPORT_CHUNK {
                let Some((i, line)) = lines.next() else {
                    finished = true;
                    break;
                };
                outcome = line
                    .map_err(InspectError::from)
                    .and_then(|line| import_line(&tx, i + 1, &line, was_empty, &mut report));
                if outcome.is_err() {
                    finished = true;
                    break;
                }
                progress(report.imported + report.skipped + report.rejected);
            }
            tx.commit()?;
            outcome?;
        }
        Ok(report)
    }
}

/// Entries an import commits at a time.
pub const IMPORT_CHUNK: usize = 500;

/// Imports one line of an export: the header (first line) or an entry.
fn import_line(
    tx: &rusqlite::Transaction<'_>,
    number: usize,
    line: &str,
    was_empty: bool,
    report: &mut ImportReport,
) -> Result<(), InspectError> {
    let bad = |message: String| InspectError::BadLine {
        line: number,
        message,
    };
    if line.trim().is_empty() {
        return Ok(());
    }
    if number == 1
        && let Ok(header) = serde_json::from_str::<ExportHeader>(line)
    {
        let salt = unhex(&header.salt).filter(|s| s.len() == 32);
        let Some(salt) = salt.filter(|_| header.format == EXPORT_FORMAT) else {
            return Err(bad("not an llm-dedup export header".into()));
        };
        if was_empty {
            // A new database adopts the salt its entries' keys were made with.
            tx.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('salt', ?1)",
                [&salt],
            )?;
        } else {
            report.salt_mismatch = store::load_or_create_salt(tx)?[..] != salt[..];
        }
        return Ok(());
    }
    let mut entry = parse_exported(line).map_err(bad)?;
    let body = match (&entry.body, &entry.body_hex) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(h)) => unhex(h).ok_or_else(|| bad("body_hex is not hex".into()))?,
        (None, None) => return Err(bad("no body".into())),
    };
    if let Err(why) = in_range(&mut entry, unix_ms(SystemTime::now())) {
        tracing::debug!(line = number, why, "import: entry left out");
        report.rejected += 1;
        return Ok(());
    }
    // Only the headers a hit may replay: whatever the file holds, no other header is kept.
    entry.headers.retain(|(name, _)| {
        REPLAYED_HEADERS
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r))
    });
    let s = &entry.summary;
    let headers = serde_json::to_string(&entry.headers).unwrap_or_else(|_| "[]".into());
    // The size the disk bound counts, as the proxy counts it (not as the file says).
    let header_bytes: usize = entry.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    let size = body.len() + header_bytes + s.namespace.len() + 160;
    let tokens = |n: Option<u64>| {
        n.map(|n| n.min(MAX_TOKENS))
            .and_then(|n| i64::try_from(n).ok())
    };
    let args: [&dyn ToSql; 17] = [
        &s.key,
        &s.namespace,
        &s.route,
        &s.model,
        &entry.status,
        &headers,
        &body,
        &s.created_at,
        &s.expires_at,
        &s.last_hit_at,
        &i64::try_from(s.hit_count).unwrap_or(i64::MAX),
        &tokens(entry.prompt_tokens),
        &tokens(entry.completion_tokens),
        &tokens(entry.total_tokens),
        &i64::try_from(size).unwrap_or(i64::MAX),
        &s.bucket_of,
        &s.slot,
    ];
    let inserted = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO entries (key, namespace, route, model, status, headers, body,
                created_at, expires_at, last_hit_at, hit_count, prompt_tokens,
                completion_tokens, total_tokens, size, bucket_of, bucket_slot)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )?
        .execute(&args[..])?;
    if inserted == 1 {
        report.imported += 1;
    } else {
        report.skipped += 1;
    }
    Ok(())
}

/// How far ahead of this machine's clock an exporting machine's may have been.
const CLOCK_SKEW_MS: i64 = 60_000;

/// Checks an entry's times and names against what a proxy could have stored at `now`, and
/// cuts what may be cut (a long model name, a last-hit time out of place). `Err` says why the
/// entry cannot be imported.
fn in_range(entry: &mut ExportedEntry, now: i64) -> Result<(), &'static str> {
    let s = &mut entry.summary;
    let max_ttl = i64::try_from(MAX_TTL.as_millis()).unwrap_or(i64::MAX);
    if s.created_at < 0 || s.created_at > now.saturating_add(CLOCK_SKEW_MS) {
        return Err("stored at a time out of range (before 1970 or in the future)");
    }
    if s.expires_at <= s.created_at || s.expires_at - s.created_at > max_ttl {
        return Err("expires before it was stored, or more than ten years after");
    }
    if s.expires_at <= now {
        return Err("already expired");
    }
    let valid_namespace =
        s.namespace.len() <= 128 && s.namespace.bytes().all(|b| b.is_ascii_graphic());
    if !valid_namespace {
        return Err("a namespace no request could have");
    }
    if s.last_hit_at
        .is_some_and(|at| at < s.created_at || at > now.saturating_add(CLOCK_SKEW_MS))
    {
        s.last_hit_at = None;
    }
    if let Some(model) = &mut s.model
        && let Some((cut, _)) = model.char_indices().nth(MAX_MODEL_CHARS)
    {
        model.truncate(cut);
    }
    Ok(())
}

fn parse_exported(line: &str) -> Result<ExportedEntry, String> {
    let mut entry: ExportedEntry = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if CacheKey::from_hex(&entry.summary.key).is_none() || entry.summary.key.len() != 64 {
        return Err(format!("{:?} is not a cache key", entry.summary.key));
    }
    let key = CacheKey::from_hex(&entry.summary.key);
    match (&entry.summary.bucket_of, entry.summary.slot) {
        (None, 0) => {}
        (Some(of), index) => {
            // An answer of a bucket is stored under the key derived for its place, and only
            // there would a request find it.
            let slot = CacheKey::from_hex(of).map(|of| Slot { of, index });
            if !slot.zip(key).is_some_and(|(slot, key)| slot.names(&key)) {
                return Err(format!(
                    "{:?} is not the key of answer {index} of bucket {of:?}",
                    entry.summary.key
                ));
            }
            entry.summary.bucket_of = Some(of.to_ascii_lowercase());
        }
        (None, index) => return Err(format!("answer {index} of no bucket")),
    }
    if Route::from_name(&entry.summary.route).is_none() {
        return Err(format!("unknown route {:?}", entry.summary.route));
    }
    if !(200..300).contains(&entry.status) {
        return Err(format!("status {} is not a stored answer", entry.status));
    }
    Ok(entry)
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)).as_deref(), Some(&bytes[..]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    use proptest::prelude::*;
    use serde_json::{Value, json};

    /// A valid export line with one field replaced by `value`.
    fn line(field: &str, value: Value) -> String {
        let mut entry = json!({
            "key": "ab".repeat(32), "namespace": "", "route": "chat.completions",
            "model": "m", "size": 10, "hit_count": 0, "created_at": 1_000,
            "expires_at": 2_000, "last_hit_at": null, "status": 200,
            "headers": [["content-type", "application/json"]], "body": "{}",
            "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2
        });
        entry[field] = value;
        entry.to_string()
    }

    fn json_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,40}".prop_map(Value::from),
            prop::collection::vec(("\\PC{0,8}", "\\PC{0,8}"), 0..4).prop_map(|pairs| json!(pairs)),
        ]
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config())]

        /// Fuzz target (e): no import line panics the parser, and what it lets through is in
        /// range.
        #[test]
        fn arbitrary_import_lines_never_panic_and_only_sane_entries_pass(
            field in prop::sample::select(vec![
                "key", "namespace", "route", "model", "size", "hit_count", "created_at",
                "expires_at", "last_hit_at", "status", "headers", "body", "prompt_tokens",
            ]),
            value in json_value(),
            junk in "\\PC{0,80}",
            now in 0i64..4_102_444_800_000,
        ) {
            for text in [line(field, value.clone()), junk.clone(), format!("{}{junk}", line(field, value))] {
                let Ok(mut entry) = parse_exported(&text) else { continue };
                if in_range(&mut entry, now).is_ok() {
                    let s = &entry.summary;
                    prop_assert!(s.created_at >= 0 && s.created_at <= now + CLOCK_SKEW_MS);
                    prop_assert!(s.expires_at > s.created_at && s.expires_at > now);
                    prop_assert!(s.model.as_ref().is_none_or(|m| m.chars().count() <= MAX_MODEL_CHARS));
                    prop_assert!((200..300).contains(&entry.status));
                }
            }
        }
    }
}
