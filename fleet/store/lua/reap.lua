-- reap: take one session away from a dead node, at most once across all reapers.
-- KEYS[1] nodes                  ZSET node_id -> lease expiry (ms)
-- KEYS[2] dead node_sessions     SET
-- KEYS[3] target node_sessions   SET (the dead node's own set when there is no target)
-- KEYS[4] call_counts   KEYS[5] live   KEYS[6] ended   KEYS[7] node_loads
-- ARGV[1] dead node_id   ARGV[2] ref   ARGV[3] call_id
-- ARGV[4] target node_id ('' = none: the session is released)
-- ARGV[5] target capacity (-1 = unlimited)   ARGV[6] tombstone TTL (ms)
-- Returns 'alive' (the node renewed its lease), 'gone' (already reaped), 'no_room'
-- (the target is full or dead: try another), 'moved' or 'released'.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

local lease = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if lease and lease >= now then
  return 'alive'
end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 0 then
  return 'gone'
end

if ARGV[4] ~= '' then
  local target = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[4]))
  local cap = tonumber(ARGV[5])
  if not target or target < now or (cap >= 0 and redis.call('SCARD', KEYS[3]) >= cap) then
    return 'no_room'
  end
  redis.call('SMOVE', KEYS[2], KEYS[3], ARGV[2])
  redis.call('HINCRBY', KEYS[7], ARGV[1], -1)
  redis.call('HINCRBY', KEYS[7], ARGV[4], 1)
  return 'moved'
end

redis.call('SREM', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[7], ARGV[1], -1)
if redis.call('HINCRBY', KEYS[4], ARGV[3], -1) <= 0 then
  redis.call('HDEL', KEYS[4], ARGV[3])
end
redis.call('ZREM', KEYS[5], ARGV[2])
redis.call('ZADD', KEYS[6], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - tonumber(ARGV[6]))
return 'released'
