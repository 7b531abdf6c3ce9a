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
//!   `now + reset`, late by the answer's own delay, never early); the next ends are foreseen
//!   a period apart (the longest reset seen, or the distance between two windows' ends if
//!   longer: a reset is said some time into its window, so the longest one seen can fall
//!   short of the period), and the first answer from a window replaces its foreseen end.
//!   A turn reserved in a later window is confirmed when it comes: if the answers since say
//!   the window before it ends later than foreseen, the turn waits for that end (a period
//!   foreseen a few milliseconds short, times the windows ahead, sent whole windows' worth
//!   of requests into the end of the window before).
//!
//! The fleet learns the shape from what all replicas' answers said. A refilling budget is whole
//! again `1/rate` later for each request spent; a window ends when it ends, whatever is spent.
//! So answers of one window whose ends agree (to a quarter of what refill would have moved
//! them) while what remains falls by two or more make the budget stepwise, before any
//! refusal (three replicas' first requests, one each, are enough: told later, each
//! replica's first guess of the pace, made as if the budget refilled, has reserved turns far
//! ahead). (A refusal says nothing of the shape here: replicas pacing a refilling budget
//! together run into one now and then.) More remaining than the answer before, with a
//! clearly shorter reset and in the same window (not a later one), makes it gradual again.
//! All of it is kept ten minutes after the last answer. A replica told the budget is
//! stepwise lets the fleet count it: its own estimate, made from its share of the answers,
//! stops holding requests back meanwhile. Turns reserved under one shape are void once the
//! fleet changes its mind, and so are turns reserved in windows it learns are much longer
//! than it foresaw (a first answer may come late in its window, and say a short reset):
//! those waiting for them ask again (`rule_changes`), at the latest when the turn comes.
//!
//! The same holds for gradual turns reserved at a pace a replica guessed from its first answer
//! (one request spent, whole again in a while: a slow guess when the budget is much larger):
//! once a replica asks at a pace at least twice as fast as any before, the turns reserved
//! ahead are void and asked for again at the new pace, instead of keeping requests waiting
//! behind them.

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
/// and `g_last` end, `g_most` and `g_least` remaining; `said_first`, the earliest end said of
/// the last window answers came from), whether the budget is `stepwise`, and how many times
/// turns already reserved were made void (`rule_changes`), and the `fastest` pace's interval
/// a replica asked with (turns reserved at a pace at most half as fast as a new record are
/// void too)). `ARGV[1]` says what to do:
///
/// - `turn`, now (ms), the pace's interval (ms, 0 for none), its burst, the longest wait
///   (ms). Returns `{what, ms, stepwise, changes}`:
///   `what` 0 the turn is reserved, go after `ms`; 1 paused, ask again after `ms`; 2 the turn
///   would come only after `ms`, longer than allowed (nothing reserved); `stepwise` 1 if the
///   fleet knows the budget is a fixed window; `changes` the rule changes so far.
/// - `learn`, now, what remains, the reset (ms), the limit (0 unknown).
/// - `confirm`, now, when the reserved turn was to come (ms), the rule changes it was
///   reserved under. Returns `{what, ms, ..}`: `what` 0 go; 1 wait `ms` (a pause, or the
///   window the turn is in begins later than foreseen), then confirm again; 2 ask for a turn
///   again (the rules it was reserved under were made void since).
static BUDGET: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local now = tonumber(ARGV[2])
local win = KEYS[4]
local kept = 600000
local w = redis.call('HMGET', win, 'left', 'end', 'ahead', 'limit', 'period', 'stepwise',
  'said', 'said_reset', 'said_end', 'rule_changes', 'said_first')
local wleft, wend, ahead = tonumber(w[1]), tonumber(w[2]), tonumber(w[3] or '0') or 0
local limit, period = tonumber(w[4]), tonumber(w[5]) or 0
local stepwise = w[6] == '1'

-- Brings the window's count to the window `now` is in: each window that ended took up to
-- `limit` of the turns reserved past it. The window's end is then foreseen, and no answer
-- from it has been heard yet.
local function roll()
  if wend and limit and limit >= 1 and period >= 1 and now >= wend then
    local passed = math.ceil((now - wend + 1) / period)
    local taken = math.min(math.max(ahead - (passed - 1) * limit, 0), limit)
    wleft = limit - taken
    ahead = math.max(ahead - passed * limit, 0)
    wend = wend + passed * period
    redis.call('HDEL', win, 'g_first', 'g_last', 'g_most', 'g_least')
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
  local was_period = period
  local cur = tonumber(redis.call('GET', KEYS[2]))
  if (not cur) or left < cur then
    redis.call('SET', KEYS[2], left, 'PX', reset)
  end
  -- What the gradual rules count as left: the least said, less the turns given since.
  local counted_left = cur and math.min(cur, left) or left
  if said_limit >= 1 then
    limit = said_limit
    redis.call('HSET', win, 'limit', limit)
  end
  if reset > period then period = reset end
  -- (A new window began: its answers are a new group.)
  roll()
  local rend = now + reset
  local slack = period / 2
  local g = redis.call('HMGET', win, 'g_first', 'g_last', 'g_most', 'g_least')
  local g_first, g_last = tonumber(g[1]), tonumber(g[2])
  local g_most, g_least = tonumber(g[3]), tonumber(g[4])
  -- The period is the longest reset seen, or the distance between the ends of two windows
  -- one period apart if longer (a reset is said some time into its window, never at its very
  -- start): a period too short would start the next windows too early.
  local said_first = tonumber(w[11])
  if said_first and period >= 1 and rend > said_first + slack then
    local apart = rend - said_first
    local windows = math.floor(apart / period + 0.5)
    if windows >= 1 and apart / windows > period and apart / windows < period * 1.1 then
      period = math.ceil(apart / windows)
      slack = period / 2
    end
  end
  if (not wleft) or (not wend) or rend > wend + slack then
    -- The first answer, or a window later than counted: as it says. Unless the counted
    -- window, foreseen too short, is part of it: then its turns are counted in it too.
    if wleft and wend and rend - period < wend then wleft = math.min(wleft, left)
    else wleft = left end
    wend = rend
    g_first, g_last, g_most, g_least = rend, rend, left, left
  elseif rend >= wend - slack then
    -- The same window: the least left (turns taken since are counted) and the earliest end
    -- said (each is late by its answer's delay, never early). An end only foreseen a period
    -- after the last one gives way to the first one said.
    wleft = math.min(wleft, left)
    wend = g_first and math.min(wend, rend) or rend
    g_first, g_last = math.min(g_first or rend, rend), math.max(g_last or rend, rend)
    g_most, g_least = math.max(g_most or left, left), math.min(g_least or left, left)
  end
  -- Otherwise the answer is from a window already over.
  if g_first and g_last and g_most and g_least then
    redis.call('HSET', win, 'g_first', g_first, 'g_last', g_last, 'g_most', g_most,
      'g_least', g_least, 'said_first', g_first)
  else
    g_first, g_last, g_most, g_least = rend, rend, left, left
  end
  -- The shape. A budget refilling at its limit per period is whole again 1/rate later for
  -- each request spent; a window ends when it ends, whatever was spent. So answers of one
  -- window whose ends agree while what remains falls by two or more show a window. More
  -- remaining than the answer before, with a clearly shorter reset, in the same window,
  -- shows a refill.
  local fell = g_most - g_least
  if limit and limit >= 1 and period >= 1 and fell >= 2
      and g_last - g_first < 0.25 * fell * period / limit then
    stepwise = true
  elseif stepwise and said and said_reset and said_end and left >= said + 2
      and reset < said_reset * 0.9 - 5 and rend <= said_end + slack then
    stepwise = false
  end
  if stepwise and w[6] ~= '1' then
    -- Turns given by the gradual rules whose answers are still to come are in this window.
    wleft = math.min(wleft, counted_left)
  end
  if stepwise ~= (w[6] == '1') or (stepwise and period > was_period * 1.1) then
    -- Turns reserved by the other shape's rules, or in windows foreseen much shorter than
    -- they are (two of them could fall in one), are void: those waiting for them ask again.
    redis.call('HINCRBY', win, 'rule_changes', 1)
    redis.call('DEL', KEYS[3])
    ahead = 0
  end
  redis.call('HSET', win, 'period', period, 'stepwise', stepwise and '1' or '0',
    'said', left, 'said_reset', reset, 'said_end', rend)
  save()
  return {0, 0, stepwise and 1 or 0, 0}
end

local shape = stepwise and 1 or 0
local changes = tonumber(w[10] or '0') or 0
local pause = redis.call('PTTL', KEYS[1])

if ARGV[1] == 'confirm' then
  -- A reserved turn has come (ARGV[3]: when it was to come; ARGV[4]: the rule changes when
  -- it was reserved). Reserved by rules since made void: ask again. Else wait out a pause,
  -- and a window that, as the answers since say, ends later than foreseen.
  if changes ~= tonumber(ARGV[4]) then return {2, 0, shape, changes} end
  local wait = math.max(pause, 0)
  if stepwise and wend and period >= 1 then
    roll()
    save()
    local at = tonumber(ARGV[3])
    if at > wend - period / 2 and now < wend then wait = math.max(wait, wend - now) end
  end
  return {wait > 0 and 1 or 0, math.ceil(wait), shape, changes}
end

local interval, burst, longest = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
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
local reserved = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
local fastest = tonumber(redis.call('HGET', win, 'fastest') or '0') or 0
if fastest <= 0 or interval < fastest then
  if fastest > 0 and interval * 2 <= fastest and reserved > now + tau + interval then
    -- Turns reserved ahead at a pace at most half this one (a replica's first guess, made
    -- from one answer) are void: those waiting for them ask again, at this pace.
    changes = redis.call('HINCRBY', win, 'rule_changes', 1)
    reserved = 0
  end
  redis.call('HSET', win, 'fastest', interval)
  redis.call('PEXPIRE', win, kept)
end
local tat = math.max(reserved, now)
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
    /// How many times turns already reserved were made void (the fleet changed its mind
    /// about the budget's shape, or learned its windows are much longer than it thought):
    /// a turn reserved before a change is asked for again (see [`Fleet::confirm_turn`]).
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

    /// Checks a turn reserved for `at` (see [`Budgeted::Go`]) when it comes, or while it is
    /// waited for; `changes` as the turn said. `None` when Redis cannot be used (the turn is
    /// taken as reserved).
    pub(crate) async fn confirm_turn(
        &self,
        partition: &Partition,
        at: SystemTime,
        changes: i64,
    ) -> Option<Confirmed> {
        let now = unix_ms(SystemTime::now());
        let (what, ms, _, _): (i64, i64, i64, i64) = self
            .run_script("budget", &BUDGET, |s| {
                s.key(self.budget_names(partition))
                    .arg("confirm")
                    .arg(now)
                    .arg(unix_ms(at))
                    .arg(changes);
            })
            .await
            .ok()?;
        Some(match what {
            0 => Confirmed::Go,
            1 => Confirmed::Wait(Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
            _ => Confirmed::AskAgain,
        })
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

#[cfg(test)]
#[path = "../../tests/common/redis_server.rs"]
mod redis_server;

#[cfg(test)]
mod tests {
    use super::*;

    use super::redis_server::RedisServer;

    /// The fleet tier on a `redis-server` of the test's own; `None` (the test skips) when it
    /// is not installed.
    fn fleet() -> Option<(RedisServer, Fleet)> {
        let server = RedisServer::start()?;
        let fleet = Fleet::new(&server.url(), None).expect("fleet");
        Some((server, fleet))
    }

    /// Whether the fleet counts a budget as a fixed window once it is told, in turn, of
    /// answers saying `(remaining of 10, reset in ms)`; `None` without `redis-server`.
    async fn stepwise_after(answers: &[(u64, u64)]) -> Option<bool> {
        let (_server, fleet) = fleet()?;
        let partition = Partition::from_bytes([7; 32]);
        for &(remaining, reset) in answers {
            let said = Said {
                limit: Some(10),
                remaining,
                reset: Duration::from_millis(reset),
            };
            fleet.learn_budget(&partition, said).await;
        }
        let turn = fleet
            .budget_turn(&partition, None, Duration::from_secs(30))
            .await
            .expect("redis answers");
        Some(turn.stepwise)
    }

    /// Three replicas each send one request at once into a fixed window of 10: the answers
    /// say 9, 8 and 7 remain and that the window ends at one instant. A refilling budget of
    /// 10 a second would have moved the second end 200 ms past the first: this is a window,
    /// told before a replica's first guess of the pace (one request spent, whole again in
    /// 0.7 s: 1.4 a second) reserves turns far ahead.
    #[tokio::test]
    async fn three_answers_of_one_window_show_a_window() {
        let shown = stepwise_after(&[(9, 701), (8, 700), (7, 700)]).await;
        assert!(shown.is_none_or(|stepwise| stepwise));
    }

    /// The same three requests against a bucket refilling at 10 a second: each answer's end
    /// is 100 ms later than the one before, for the request it spent. Still a refilling
    /// budget.
    #[tokio::test]
    async fn three_answers_of_a_bucket_do_not() {
        let shown = stepwise_after(&[(9, 100), (8, 200), (7, 300)]).await;
        assert!(shown.is_none_or(|stepwise| !stepwise));
    }

    /// Turns reserved ahead at a replica's first, slow guess of the pace (one a second) give
    /// way once a replica asks at a pace at least twice as fast (ten a second): its turn
    /// comes at once instead of behind them, and those waiting for the old turns ask again.
    /// A slow guess asked again later voids nothing.
    #[tokio::test]
    async fn turns_reserved_at_a_slow_guess_give_way_to_a_much_faster_pace() {
        let Some((_server, fleet)) = fleet() else {
            return;
        };
        let partition = Partition::from_bytes([8; 32]);
        let longest = Duration::from_secs(30);
        let ask = |per_second: f64| {
            let (fleet, pace) = (
                fleet.clone(),
                Pace {
                    per_second,
                    burst: 1.0,
                },
            );
            async move {
                let turn = fleet
                    .budget_turn(&partition, Some(pace), longest)
                    .await
                    .expect("redis answers");
                let Budgeted::Go(wait) = turn.turn else {
                    panic!("a turn: {:?}", turn.turn);
                };
                (wait, turn.changes)
            }
        };
        let mut slow = Vec::new();
        for _ in 0..5 {
            slow.push(ask(1.0).await);
        }
        let (last_wait, reserved_under) = slow[4];
        assert!(last_wait >= Duration::from_millis(3500), "{last_wait:?}");
        let (wait, changes) = ask(10.0).await;
        assert!(
            wait <= Duration::from_millis(200),
            "behind the slow turns: {wait:?}"
        );
        assert_ne!(changes, reserved_under);
        let at = SystemTime::now() + last_wait;
        let old = fleet.confirm_turn(&partition, at, reserved_under).await;
        assert_eq!(old, Some(Confirmed::AskAgain));
        // The fast turns stand when a slow guess asks again.
        let (_, after) = ask(1.0).await;
        assert_eq!(after, changes);
    }
}
