//! The inspector on a fleet's shared tier in Redis: `stats`, `list`, `show` and `purge` with
//! `--redis URL`, through the fleet's own access ([`crate::fleet::Admin`]).
//!
//! Redis keeps no hit counts: those stay in each replica's own figures. A purge deletes the
//! entries and announces it on the fleet's channel, so every replica drops its copies (memory
//! and local file) at once.

use super::{EntrySummary, ExportedEntry, InspectError, Selection};
use crate::entry::{StoredAnswer, unix_ms};
use crate::fleet::{Admin, AdminError, FleetSecret, RedisMode};
use crate::key::CacheKey;

/// What the fleet's tier holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetStats {
    /// The Redis server (without any password).
    pub redis: String,
    /// Masters read: 1 for a single node, every master of a cluster.
    pub masters: usize,
    /// Entries stored.
    pub entries: u64,
    /// Bytes of their values in Redis.
    pub value_bytes: u64,
    /// Entries and bytes by model.
    pub by_model: Vec<FleetGroup>,
    /// Entries and bytes by route.
    pub by_route: Vec<FleetGroup>,
    /// Values under entry names that were left out: not sealed with the fleet secret given,
    /// or not readable.
    pub untrusted: u64,
}

/// Entries of one model or route.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetGroup {
    /// The model or route.
    pub name: String,
    /// Entries.
    pub entries: u64,
    /// Bytes of their values.
    pub value_bytes: u64,
}

/// A connection to a fleet's Redis.
pub struct FleetInspector {
    admin: Admin,
}

fn failed(e: AdminError) -> InspectError {
    InspectError::Redis(e.to_string())
}

impl FleetInspector {
    /// Connects to the Redis at `url`, with a short timeout. With the fleet's `secret`,
    /// entries not sealed with it are left out (and counted in [`FleetStats::untrusted`]),
    /// and a purge is announced so that replicas holding the secret obey it.
    /// The node is asked whether it is one of a cluster; then every master is read.
    pub fn open(url: &str, secret: Option<&FleetSecret>) -> Result<FleetInspector, InspectError> {
        FleetInspector::open_as(url, secret, RedisMode::Auto)
    }

    /// As [`FleetInspector::open`], with the Redis taken as `mode` says (`--redis-mode`).
    pub fn open_as(
        url: &str,
        secret: Option<&FleetSecret>,
        mode: RedisMode,
    ) -> Result<FleetInspector, InspectError> {
        Ok(FleetInspector {
            admin: Admin::open(url, secret, mode).map_err(failed)?,
        })
    }

    /// Every entry, with the size of its value.
    fn entries(&mut self) -> Result<Vec<(StoredAnswer, u64)>, InspectError> {
        self.admin.entries().map_err(failed)
    }

    /// What the tier holds, by model and route.
    pub fn stats(&mut self) -> Result<FleetStats, InspectError> {
        let entries = self.entries()?;
        let group = |name_of: &dyn Fn(&StoredAnswer) -> String| {
            let mut groups: Vec<FleetGroup> = Vec::new();
            for (entry, bytes) in &entries {
                let name = name_of(entry);
                match groups.iter_mut().find(|g| g.name == name) {
                    Some(g) => {
                        g.entries += 1;
                        g.value_bytes += bytes;
                    }
                    None => groups.push(FleetGroup {
                        name,
                        entries: 1,
                        value_bytes: *bytes,
                    }),
                }
            }
            groups.sort_by(|a, b| b.entries.cmp(&a.entries).then(a.name.cmp(&b.name)));
            groups
        };
        Ok(FleetStats {
            redis: self.admin.server().to_owned(),
            masters: self.admin.masters(),
            entries: entries.len() as u64,
            value_bytes: entries.iter().map(|(_, b)| b).sum(),
            by_model: group(&|e| e.model.clone().unwrap_or_default()),
            by_route: group(&|e| e.route.as_str().to_owned()),
            untrusted: self.admin.untrusted(),
        })
    }

    /// Entries matching `selection`, newest first, at most `limit`.
    pub fn list(
        &mut self,
        selection: &Selection,
        limit: Option<usize>,
    ) -> Result<Vec<EntrySummary>, InspectError> {
        // One row a key: the answers of a bucket counted together.
        let mut buckets: std::collections::HashMap<CacheKey, EntrySummary> = Default::default();
        for (e, bytes) in self.entries()? {
            if !selected(&e, selection) {
                continue;
            }
            let key = bucket_of(&e);
            match buckets.entry(key) {
                std::collections::hash_map::Entry::Vacant(place) => {
                    let mut row = summary(&e, bytes);
                    (row.key, row.bucket_of, row.slot) = (key.to_hex(), None, 0);
                    place.insert(row);
                }
                std::collections::hash_map::Entry::Occupied(mut place) => {
                    let row = place.get_mut();
                    row.answers += 1;
                    row.size += bytes;
                    row.created_at = row.created_at.min(e.created_at);
                    row.expires_at = row.expires_at.max(e.expires_at);
                }
            }
        }
        let mut found: Vec<EntrySummary> = buckets.into_values().collect();
        found.sort_by_key(|e| std::cmp::Reverse(e.created_at));
        found.truncate(limit.unwrap_or(usize::MAX));
        Ok(found)
    }

    /// The one entry whose key starts with `prefix`.
    pub fn show(&mut self, prefix: &str) -> Result<ExportedEntry, InspectError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InspectError::InvalidKey(prefix));
        }
        let entries = self.entries()?;
        // A stored answer's key, or a bucket's (whose first answer may be gone).
        let named: std::collections::BTreeSet<CacheKey> = entries
            .iter()
            .filter_map(|(e, _)| {
                let bucket = bucket_of(e);
                if e.key.to_hex().starts_with(&prefix) {
                    Some(e.key)
                } else {
                    bucket.to_hex().starts_with(&prefix).then_some(bucket)
                }
            })
            .collect();
        if named.len() > 1 {
            return Err(InspectError::AmbiguousKey {
                prefix,
                matches: named.iter().take(5).map(CacheKey::to_hex).collect(),
            });
        }
        let Some(&key) = named.first() else {
            return Err(InspectError::UnknownKey(prefix));
        };
        let bucket = entries
            .iter()
            .find(|(e, _)| e.key == key)
            .map_or(key, |(e, _)| bucket_of(e));
        let mut answers: Vec<&(StoredAnswer, u64)> = entries
            .iter()
            .filter(|(e, _)| bucket_of(e) == bucket)
            .collect();
        answers.sort_by_key(|(e, _)| e.bucket.map_or(0, |slot| slot.index));
        let at = answers.iter().position(|(e, _)| e.key == key).unwrap_or(0);
        let (entry, bytes) = answers.remove(at);
        let mut shown = exported(entry, *bytes);
        shown.other_answers = answers.iter().map(|(e, b)| exported(e, *b)).collect();
        Ok(shown)
    }

    /// Removes the entries matching `selection` (all of them with `all`) and tells every
    /// replica; returns what was removed.
    pub fn purge(
        &mut self,
        selection: &Selection,
        all: bool,
    ) -> Result<Vec<EntrySummary>, InspectError> {
        let chosen: Vec<(StoredAnswer, u64)> = self
            .entries()?
            .into_iter()
            .filter(|(e, _)| all || selected(e, selection))
            .collect();
        let buckets: std::collections::HashSet<CacheKey> =
            chosen.iter().map(|(e, _)| bucket_of(e)).collect();
        if let Some(prefix) = &selection.key
            && buckets.len() > 1
            && !all
        {
            return Err(InspectError::AmbiguousKey {
                prefix: prefix.clone(),
                matches: chosen.iter().take(5).map(|(e, _)| e.key.to_hex()).collect(),
            });
        }
        let keys: Vec<_> = chosen.iter().map(|(e, _)| e.key).collect();
        let buckets: Vec<_> = buckets.into_iter().collect();
        self.admin.purge(&keys, &buckets, all).map_err(failed)?;
        Ok(chosen.iter().map(|(e, b)| summary(e, *b)).collect())
    }
}

fn selected(e: &StoredAnswer, s: &Selection) -> bool {
    let now = unix_ms(std::time::SystemTime::now());
    s.model.as_ref().is_none_or(|m| e.model.as_ref() == Some(m))
        && s.route.as_ref().is_none_or(|r| e.route.as_str() == r)
        && s.key.as_ref().is_none_or(|k| {
            // A key selects every answer of its bucket.
            let k = k.to_ascii_lowercase();
            e.key.to_hex().starts_with(&k) || bucket_of(e).to_hex().starts_with(&k)
        })
        && s.older_than.is_none_or(|age| {
            let ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
            e.created_at <= now.saturating_sub(ms)
        })
        && (!s.expired || e.expires_at <= now)
}

/// The key of the bucket an answer belongs to: its own, unless it is a later answer.
fn bucket_of(e: &StoredAnswer) -> CacheKey {
    e.bucket.map_or(e.key, |slot| slot.of)
}

fn summary(e: &StoredAnswer, bytes: u64) -> EntrySummary {
    EntrySummary {
        key: e.key.to_hex(),
        namespace: e.namespace.clone(),
        route: e.route.as_str().to_owned(),
        model: e.model.clone(),
        size: bytes,
        hit_count: 0,
        created_at: e.created_at,
        expires_at: e.expires_at,
        last_hit_at: None,
        bucket_of: e.bucket.map(|slot| slot.of.to_hex()),
        slot: e.bucket.map_or(0, |slot| slot.index),
        answers: 1,
    }
}

fn exported(e: &StoredAnswer, bytes: u64) -> ExportedEntry {
    let (body, body_hex) = match std::str::from_utf8(&e.body) {
        Ok(text) => (Some(text.to_owned()), None),
        Err(_) => (None, Some(super::hex(&e.body))),
    };
    ExportedEntry {
        summary: summary(e, bytes),
        status: e.status,
        headers: e
            .header_pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        body,
        body_hex,
        prompt_tokens: e.usage.prompt_tokens,
        completion_tokens: e.usage.completion_tokens,
        total_tokens: e.usage.total_tokens,
        other_answers: Vec::new(),
    }
}
