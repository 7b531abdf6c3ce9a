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

use super::{Fleet, Unavailable};
use crate::entry::unix_ms;
use crate::fleet::{BudgetTurn, Budgeted, Confirmed};
use crate::governor::{BudgetReport, Pace, shape};
use crate::key::Partition;

/// The fleet's budget of one partition (`lua/budget.lua`, whose head documents its keys, the
/// fields of its hash and its answers).
static BUDGET: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/budget.lua")));

/// The longest pause of a budget, as the governor waits at most (`MAX_SERVER_WAIT`); the
/// script cuts a longer one (planted) to it.
const MAX_PAUSE_MS: u64 = 3_600_000;

/// A pause of the partition's budget, never shortened (`lua/pause.lua`).
static PAUSE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/pause.lua")));

/// The script's answer: `{what, ms, stepwise, changes}` (see `lua/budget.lua`).
struct Answer {
    what: i64,
    wait: Duration,
    stepwise: bool,
    changes: i64,
}

impl redis::FromRedisValue for Answer {
    fn from_redis_value(value: redis::Value) -> Result<Answer, redis::ParsingError> {
        let (what, ms, shape, changes): (i64, i64, i64, i64) =
            redis::FromRedisValue::from_redis_value(value)?;
        Ok(Answer {
            what,
            // Whatever Redis holds (a window's end or a count's reset planted years ahead),
            // no wait read from it is longer than the governor itself would wait.
            wait: Duration::from_millis(u64::try_from(ms).unwrap_or(0).min(MAX_PAUSE_MS)),
            stepwise: shape == 1,
            changes,
        })
    }
}

impl Answer {
    /// The answer to `turn`.
    fn turn(self) -> BudgetTurn {
        let turn = match self.what {
            0 => Budgeted::Go(self.wait),
            1 => Budgeted::Paused(self.wait),
            _ => Budgeted::Later(self.wait),
        };
        BudgetTurn {
            turn,
            stepwise: self.stepwise,
            changes: self.changes,
        }
    }

    /// The answer to `confirm`.
    fn confirmed(self) -> Confirmed {
        match self.what {
            0 => Confirmed::Go,
            1 => Confirmed::Wait(self.wait),
            _ => Confirmed::AskAgain,
        }
    }
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
        let keys = self.inner.layout.budget(partition);
        let answer: Answer = self
            .run_script("budget", &BUDGET, |s| {
                s.key(&keys[..])
                    .arg("turn")
                    .arg(now)
                    .arg(interval)
                    .arg(burst)
                    .arg(longest);
            })
            .await
            .ok()?;
        Some(answer.turn())
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
        let keys = self.inner.layout.budget(partition);
        let answer: Answer = self
            .run_script("budget", &BUDGET, |s| {
                s.key(&keys[..])
                    .arg("confirm")
                    .arg(now)
                    .arg(unix_ms(at))
                    .arg(changes);
            })
            .await
            .ok()?;
        Some(answer.confirmed())
    }

    /// Shares what an upstream answer to `partition` said of its request budget.
    pub(crate) async fn learn_budget(&self, partition: &Partition, said: BudgetReport) {
        self.learn_budget_at(partition, said, unix_ms(SystemTime::now()))
            .await;
    }

    /// [`Fleet::learn_budget`] as if told at `now` (Unix ms).
    async fn learn_budget_at(&self, partition: &Partition, said: BudgetReport, now: i64) {
        let Some(reset) = said.reset else {
            return;
        };
        let reset = u64::try_from(reset.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, 60_000);
        // Finite and non-negative, as the governor read them; counts are far below 2^53.
        let (remaining, limit) = (said.remaining as u64, said.limit.map_or(0, |l| l as u64));
        let keys = self.inner.layout.budget(partition);
        let _: Result<Answer, Unavailable> = self
            .run_script("budget", &BUDGET, |s| {
                s.key(&keys[..])
                    .arg("learn")
                    .arg(now)
                    .arg(remaining)
                    .arg(reset)
                    .arg(limit)
                    .arg(shape::MIN_FALL_SHARE)
                    .arg(shape::MIN_FALL)
                    .arg(shape::AGREEMENT);
            })
            .await;
    }

    /// Pauses the fleet's budget of `partition` for `wait` (after a refusal).
    pub async fn pause(&self, partition: &Partition, wait: Duration) {
        let ms = wait.as_millis().clamp(1, u128::from(MAX_PAUSE_MS)) as u64;
        let [pause, ..] = self.inner.layout.budget(partition);
        let _: Result<i64, Unavailable> = self
            .run_script("budget", &PAUSE, |s| {
                s.key(pause).arg(ms);
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fleet::tier::redis_server::RedisServer;

    /// The fleet tier on a `redis-server` of the test's own; `None` (the test skips, saying
    /// so) when it is not installed, unless CI requires it (then the test fails).
    fn fleet() -> Option<(RedisServer, Fleet)> {
        let server = RedisServer::start()?;
        let fleet =
            Fleet::new(&server.url(), super::super::FleetSettings::default()).expect("fleet");
        Some((server, fleet))
    }

    #[test]
    fn the_script_cuts_a_pause_to_what_the_governor_waits_at_most() {
        let script = include_str!("lua/budget.lua");
        assert!(script.contains(&format!("local MAX_PAUSE_MS = {MAX_PAUSE_MS}\n")));
        assert_eq!(
            u128::from(MAX_PAUSE_MS),
            crate::governor::MAX_SERVER_WAIT.as_millis()
        );
    }

    #[tokio::test]
    async fn planted_budget_values_refuse_for_an_hour_at_most() {
        let Some((server, fleet)) = fleet() else {
            return;
        };
        let partition = Partition::from_bytes([7; 32]);
        let [pause, left, ..] = fleet.inner.layout.budget(&partition);
        // Plants `value` (ten years' worth, as a hostile writer would), then takes a turn.
        let planted = |command: String| {
            let (fleet, server) = (&fleet, &server);
            async move {
                let set = server.command(&command);
                assert!(set.starts_with("+OK"), "{command}: {set}");
                fleet
                    .budget_turn(&partition, None, Duration::from_secs(30))
                    .await
                    .expect("a value in Redis is no fault of Redis")
                    .turn
            }
        };
        let paused_for = |turn: Budgeted| match turn {
            Budgeted::Paused(wait) => wait,
            other => panic!("paused: {other:?}"),
        };
        let wait = paused_for(planted(format!("SET {pause} 1 PX 315360000000")).await);
        assert!(wait <= Duration::from_secs(3600), "{wait:?}");
        let ttl: i64 = server
            .command(&format!("PTTL {pause}"))
            .trim_start_matches(':')
            .trim()
            .parse()
            .expect("a number");
        assert!(ttl <= 3_600_000, "{ttl}");

        // A spent count planted to reset in ten years, and a count that is not a number.
        let _ = server.command(&format!("DEL {pause}"));
        let wait = paused_for(planted(format!("SET {left} 0 PX 315360000000")).await);
        assert!(wait <= Duration::from_secs(3600), "{wait:?}");
        let turn = planted(format!("SET {left} lots")).await;
        assert!(matches!(turn, Budgeted::Go(_)), "{turn:?}");
    }

    /// Whether the fleet counts a budget as a fixed window once it is told, in turn, of
    /// answers saying `(remaining of 10, reset in ms)`; `None` without `redis-server`.
    async fn stepwise_after(answers: &[(u64, u64)]) -> Option<bool> {
        let (_server, fleet) = fleet()?;
        let partition = Partition::from_bytes([7; 32]);
        for &(remaining, reset) in answers {
            let said = BudgetReport {
                limit: Some(10.0),
                remaining: remaining as f64,
                reset: Some(Duration::from_millis(reset)),
            };
            fleet.learn_budget(&partition, said).await;
        }
        let turn = fleet
            .budget_turn(&partition, None, Duration::from_secs(30))
            .await
            .expect("redis answers");
        Some(turn.stepwise)
    }

    /// The shape rule's table of cases (`governor/shape.rs`), run against the replica's own
    /// governor and the fleet's script alike: both must tell a window from a refilling budget
    /// the same way. Each answer: what remains of 10, the reset (ms), when it comes (ms).
    #[tokio::test]
    async fn one_table_of_cases_for_the_governor_and_the_fleet() {
        // (the case, its answers, whether it is a window)
        type Case = (&'static str, &'static [(u64, u64, u64)], bool);
        let cases: [Case; 4] = [
            // Three answers of one window: their ends agree while what remains falls.
            ("a window", &[(9, 701, 0), (8, 700, 1), (7, 698, 2)], true),
            // A bucket refilling at 10 a second: each end 100 ms later than the one before.
            (
                "a refilling bucket",
                &[(9, 100, 0), (8, 200, 1), (7, 300, 2)],
                false,
            ),
            // The first answer comes late in its window (80 ms left), the next ones from the
            // window after it.
            (
                "a first answer late in its window",
                &[(9, 80, 0), (9, 980, 100), (8, 979, 101), (7, 978, 102)],
                true,
            ),
            // A first slow guess (one spent, whole in a second), then answers of a budget
            // refilling much faster.
            (
                "a faster pace learned later",
                &[(9, 1000, 0), (8, 150, 300), (7, 200, 301), (6, 250, 302)],
                false,
            ),
        ];
        let Some((_server, fleet)) = fleet() else {
            return;
        };
        for (n, (case, answers, window)) in cases.into_iter().enumerate() {
            let timed: Vec<(f64, Duration, Duration)> = answers
                .iter()
                .map(|&(left, reset, at)| {
                    (
                        left as f64,
                        Duration::from_millis(reset),
                        Duration::from_millis(at),
                    )
                })
                .collect();
            assert_eq!(
                crate::governor::stepwise_after(10.0, &timed),
                window,
                "the governor: {case}"
            );
            let partition = Partition::from_bytes([n as u8 + 100; 32]);
            let start = unix_ms(SystemTime::now());
            for &(left, reset, at) in answers.iter() {
                let said = BudgetReport {
                    limit: Some(10.0),
                    remaining: left as f64,
                    reset: Some(Duration::from_millis(reset)),
                };
                fleet
                    .learn_budget_at(&partition, said, start + at as i64)
                    .await;
            }
            let turn = fleet
                .budget_turn(&partition, None, Duration::from_secs(30))
                .await
                .expect("redis answers");
            assert_eq!(turn.stepwise, window, "the fleet: {case}");
        }
    }

    /// Three replicas each send one request at once into a fixed window of 10: the answers
    /// say 9, 8 and 7 remain and that the window ends at one instant. A refilling budget of
    /// 10 a second would have moved the second end 200 ms past the first: this is a window,
    /// told before a replica's first guess of the pace (one request spent, whole again in
    /// 0.7 s: 1.4 a second) reserves turns far ahead.
    #[tokio::test]
    async fn three_answers_of_one_window_show_a_window() {
        let Some(shown) = stepwise_after(&[(9, 701), (8, 700), (7, 700)]).await else {
            return;
        };
        assert!(shown);
    }

    /// The same three requests against a bucket refilling at 10 a second: each answer's end
    /// is 100 ms later than the one before, for the request it spent. Still a refilling
    /// budget.
    #[tokio::test]
    async fn three_answers_of_a_bucket_do_not() {
        let Some(shown) = stepwise_after(&[(9, 100), (8, 200), (7, 300)]).await else {
            return;
        };
        assert!(!shown);
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
