//! What the fleet tier answers the engine: a leader's turn, the budget's word, how a relayed
//! stream ended, what other replicas said happened. These are plain data,
//! the same whether or not this build speaks Redis (the `redis` feature): the engine handles
//! them alike, and without the feature no fleet exists to give any.

// Without the `redis` feature no tier gives these: the engine only matches them.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

use std::time::Duration;

use super::{Followed, Lease, PrefixMark};
use crate::answer::Refusal;
use crate::entry::StoredAnswer;
use crate::key::CacheKey;

/// What a leader's turn came to.
// Without the `redis` feature the handles it holds are empty stand-ins.
#[cfg_attr(not(feature = "redis"), allow(clippy::large_enum_variant))]
pub enum Turn {
    /// This replica leads: call the upstream, then [`Lease::finish`].
    Lead(Lease),
    /// Another replica stored the answer.
    Found(StoredAnswer),
    /// Another replica's call for the same partition was refused with this answer.
    Refused(Refusal),
    /// Another replica is receiving a streamed answer: follow it live.
    Live(Followed),
    /// Redis cannot be used now, or another replica's lease showed nothing for too long: go
    /// on alone.
    Alone,
}

/// What the fleet's budget said of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budgeted {
    /// Its turn is reserved: go after this wait (zero: now).
    Go(Duration),
    /// The budget is paused after a refusal: ask again after this.
    Paused(Duration),
    /// Its turn would come only after this, later than the longest wait allowed; nothing
    /// was reserved.
    Later(Duration),
}

/// A request's turn in the fleet's line, and what the fleet knows of the budget.
#[derive(Debug, Clone, Copy)]
pub struct BudgetTurn {
    /// The turn.
    pub turn: Budgeted,
    /// The fleet counts the budget as a fixed window.
    pub stepwise: bool,
    /// How many times turns already reserved were made void (the fleet changed its mind
    /// about the budget's shape, or learned its windows are much longer than it thought):
    /// a turn reserved before a change is asked for again (see [`Fleet::confirm_turn`](super::Fleet::confirm_turn)).
    pub changes: i64,
}

/// What the fleet says of a reserved turn when it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// Go now.
    Go,
    /// Not yet: the budget is paused after a refusal, or the window the turn is in begins
    /// later than foreseen when it was reserved (as answers since say). Wait this, and ask
    /// again.
    Wait(Duration),
    /// The turn was reserved by rules since made void (see [`BudgetTurn::changes`]): ask
    /// for a turn again.
    AskAgain,
}

/// What a follower reads next from a stream shared live.
pub enum Relayed {
    /// Events, in order.
    Events(Vec<bytes::Bytes>),
    /// The end: whether the stream completed.
    End(Ending),
}

/// How a shared stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// With its framing's success marker, as the leader received it.
    Complete,
    /// Failed at the leader (the upstream cut it or sent an error).
    Failed,
    /// Longer than `--max-stream`: no more is relayed.
    Cut,
    /// Redis, or the leader's connection to it, went away: the rest is only on the leader
    /// replica, at [`Followed::peer`] if it named where it can be reached.
    Lost,
}

impl Ending {
    /// How a relayed stream's end record says it.
    pub(super) fn as_bytes(self) -> &'static [u8] {
        match self {
            Ending::Complete => b"ok",
            Ending::Failed => b"err",
            Ending::Cut | Ending::Lost => b"cut",
        }
    }

    /// What an end record says.
    pub(super) fn read(said: &[u8]) -> Ending {
        match said {
            b"ok" => Ending::Complete,
            b"err" => Ending::Failed,
            _ => Ending::Cut,
        }
    }
}

/// What another replica (or the inspector) said happened, for the replica's listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The answer under this key was replaced (a `no-cache` refresh): copies held here are old.
    Replaced(CacheKey),
    /// The entry under this key was purged.
    Purged(CacheKey),
    /// Every entry was purged.
    PurgedAll,
}

/// Redis cannot be used now: a call failed or timed out (counted and logged), or Redis is
/// left alone after a failure. The caller goes on with its replica's own tiers and flights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the fleet's Redis cannot be used now")]
pub struct Unavailable;

/// This replica's marks on the prefixes it writes for the fleet, and the prefix another
/// replica writes that this one's request shares, if any (to wait for).
#[derive(Default)]
pub struct PrefixTurn {
    pub marks: Vec<PrefixMark>,
    pub other: Option<String>,
}
