//! The fleet's rate budget: one Lua script per decision, so that replicas decide atomically.
//! See [`super`] for what is shared; the replica's own governor still decides first.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use super::Fleet;
use crate::entry::unix_ms;
use crate::key::Partition;

/// The fleet's rate budget of one partition, decided atomically: `KEYS` are the pause, what
/// the upstream said is left in its window, and the GCRA state of the pace; `ARGV` the time
/// (ms), the pace's interval between requests (ms, 0 for none) and its burst. Returns 0 to go
/// now, or how many milliseconds to wait.
static BUDGET: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local pause = redis.call('PTTL', KEYS[1])
if pause > 0 then return pause end
local left = redis.call('GET', KEYS[2])
if left and tonumber(left) <= 0 then
  local reset = redis.call('PTTL', KEYS[2])
  if reset > 0 then return reset end
end
local interval = tonumber(ARGV[2])
if interval > 0 then
  local now = tonumber(ARGV[1])
  local tat = tonumber(redis.call('GET', KEYS[3]) or ARGV[1])
  if tat < now then tat = now end
  local allowed_at = tat + interval - interval * tonumber(ARGV[3])
  if allowed_at > now then return math.ceil(allowed_at - now) end
  redis.call('SET', KEYS[3], tat + interval, 'PX', math.ceil(tat + interval - now) + 1000)
end
if left then redis.call('DECR', KEYS[2]) end
return 0
"#,
    )
});

/// What the upstream said is left: kept if lower than what the fleet believes (answers arrive
/// out of order; requests sent since are already counted), until the window resets.
static LEARN_LEFT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local left = redis.call('GET', KEYS[1])
if (not left) or tonumber(ARGV[1]) < tonumber(left) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 0
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

impl Fleet {
    /// How long a request of `partition` must wait for the fleet's budget, the turn taken if
    /// none: the pause after a refusal, what the upstream said is left before its window
    /// resets, and the pace (`per_second` with a burst of `burst`, learned from the headers or
    /// set with `--rpm`) shared by all replicas, as GCRA. `None` when Redis cannot be used (the
    /// replica's own governor decides alone).
    pub async fn budget_wait(
        &self,
        partition: &Partition,
        pace: Option<(f64, f64)>,
    ) -> Option<Duration> {
        let keys = vec![
            self.budget_name(partition, "pause"),
            self.budget_name(partition, "left"),
            self.budget_name(partition, "rpm"),
        ];
        let now = unix_ms(SystemTime::now());
        let (interval, burst) = match pace {
            Some((per_second, burst)) if per_second > 0.0 => (1000.0 / per_second, burst.max(1.0)),
            _ => (0.0, 1.0),
        };
        let wait: i64 = self
            .run_script("budget", &BUDGET, |s| {
                s.key(keys).arg(now).arg(interval).arg(burst);
            })
            .await
            .ok()?;
        Some(Duration::from_millis(u64::try_from(wait).unwrap_or(0)))
    }

    /// Shares what an upstream answer to `partition` said is left in its window.
    pub async fn learn_left(&self, partition: &Partition, left: u64, reset: Duration) {
        let ms = reset.as_millis().clamp(1, 60_000) as u64;
        let key = self.budget_name(partition, "left");
        let _: Result<i64, ()> = self
            .run_script("budget", &LEARN_LEFT, |s| {
                s.key(key).arg(left).arg(ms);
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

    fn budget_name(&self, partition: &Partition, what: &str) -> String {
        let partition = blake3::Hash::from_bytes(*partition.as_bytes()).to_hex();
        format!("{}budget:{partition}:{what}", self.inner.prefix)
    }
}
