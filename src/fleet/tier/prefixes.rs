//! Prompt prefixes written in the provider's cache, across the fleet (`p:{digest}`): one
//! replica writes a cold prefix, the others' requests sharing it wait as a replica's own would
//! (`engine/prefixes.rs`).
//!
//! The key holds the writing replica's mark (sealed with the fleet secret, good for the wait's
//! bound) while its call has not answered, then `warm` for the provider's lifetime. A mark
//! this replica cannot trust is ignored (its requests go at once); a planted one delays a
//! request by at most `--prefix-wait`, a planted `warm` only spares it the wait. Redis down:
//! every replica holds on its own.

use std::sync::LazyLock;
use std::time::Duration;

use super::seal::{Rejected, Sealed};
use super::{Fleet, Unavailable};
use crate::fleet::PrefixTurn;

/// The value of a warm prefix.
const WARM: &[u8] = b"warm";

/// How often a replica looks whether another's prefix got written.
const POLL: Duration = Duration::from_millis(50);

static RELEASE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/release_lease.lua")));

/// This replica's mark on a prefix it writes.
pub struct PrefixMark {
    name: String,
    value: Vec<u8>,
    life: Duration,
}

impl Fleet {
    /// Takes the fleet's turn for the cold prefixes `digests` (longest first, each with its
    /// lifetime) of a request about to go upstream: it marks each that no replica writes
    /// (good for `wait`), and finds the longest one another replica writes now, to wait for.
    /// All in one round of calls sent together.
    pub async fn prefix_turn(
        &self,
        digests: &[([u8; 32], Duration)],
        wait: Duration,
    ) -> Result<PrefixTurn, Unavailable> {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let marks: Vec<PrefixMark> = digests
            .iter()
            .map(|(digest, life)| {
                let name = self.inner.layout.prefix(digest);
                let value = self.replica_mark(&name, wait);
                PrefixMark {
                    name,
                    value,
                    life: *life,
                }
            })
            .collect();
        // SET NX, and what the key holds when another has it: one per prefix, sent together
        // (each its own slot on a cluster).
        let asks: Vec<(String, Vec<u8>)> = marks
            .iter()
            .map(|m| (m.name.clone(), m.value.clone()))
            .collect();
        let answers: Vec<(Option<String>, Option<Vec<u8>>)> = self
            .call("prefix", |c| async move {
                let asks = asks.into_iter().map(|(name, value)| {
                    let mut c = c.clone();
                    async move {
                        let taken: Option<String> = redis::cmd("SET")
                            .arg(&name)
                            .arg(value)
                            .arg("NX")
                            .arg("PX")
                            .arg(ms)
                            .query_async(&mut c)
                            .await?;
                        let held: Option<Vec<u8>> = match taken {
                            Some(_) => None,
                            None => redis::cmd("GET").arg(&name).query_async(&mut c).await?,
                        };
                        Ok::<_, redis::RedisError>((taken, held))
                    }
                });
                futures_util::future::try_join_all(asks).await
            })
            .await?;
        let mut turn = PrefixTurn::default();
        for (mark, (taken, held)) in marks.into_iter().zip(answers) {
            if taken.is_some() {
                turn.marks.push(mark);
                continue;
            }
            if turn.other.is_some() {
                continue;
            }
            let writing = held.is_some_and(|v| {
                v != WARM
                    && self
                        .opened(Sealed::Lease, Rejected::Lease, &mark.name, &v)
                        .is_some()
            });
            if writing {
                turn.other = Some(mark.name);
            }
        }
        Ok(turn)
    }

    /// Waits until another replica's prefix (named `name`) is warm or no longer written (it
    /// failed, or its mark expired), or `wait` passed; a Redis fault ends the wait.
    pub async fn prefix_written(&self, name: &str, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            match self.prefix_state(name).await {
                Ok(Some(Held::Writing)) => tokio::time::sleep(POLL).await,
                _ => return,
            }
        }
    }

    /// This replica's call for the marked prefixes answered: each is warm for its lifetime.
    pub async fn prefix_warm(&self, marks: Vec<PrefixMark>) {
        for mark in marks {
            let ms = u64::try_from(mark.life.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            self.set_px(mark.name, WARM.to_vec(), ms).await;
        }
    }

    /// This replica's call for the marked prefixes failed: each mark goes, if still its own.
    pub async fn prefix_failed(&self, marks: Vec<PrefixMark>) {
        for mark in marks {
            let _: Result<i64, Unavailable> = self
                .run_script("prefix", &RELEASE, |s| {
                    s.key(mark.name).arg(mark.value);
                })
                .await;
        }
    }

    /// What the prefix under `name` is now: warm, written by a replica of the fleet, or
    /// nothing (a mark this replica cannot trust counts as nothing).
    async fn prefix_state(&self, name: &str) -> Result<Option<Held>, Unavailable> {
        Ok(match self.value_at("prefix", name).await? {
            None => None,
            Some(v) if v == WARM => Some(Held::Warm),
            Some(v) => self
                .opened(Sealed::Lease, Rejected::Lease, name, &v)
                .map(|_| Held::Writing),
        })
    }
}

enum Held {
    Warm,
    Writing,
}
