//! The fleet's rate budget: one Lua script per decision, so that replicas decide atomically.
//! See [`super`] for what is shared; the replica's own governor still decides first.
//!
//! # One line for the fleet
//!
//! A request the replica's own governor let go asks the fleet for its turn, and the script
//! *reserves* it: it answers how long to wait, and counts the request as sent at that time.
//! Turns are therefore handed out in the order requests ask, across every replica, with no
//! polling and no race between replicas when budget frees up: that is the fleet's notion of
//! who goes next. A reservation past the request's queue deadline is not made (the request
//! is answered `429`, as a full local queue would). A pause (after a refusal) reserves
//! nothing: it is waited out and the turn asked again.
//!
//! Redis gone while requests wait: a turn already reserved is waited for, then taken (the
//! replica's own governor let the request go before it asked); a request still asking goes
//! by its replica's governor alone.
//!
//! # The budget's two shapes (as in `governor/bucket.rs`, learned here for the fleet)
//!
//! - **Gradual** (a budget refilling continuously, as OpenAI's does): GCRA at the pace the
//!   asking replica learned (or was given with `--rpm`), with its burst; and what the
//!   upstream last said remains (`left`, expiring when the budget is whole again) is spent
//!   first: once it says nothing remains, turns come one interval apart.
//! - **Stepwise** (a fixed window, giving nothing back before it ends): the script counts the
//!   window itself: what remains in it and when it ends, corrected by every answer (the least
//!   remaining and the earliest end of answers from the same window; an answer whose window is
//!   already over is ignored). Once the window's budget is spent (or its last tenth begun:
//!   a request sent then could arrive in the next window), turns are reserved in the windows
//!   after it, `limit` to a window. A window's end is known from answers (their
//!   `now + reset`, late by the answer's own delay, never early); the next ends are a period
//!   (the longest reset seen) apart.
//!
//! The fleet learns the shape from what all replicas' answers said. A refilling budget is whole
//! again `1/rate` later for each request spent; a window ends when it ends, whatever is spent.
//! So answers of one window whose ends agree (to a quarter of what refill would have moved
//! them) while what remains falls by three or more make the budget stepwise, before any
//! refusal. (A refusal says nothing of the shape here: replicas pacing a refilling budget
//! together run into one now and then.) More remaining than the answer before, with a
//! clearly shorter reset and in the same window (not a later one), makes it gradual again.
//! All of it is kept ten minutes after the last answer. A replica told the budget is
//! stepwise lets the fleet count it: its own estimate, made from its share of the answers,
//! stops holding requests back meanwhile. Turns reserved under one shape are void once the
//! fleet changes its mind (`shape_changes`): those waiting for them ask again.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use super::Fleet;
use crate::entry::unix_ms;
use crate::governor::Pace;
use crate::key::Partition;

/// The fleet's budget of one partition. `KEYS`: the pause, what the upstream said is left
/// (gradual), the GCRA state of the pace, and the window's accounting (a hash: `left`, `end`,
/// `ahead` reserved past it, `limit`, `period`, the last answer's remaining, reset and end
/// (`said`, `said_reset`, `said_end`), the spread of the current window's answers (`g_first`
/// and `g_last` end, `g_most` and `g_least` remaining), whether the budget is `stepwise`, and
/// how many times that changed (`shape_changes`)). `ARGV[1]` says what to do:
///
/// - `turn`, now (ms), the pace's interval (ms, 0 for none), its burst, the longest wait
///   (ms). Returns `{what, ms, stepwise, changes}`:
///   `what` 0 the turn is reserved, go after `ms`; 1 paused, ask again after `ms`; 2 the turn
///   would come only after `ms`, longer than allowed (nothing reserved); `stepwise` 1 if the
///   fleet knows the budget is a fixed window; `changes` the shape's changes so far.
/// - `learn`, now, what remains, the reset (ms), the limit (0 unknown).
static BUDGET: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local now = tonumber(ARGV[2])
local win = KEYS[4]
local kept = 600000
local w = redis.call('HMGET', win, 'left', 'end', 'ahead', 'limit', 'period', 'stepwise',
  'said', 'said_reset', 'said_end', 'shape_changes')
local wleft, wend, ahead = tonumber(w[1]), tonumber(w[2]), tonumber(w[3] or '0') or 0
local limit, period = tonumber(w[4]), tonumber(w[5]) or 0
local stepwise = w[6] == '1'

-- Brings the window's count to the window `now` is in: each window that ended took up to
-- `limit` of the turns reserved past it.
local function roll()
  if wend and limit and limit >= 1 and period >= 1 and now >= wend then
    local passed = math.ceil((now - wend + 1) / period)
    local taken = math.min(math.max(ahead - (passed - 1) * limit, 0), limit)
    wleft = limit - taken
    ahead = math.max(ahead - passed * limit, 0)
    wend = wend + passed * period
  end
end

local function save()
  if wleft and wend then
    redis.call('HSET', win, 'left', wleft, 'end', wend, 'ahead', ahead)
  end
  redis.call('PEXPIRE', win, kept)
end

if ARGV[1] == 'learn' then
  local left, reset, said_limit = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local said, said_reset, said_end = tonumber(w[7]), tonumber(w[8]), tonumber(w[9])
  local cur = redis.call('GET', KEYS[2])
  if (not cur) or left < tonumber(cur) then
    redis.call('SET', KEYS[2], left, 'PX', reset)
  end
  if said_limit >= 1 then
    limit = said_limit
    redis.call('HSET', win, 'limit', limit)
  end
  if reset > period then
    period = reset
    redis.call('HSET', win, 'period', period)
  end
  local counted = wend
  roll()
  local rend = now + reset
  local slack = period / 2
  local g = redis.call('HMGET', win, 'g_first', 'g_last', 'g_most', 'g_least')
  local g_first, g_last = tonumber(g[1]), tonumber(g[2])
  local g_most, g_least = tonumber(g[3]), tonumber(g[4])
  if wend ~= counted then
    -- A new window began since the last answer: its answers are a new group.
    g_first, g_last, g_most, g_least = nil, nil, nil, nil
  end
  if (not wleft) or (not wend) or rend > wend + slack then
    -- The first answer, or a window later than counted: as it says.
    wleft, wend = left, rend
    g_first, g_last, g_most, g_least = rend, rend, left, left
  elseif rend >= wend - slack then
    -- The same window: the least left (turns taken since are counted) and the earliest end.
    wleft, wend = math.min(wleft, left), math.min(wend, rend)
    g_first, g_last = math.min(g_first or rend, rend), math.max(g_last or rend, rend)
    g_most, g_least = math.max(g_most or left, left), math.min(g_least or left, left)
  end
  -- Otherwise the answer is from a window already over.
  if g_first and g_last and g_most and g_least then
    redis.call('HSET', win, 'g_first', g_first, 'g_last', g_last, 'g_most', g_most,
      'g_least', g_least)
  else
    g_first, g_last, g_most, g_least = rend, rend, left, left
  end
  -- The shape. A budget refilling at its limit per period is whole again 1/rate later for
  -- each request spent; a window ends when it ends, whatever was spent. So answers of one
  -- window whose ends agree while what remains falls by three or more show a window. More
  -- remaining than the answer before, with a clearly shorter reset, in the same window,
  -- shows a refill.
  local fell = g_most - g_least
  if limit and limit >= 1 and period >= 1 and fell >= 3
      and g_last - g_first < 0.25 * fell * period / limit then
    stepwise = true
  elseif stepwise and said and said_reset and said_end and left >= said + 2
      and reset < said_reset * 0.9 - 5 and rend <= said_end + slack then
    stepwise = false
  end
  if stepwise ~= (w[6] == '1') then
    -- Turns reserved by the other shape's rules are void: those waiting for them ask again.
    redis.call('HINCRBY', win, 'shape_changes', 1)
    redis.call('DEL', KEYS[3])
  end
  redis.call('HSET', win, 'stepwise', stepwise and '1' or '0', 'said', left,
    'said_reset', reset, 'said_end', rend)
  save()
  return {0, 0, stepwise and 1 or 0, 0}
end

local interval, burst, longest = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local shape = stepwise and 1 or 0
local changes = tonumber(w[10] or '0') or 0
local pause = redis.call('PTTL', KEYS[1])
if pause > 0 then return {1, pause, shape, changes} end

if stepwise and wleft and wend and limit and limit >= 1 and period >= 1 then
  roll()
  local wait = 0
  -- Not in the window's last tenth: a request sent then may reach the upstream after the
  -- window ended, and count against the next one, already given out whole.
  if wleft >= 1 and now < wend - period / 10 then
    wleft = wleft - 1
  else
    wait = math.ceil(wend + math.floor(ahead / limit) * period - now)
    if wait > longest then
      save()
      return {2, wait, 1, changes}
    end
    ahead = ahead + 1
  end
  save()
  return {0, wait, 1, changes}
end

local left = redis.call('GET', KEYS[2])
local spent = left and tonumber(left) <= 0
if interval <= 0 then
  if spent then
    local reset = redis.call('PTTL', KEYS[2])
    if reset > 0 then return {1, reset, shape, changes} end
  end
  if left then redis.call('DECR', KEYS[2]) end
  return {0, 0, shape, changes}
end
local tau = interval * (burst - 1)
local tat = math.max(tonumber(redis.call('GET', KEYS[3]) or '0') or 0, now)
if spent then tat = math.max(tat, now + interval + tau) end
local wait = math.ceil(math.max(tat - tau - now, 0))
if wait > longest then return {2, wait, shape, changes} end
redis.call('SET', KEYS[3], tat + interval, 'PX', math.ceil(tat + interval - now) + 1000)
if left then redis.call('DECR', KEYS[2]) end
return {0, wait, shape, changes}
"#,
    )
});

/// A pause of the partition's budget, never shortened.
static PAUSE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
end
return 0
"#,
    )
});

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
    /// How many times the fleet changed its mind about the budget's shape (see
    /// [`Fleet::shape_changes`]).
    pub changes: i64,
}

/// What an answer said of the budget, as the fleet shares it.
#[derive(Debug, Clone, Copy)]
pub struct Said {
    /// The budget's size, if the answer said it.
    pub limit: Option<u64>,
    /// What remains of it.
    pub remaining: u64,
    /// How long until it is whole again.
    pub reset: Duration,
}

impl Fleet {
    /// Takes a turn for a request of `partition` in the fleet's line (see the module docs),
    /// waiting at most `longest`; `pace` is what this replica knows of the budget. `None` when
    /// Redis cannot be used (the replica's own governor decides alone).
    pub(crate) async fn budget_turn(
        &self,
        partition: &Partition,
        pace: Option<Pace>,
        longest: Duration,
    ) -> Option<BudgetTurn> {
        let now = unix_ms(SystemTime::now());
        let (interval, burst) = match pace {
            Some(p) if p.per_second > 0.0 => (1000.0 / p.per_second, p.burst.max(1.0)),
            _ => (0.0, 1.0),
        };
        let longest = u64::try_from(longest.as_millis()).unwrap_or(u64::MAX);
        let (what, ms, shape, changes): (i64, i64, i64, i64) = self
            .run_script("budget", &BUDGET, |s| {
                s.key(self.budget_names(partition))
                    .arg("turn")
                    .arg(now)
                    .arg(interval)
                    .arg(burst)
                    .arg(longest);
            })
            .await
            .ok()?;
        let wait = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        let turn = match what {
            0 => Budgeted::Go(wait),
            1 => Budgeted::Paused(wait),
            _ => Budgeted::Later(wait),
        };
        Some(BudgetTurn {
            turn,
            stepwise: shape == 1,
            changes,
        })
    }

    /// How many times the fleet changed its mind about the shape of `partition`'s budget
    /// (`None` when Redis cannot be used). A turn reserved before a change was reserved by
    /// the other shape's rules: whoever waits for one asks again.
    pub(crate) async fn shape_changes(&self, partition: &Partition) -> Option<i64> {
        let key = self.budget_name(partition, "win");
        let changes: Option<i64> = self
            .call("budget", |mut c| async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg("shape_changes")
                    .query_async(&mut c)
                    .await
            })
            .await
            .ok()?;
        Some(changes.unwrap_or(0))
    }

    /// Shares what an upstream answer to `partition` said of its budget.
    pub(crate) async fn learn_budget(&self, partition: &Partition, said: Said) {
        let now = unix_ms(SystemTime::now());
        let reset = u64::try_from(said.reset.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, 60_000);
        let _: Result<(i64, i64, i64, i64), ()> = self
            .run_script("budget", &BUDGET, |s| {
                s.key(self.budget_names(partition))
                    .arg("learn")
                    .arg(now)
                    .arg(said.remaining)
                    .arg(reset)
                    .arg(said.limit.unwrap_or(0));
            })
            .await;
    }

    /// How long the fleet's budget of `partition` stays paused (zero if it is not, or if
    /// Redis cannot be used).
    pub(crate) async fn paused_for(&self, partition: &Partition) -> Duration {
        let key = self.budget_name(partition, "pause");
        let ms: i64 = self
            .call("budget", |mut c| async move {
                redis::cmd("PTTL").arg(key).query_async(&mut c).await
            })
            .await
            .unwrap_or(0);
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }

    /// Pauses the fleet's budget of `partition` for `wait` (after a refusal).
    pub async fn pause(&self, partition: &Partition, wait: Duration) {
        let ms = wait.as_millis().clamp(1, 3_600_000) as u64;
        let key = self.budget_name(partition, "pause");
        let _: Result<i64, ()> = self
            .run_script("budget", &PAUSE, |s| {
                s.key(key).arg(ms);
            })
            .await;
    }

    /// The script's keys: the partition's hex written once for all four.
    fn budget_names(&self, partition: &Partition) -> Vec<String> {
        let base = self.budget_name(partition, "");
        ["pause", "left", "rpm", "win"]
            .iter()
            .map(|what| format!("{base}{what}"))
            .collect()
    }

    fn budget_name(&self, partition: &Partition, what: &str) -> String {
        let partition = blake3::Hash::from_bytes(*partition.as_bytes()).to_hex();
        format!("{}budget:{partition}:{what}", self.inner.prefix)
    }
}
