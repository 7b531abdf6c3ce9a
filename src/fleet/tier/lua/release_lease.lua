-- Deletes the lease if this replica still holds it.
-- KEYS[1]: the lease. ARGV[1]: what this replica holds it with.
-- Returns 1 if deleted, 0 if the lease is another's (or gone).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
