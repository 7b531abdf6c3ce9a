-- Pauses a partition's budget after a refusal, never shortening a pause already running.
-- KEYS[1]: the pause. ARGV[1]: its length (ms).
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
end
return 0
