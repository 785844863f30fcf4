-- reassert: put back the admission slot of a session this node still runs (after Redis
-- lost its data, or a slot went missing). Limits are not checked: a running session is
-- never stopped to fit them.
-- KEYS[1] node_sessions   KEYS[2] call_counts   KEYS[3] live   KEYS[4] node_loads
-- ARGV[1] ref   ARGV[2] call_id   ARGV[3] start time (ms)   ARGV[4] node_id
-- Returns 1 when the slot was missing and is back, 0 when it was there.
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
