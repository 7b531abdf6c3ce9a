-- Renews the lease while this replica holds it.
-- KEYS[1]: the lease. ARGV[1]: what this replica holds it with; ARGV[2]: the lease's lifetime
-- (ms); ARGV[3]: what it holds it with from now on (with a fleet secret, sealed with a later
-- time).
-- Returns 1 if renewed, 0 if the lease is another's (or gone).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  return 1
end
return 0
