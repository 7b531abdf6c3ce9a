-- Takes a free lease and drops the key's old relayed stream, in one step: no waiter then
-- follows an old stream as if it were this flight's.
-- KEYS[1]: the lease; KEYS[2]: the key's relayed stream.
-- ARGV[1]: what this replica writes in its lease; ARGV[2]: the lease's lifetime (ms).
-- Returns {1, ''} if the lease was taken, {0, what the holder wrote} if another holds it.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('DEL', KEYS[2])
  return {1, ''}
end
return {0, redis.call('GET', KEYS[1])}
