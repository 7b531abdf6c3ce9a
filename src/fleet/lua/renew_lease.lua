-- Renews the lease while this replica holds it.
-- KEYS[1]: the lease. ARGV[1]: what this replica wrote in its lease; ARGV[2]: the lease's lifetime (ms).
-- Returns 1 if renewed, 0 if the lease is another's (or gone).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
