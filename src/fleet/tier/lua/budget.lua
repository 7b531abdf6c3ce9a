-- The fleet's budget of one partition: one script per decision, so that replicas decide
-- atomically (see budget.rs for the rules in prose).
--
-- KEYS[1] pause: set (with its lifetime) while the budget is paused after a refusal.
-- KEYS[2] left: what the upstream last said remains (gradual budgets), expiring at its reset.
-- KEYS[3] tat: the GCRA state of the pace (the theoretical arrival time of the next turn).
-- KEYS[4] win: a hash, the window's accounting:
--
--   | field        | what                                                                |
--   |--------------|---------------------------------------------------------------------|
--   | left         | what remains in the current window                                  |
--   | end          | when the current window ends (ms)                                   |
--   | ahead        | turns reserved past the current window                              |
--   | limit        | the budget's size, as answers said                                  |
--   | period       | the window's length: the longest reset seen, or two ends' distance  |
--   | stepwise     | '1' when the budget is a fixed window, '0' when it refills          |
--   | said         | the last answer's remaining                                         |
--   | said_reset   | the last answer's reset (ms)                                        |
--   | said_end     | the end the last answer said (ms)                                   |
--   | said_first   | the earliest end said of the last window answers came from          |
--   | g_first      | the earliest end said by the current window's answers               |
--   | g_last       | the latest end said by the current window's answers                 |
--   | g_most       | the most remaining said by the current window's answers             |
--   | g_least      | the least remaining said by the current window's answers            |
--   | rule_changes | how many times turns already reserved were made void                |
--   | fastest      | the shortest pace interval a replica asked with (ms)                |
--
-- ARGV[1] says what to do:
--
-- turn, now (ms), the pace's interval (ms, 0 for none), its burst, the longest wait (ms).
--   Returns {what, ms, stepwise, changes}: what 0 the turn is reserved, go after ms; 1
--   paused, ask again after ms; 2 the turn would come only after ms, longer than allowed
--   (nothing reserved). stepwise 1 if the fleet counts a fixed window; changes the rule
--   changes so far.
-- learn, now, what remains, the reset (ms), the limit (0 unknown), and the shape rule's
--   thresholds (governor/shape.rs): the least fall as a share of the limit, its floor, and
--   how closely the ends must agree. Returns {0, 0, stepwise, 0}.
-- confirm, now, when the reserved turn was to come (ms), the rule changes it was reserved
--   under. Returns {what, ms, ..}: what 0 go; 1 wait ms (a pause, or the window the turn is
--   in begins later than foreseen), then confirm again; 2 ask for a turn again (the rules it
--   was reserved under were made void since).
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
  -- window whose ends agree while what remains falls show a window. More
  -- remaining than the answer before, with a clearly shorter reset, in the same window,
  -- shows a refill.
  -- The shape rule of governor/shape.rs, with its thresholds as given.
  local share, floor, agreement = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local fell = g_most - g_least
  if limit and limit >= 1 and fell >= math.max(limit * share, floor)
      and g_last - g_first < agreement * fell * reset / math.max(limit - left, 1) then
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
-- No replica pauses longer than the governor ever waits (an hour: MAX_PAUSE_MS in budget.rs);
-- a longer pause was planted, and is cut to that.
local MAX_PAUSE_MS = 3600000
if pause > MAX_PAUSE_MS then
  redis.call('PEXPIRE', KEYS[1], MAX_PAUSE_MS)
  pause = MAX_PAUSE_MS
end

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
-- A count that is not a number was not written by a replica: read as not spent.
local spent = left and (tonumber(left) or 1) <= 0
if interval <= 0 then
  if spent then
    local reset = redis.call('PTTL', KEYS[2])
    if reset > 0 then return {1, reset, shape, changes} end
  end
  if left and tonumber(left) then redis.call('DECR', KEYS[2]) end
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
if left and tonumber(left) then redis.call('DECR', KEYS[2]) end
return {0, wait, shape, changes}
