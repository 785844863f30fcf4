-- forget_node: drop a dead node from the registry once it holds no sessions.
-- KEYS[1] nodes   KEYS[2] node_sessions   KEYS[3] node_info
-- KEYS[4] node_directory   KEYS[5] node_loads
-- ARGV[1] node_id
-- Returns 1 when forgotten by this call; 0 when it is alive again, still holds sessions,
-- or another survivor forgot it first (so that only one of them says so).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if (lease and lease >= now) or redis.call('SCARD', KEYS[2]) > 0 then
  return 0
end
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
return removed
