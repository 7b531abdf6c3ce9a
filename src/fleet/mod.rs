//! The tier shared by the replicas of a fleet, in Redis or Valkey (`--redis`).
//!
//! Everything Redis does here is an optimisation: a Redis error or timeout is a miss, never a
//! failed request. `replies` holds what the tier answers the engine (plain data); `tier`,
//! built with the `redis` feature only, is the tier itself, in rooms of one subject each:
//!
//! - `conn`: the connection and its fault rule (when the tier answers `Unavailable`);
//! - `topology`: one node or a cluster (`RedisMode`), and the connection each takes;
//! - `layout`: every key name and the events channel;
//! - `entries`: stored answers and the fleet's credential salt;
//! - `turns`: cross-replica flights, leases and turns ([`Turn`], [`Lease`]);
//! - `stream`: streams relayed live ([`Relay`], [`Followed`]);
//! - `events`: what replicas and the inspector tell each other, and the local waiters it
//!   wakes;
//! - `budget` (with `lua/budget.lua`): the shared rate budget;
//! - `prefixes`: prompt prefixes one replica writes in the provider's cache for the fleet;
//! - `codec`: the compact form of entries and error answers;
//! - `admin`: the inspector's blocking access;
//! - `seal`: the fleet secret, what it authenticates and what was not trusted.
//!
//! Without the `redis` feature, `off` stands in for the tier: a [`Fleet`] no engine can
//! hold, so the engine's fleet is always none and no Redis client is compiled.
//!
//! Only `tier` names the redis crate. Redis is a boundary: with a fleet secret every record
//! and message is sealed, and what fails its seal is ignored and counted; without one, a
//! replica trusts Redis entirely. A follower of a relayed stream whose Redis goes away
//! mid-stream ([`Ending::Lost`]) has passed on events it cannot take back, and only the leader
//! replica has the rest: with a fleet secret, the engine asks the `peer` address named in the
//! stream's sealed head for it, with a token made with the secret (never the client's
//! credentials).

mod replies;
#[cfg(feature = "redis")]
mod tier;

#[cfg(not(feature = "redis"))]
mod off;

pub(crate) use replies::{
    BudgetTurn, Budgeted, Confirmed, Ending, Event, PrefixTurn, Relayed, Turn,
};

#[cfg(not(feature = "redis"))]
pub(crate) use off::{Fleet, Followed, Lease, PrefixMark, Relay};
#[cfg(feature = "redis")]
pub(crate) use tier::{
    Admin, AdminError, Fleet, FleetSettings, Followed, Lease, PrefixMark, Relay, Seal,
};
#[cfg(feature = "redis")]
pub use tier::{FleetSecret, Layout, RedisMode, advertised_url, redis_address};
