//! Holding a request while a prefix it shares is being written (in phase 5, before a leader's
//! call; see `crate::prefix` for what a prefix is).
//!
//! The table knows, per prefix digest, whether a request in flight is writing it (sent
//! upstream, no byte of its answer yet) or whether it is warm (some request sharing it got its
//! answer within the provider's lifetime). A request about to go upstream looks up its
//! prefixes, longest first:
//!
//! - the longest one known is **warm**: it goes at once (a warm prefix is never held);
//! - the longest one known is being **written** by another: it waits for that request's
//!   first byte (streamed) or answer, its failure, or `--prefix-wait`, whichever comes first,
//!   then goes as it came (writing whatever longer prefixes it has that are still cold);
//! - none is known: it goes, and is the writer of its prefixes.
//!
//! Bounded: at most [`MAX_PREFIXES`] digests; past that, expired ones are swept, and if none
//! expired, new prefixes are not tracked (their requests go at once).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Engine;
use super::classify::Outbound;
use super::keying::KEY_OFF_THREAD;
use crate::fleet::{Fleet, PrefixMark};
use crate::prefix::{OPENAI_MIN_TOKENS, PrefixDigest, Prefixes};
use crate::route::Route;

/// How long a call waits by default while another writes a prefix it shares: about what a
/// provider takes to prefill a long prompt, so a hold rarely runs out before the writer's
/// first byte, and never costs more than that.
pub const DEFAULT_PREFIX_WAIT: Duration = Duration::from_secs(2);

/// The most prefix digests tracked at once (about 100 bytes each).
pub(super) const MAX_PREFIXES: usize = 100_000;

enum State {
    /// A request in flight is writing it; the sender says `true` once it is done (written or
    /// failed).
    Writing(Arc<watch::Sender<bool>>),
    /// Readable from the provider's cache until then.
    Warm(Instant),
}

/// The prefixes written and being written, by digest.
#[derive(Default)]
pub(super) struct PrefixTable {
    states: Arc<Mutex<HashMap<PrefixDigest, State>>>,
    /// When the table, full, was last swept of what expired (at most once a second).
    swept: Mutex<Option<Instant>>,
}

/// What a request about to go upstream does about its prefixes.
pub(super) enum Hold {
    /// Go now (nothing to write, the longest prefix is warm, or none is tracked).
    Go,
    /// Go now, writing these prefixes: others sharing them wait for this one.
    Write(Writer),
    /// Another request is writing the longest prefix this one shares: wait for it.
    Follow(watch::Receiver<bool>),
}

/// A request writing prefixes: once its answer starts, [`Writer::written`]; dropped before
/// that (the call failed), the prefixes are cold again and those waiting go.
pub(super) struct Writer {
    states: Arc<Mutex<HashMap<PrefixDigest, State>>>,
    /// The prefixes it writes, longest first.
    writing: Vec<(PrefixDigest, Duration)>,
    done: Arc<watch::Sender<bool>>,
    /// With `--redis`: this replica's marks on those it writes for the whole fleet.
    fleet: Option<(Fleet, Vec<PrefixMark>)>,
}

impl PrefixTable {
    /// What a request with `prefixes` does now. `follow`: whether it may wait for another
    /// writer (not once it has waited).
    pub(super) fn begin(&self, prefixes: &Prefixes, follow: bool) -> Hold {
        if prefixes.is_empty() {
            return Hold::Go;
        }
        let Ok(mut states) = self.states.lock() else {
            return Hold::Go;
        };
        let now = Instant::now();
        // The longest prefix known decides; those longer than it are cold.
        let mut cold = Vec::new();
        for (digest, life) in prefixes.iter().rev() {
            match states.get(digest) {
                Some(State::Warm(until)) if *until > now => break,
                Some(State::Writing(done)) if !*done.borrow() => {
                    if follow {
                        return Hold::Follow(done.subscribe());
                    }
                    break;
                }
                _ => cold.push((*digest, *life)),
            }
        }
        if cold.is_empty() {
            return Hold::Go;
        }
        if states.len() + cold.len() > MAX_PREFIXES {
            // Full: swept of what expired at most once a second (a sweep reads every entry
            // under the lock); meanwhile new prefixes are not tracked.
            let due = self.swept.lock().is_ok_and(|mut swept| {
                let due = swept.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
                if due {
                    *swept = Some(now);
                }
                due
            });
            if due {
                states.retain(|_, state| match state {
                    State::Warm(until) => *until > now,
                    State::Writing(done) => !*done.borrow(),
                });
            }
            if states.len() + cold.len() > MAX_PREFIXES {
                return Hold::Go;
            }
        }
        let (done, _) = watch::channel(false);
        let done = Arc::new(done);
        for (digest, _) in &cold {
            states.insert(*digest, State::Writing(done.clone()));
        }
        Hold::Write(Writer {
            states: self.states.clone(),
            writing: cold,
            done,
            fleet: None,
        })
    }

    /// Marks `prefixes` warm: a request carrying them got its answer (refreshing each one's
    /// lifetime, as the provider does on each read).
    pub(super) fn warm(&self, prefixes: &Prefixes) {
        if prefixes.is_empty() {
            return;
        }
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        let now = Instant::now();
        for (digest, life) in prefixes.iter() {
            // Another's write in progress stays its own to finish.
            if let Some(State::Writing(done)) = states.get(digest)
                && !*done.borrow()
            {
                continue;
            }
            if states.len() < MAX_PREFIXES || states.contains_key(digest) {
                states.insert(*digest, State::Warm(now + *life));
            }
        }
    }

    /// Prefix digests tracked now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.states.lock().map_or(0, |s| s.len())
    }
}

impl Engine {
    /// The prefixes of `out`, a request on `route` about to go upstream, that the provider
    /// caches; `None` when it has none. Taken on the way upstream only (a hit never pays for
    /// them), from the body parsed again: a large body on a blocking thread, as keying does.
    pub(super) async fn prefixes_of(
        &self,
        out: &Outbound,
        route: Route,
        model: Option<&str>,
    ) -> Option<Prefixes> {
        if !matches!(
            route,
            Route::ChatCompletions | Route::Responses | Route::AnthropicMessages
        ) || (out.body.len() as u64) / 4 < OPENAI_MIN_TOKENS
        {
            return None;
        }
        let (body, partition) = (out.body.clone(), out.partition);
        // The model as the request names it, in its body or (Azure) its path.
        let model = model.map(str::to_owned);
        let take = move || {
            let mut value: serde_json::Value = serde_json::from_slice(&body).ok()?;
            if let (Some(model), Some(fields)) = (model, value.as_object_mut()) {
                fields
                    .entry("model")
                    .or_insert(serde_json::Value::String(model));
            }
            Some(Prefixes::of(route, &value, body.len(), &partition))
        };
        let prefixes = if out.body.len() < KEY_OFF_THREAD {
            take()
        } else {
            tokio::task::spawn_blocking(take).await.ok().flatten()
        };
        prefixes.filter(|p| !p.is_empty())
    }
}

impl Writer {
    /// Takes the fleet's turn for the prefixes this one writes (with `--redis`): it writes
    /// for the fleet those no replica writes; if another replica writes one of them, it waits
    /// for that (at most `wait`), and says how long it waited. Redis down: no wait.
    pub(super) async fn across(&mut self, fleet: &Fleet, wait: Duration) -> Duration {
        let digests: Vec<([u8; 32], Duration)> =
            self.writing.iter().map(|(d, life)| (d.0, *life)).collect();
        let Ok(turn) = fleet.prefix_turn(&digests, wait).await else {
            return Duration::ZERO;
        };
        self.fleet = Some((fleet.clone(), turn.marks));
        let Some(other) = turn.other else {
            return Duration::ZERO;
        };
        let started = Instant::now();
        fleet.prefix_written(&other, wait).await;
        started.elapsed()
    }

    /// The answer started: the prefixes are readable from the provider's cache, and those
    /// waiting for them go, on this replica and on the others.
    pub(super) fn written(mut self) {
        let now = Instant::now();
        if let Ok(mut states) = self.states.lock() {
            for (digest, life) in &self.writing {
                states.insert(*digest, State::Warm(now + *life));
            }
        }
        if let Some((fleet, marks)) = self.fleet.take().filter(|(_, m)| !m.is_empty()) {
            tokio::spawn(async move { fleet.prefix_warm(marks).await });
        }
        // Drop, below, tells those waiting here.
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Ok(mut states) = self.states.lock() {
            // Not written (the call failed): cold again, unless written meanwhile.
            for (digest, _) in &self.writing {
                if let Some(State::Writing(done)) = states.get(digest)
                    && Arc::ptr_eq(done, &self.done)
                {
                    states.remove(digest);
                }
            }
        }
        self.done.send_replace(true);
        if let (Some((fleet, marks)), Ok(runtime)) = (
            self.fleet.take().filter(|(_, m)| !m.is_empty()),
            tokio::runtime::Handle::try_current(),
        ) {
            // Not written: the other replicas' requests need not wait for it any more.
            runtime.spawn(async move { fleet.prefix_failed(marks).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Partition;
    use crate::route::Route;
    use serde_json::json;

    fn prefixes(question: &str) -> Prefixes {
        let body = json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "word ".repeat(2000)},
            {"role": "user", "content": question}]});
        Prefixes::of(
            Route::ChatCompletions,
            &body,
            body.to_string().len(),
            &Partition::from_bytes([1; 32]),
        )
    }

    #[tokio::test]
    async fn the_first_writes_the_next_wait_for_its_first_byte_then_none_waits() {
        let table = PrefixTable::default();
        let Hold::Write(writer) = table.begin(&prefixes("one"), true) else {
            panic!("the first request writes");
        };
        let Hold::Follow(mut waiting) = table.begin(&prefixes("two"), true) else {
            panic!("the second shares the system prompt being written");
        };
        assert!(!*waiting.borrow());
        writer.written();
        assert!(*waiting.wait_for(|done| *done).await.expect("told"));
        // Warm now: nobody waits, nobody writes the shared part again.
        assert!(matches!(table.begin(&prefixes("one"), true), Hold::Go));
        let Hold::Write(third) = table.begin(&prefixes("three"), true) else {
            panic!("only its own longer prefix is cold");
        };
        assert_eq!(third.writing.len(), 1);
    }

    #[tokio::test]
    async fn a_failed_writer_lets_those_waiting_go_and_leaves_the_prefix_cold() {
        let table = PrefixTable::default();
        let Hold::Write(writer) = table.begin(&prefixes("one"), true) else {
            panic!("writes");
        };
        let Hold::Follow(mut waiting) = table.begin(&prefixes("two"), true) else {
            panic!("follows");
        };
        drop(writer);
        assert!(*waiting.wait_for(|done| *done).await.expect("told"));
        assert!(matches!(
            table.begin(&prefixes("two"), true),
            Hold::Write(_)
        ));
    }

    #[test]
    fn one_that_waited_does_not_wait_again() {
        let table = PrefixTable::default();
        let _writer = table.begin(&prefixes("one"), true);
        assert!(matches!(
            table.begin(&prefixes("two"), false),
            Hold::Write(_)
        ));
    }

    #[test]
    fn requests_of_no_prefix_go() {
        let table = PrefixTable::default();
        assert!(matches!(table.begin(&Prefixes::default(), true), Hold::Go));
        assert_eq!(table.len(), 0);
    }
}
