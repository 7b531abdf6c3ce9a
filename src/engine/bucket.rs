//! Buckets: several answers under one key, for sampled requests.
//!
//! A request asks for a bucket of N answers with `llm-dedup-bucket: N`, or gets `--bucket N`
//! when it samples ([`crate::key::is_sampled`]). Answer i (from 0) of a key is stored under
//! [`CacheKey::slot`]`(i)`: the first under the key itself, so a bucket grows beside an answer
//! stored before, and a request without a bucket reads that first answer as ever. Every tier
//! holds each answer as an entry of its own, with its own lifetime; the entry names its bucket
//! ([`Slot`]) so that the inspector can show a bucket whole and a purge of the key removes it
//! whole.
//!
//! While fewer than N answers are in memory, a request leads the flight of the first missing
//! answer no flight is fetching yet, so concurrent requests into a bucket each fetch an answer
//! of their own, up to the number missing; beyond that they join those flights, as identical
//! requests always do. A leader looks for its answer in Redis and on disk first (a bucket
//! filled by another replica, or before a restart, is read back one answer a request, each a
//! hit), and calls the upstream only when none is stored. Once N are in memory, one is served
//! at random, never the one served last for that key when there is another.

use std::sync::Arc;
use std::time::SystemTime;

use super::Engine;
use super::classify::Outbound;
use crate::answer::Answer;
use crate::controls::CacheControls;
use crate::entry::{EntryMeta, Slot, StoredAnswer};
use crate::error::Error;
use crate::headers::BUCKET_HEADER;
use crate::key::CacheKey;

/// Buckets whose last served answer is remembered (a few dozen bytes each).
const SERVED_REMEMBERED: u64 = 65_536;

/// Which answer of each bucket was served last, so that the next repeat gets another.
pub(super) struct Served(moka::sync::Cache<CacheKey, u8>);

impl Default for Served {
    fn default() -> Served {
        Served(moka::sync::Cache::new(SERVED_REMEMBERED))
    }
}

impl Served {
    /// One of the `stored` answers of `bucket` (at least one), at random, and not the one
    /// served last when there is another.
    fn pick(
        &self,
        bucket: CacheKey,
        stored: &[(u8, Arc<StoredAnswer>)],
    ) -> (u8, Arc<StoredAnswer>) {
        let last = self.0.get(&bucket);
        let choices: Vec<&(u8, Arc<StoredAnswer>)> = stored
            .iter()
            .filter(|(index, _)| stored.len() == 1 || Some(*index) != last)
            .collect();
        let (index, entry) = choices[rand::random_range(0..choices.len())];
        self.0.insert(bucket, *index);
        (*index, entry.clone())
    }
}

impl Engine {
    /// How many answers a request keeps under its key: what its header asks, else `--bucket`
    /// when it samples, else one.
    pub(super) fn bucket_size(&self, controls: &CacheControls, sampled: bool) -> u8 {
        match controls.bucket {
            Some(size) => size,
            None if sampled => self.bucket,
            None => 1,
        }
    }

    /// The path of a request into a bucket of `size` answers (more than one) under
    /// `meta.key`: a stored answer at random once the bucket is full, else a fetch of a
    /// missing one.
    pub(super) async fn from_bucket(
        self: &Arc<Self>,
        out: Outbound,
        meta: EntryMeta,
        controls: &CacheControls,
        size: u8,
    ) -> Result<Answer, Error> {
        let bucket = meta.key;
        // Memory only: an answer only Redis or the disk holds is found by the leader of its
        // place (and then served as a hit), so a request reads those tiers for one answer at
        // most, and one that joins a flight reads them not at all.
        let mut stored: Vec<(u8, Arc<StoredAnswer>)> = Vec::with_capacity(size.into());
        for index in 0..size {
            if let Some(entry) = self
                .lookup_memory(&bucket.slot(index), controls.max_age)
                .await
            {
                stored.push((index, entry));
            }
        }
        let may_read = !controls.no_cache && self.may_share(&out.partition);
        let full = stored.len() == usize::from(size);
        if may_read && (full || (controls.only_if_cached && !stored.is_empty())) {
            let (index, entry) = self.served.pick(bucket, &stored);
            return Ok(placed(self.hit(&entry, SystemTime::now()), index, size));
        }
        let missing: Vec<u8> = (0..size)
            .filter(|index| stored.iter().all(|(at, _)| at != index))
            .collect();
        let at = |index: u8| EntryMeta {
            key: bucket.slot(index),
            bucket: Slot::at(bucket, index),
            ..meta.clone()
        };
        if may_read && !controls.only_if_cached {
            // The first missing answer no flight fetches yet, led here.
            for &index in &missing {
                if let Some(flight) = self.flights.lead(&bucket.slot(index)) {
                    let answer = self.fly(out, at(index), controls, Some(flight)).await;
                    return answer.map(|answer| placed(answer, index, size));
                }
            }
        }
        // Every missing answer is being fetched (join one of those flights), or this request
        // must not read the cache (an answer of its own takes a place no answer holds, or
        // replaces one), or it only reads it (an answer on its way, else the first answer
        // from Redis or disk, as any request would).
        let in_flight = || {
            missing
                .iter()
                .copied()
                .find(|&index| self.flights.in_progress(&bucket.slot(index)).is_some())
        };
        let index = match (controls.only_if_cached, missing.len()) {
            (true, _) => in_flight().unwrap_or(0),
            (false, 0) => rand::random_range(0..size),
            (false, n) => missing[rand::random_range(0..n)],
        };
        let answer = self.beyond_memory(out, at(index), controls).await?;
        Ok(placed(answer, index, size))
    }
}

/// `answer`, saying which answer of its bucket it is (`llm-dedup-bucket: 2/3`) when it is one.
fn placed(mut answer: Answer, index: u8, size: u8) -> Answer {
    if answer.status.is_success() {
        answer.headers.insert(
            BUCKET_HEADER,
            http::HeaderValue::from_str(&format!("{}/{size}", index + 1))
                .unwrap_or_else(|_| http::HeaderValue::from_static("1")),
        );
    }
    answer
}
