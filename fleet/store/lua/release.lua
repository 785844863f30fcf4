-- release: give back a session's admission slot. Idempotent: a slot is released once.
-- KEYS[1] node_sessions   SET of refs held by the node
-- KEYS[2] call_counts     HASH call_id -> live sessions
-- KEYS[3] live            ZSET ref -> start time (ms)
-- KEYS[4] ended           ZSET ref -> end time (ms)
-- KEYS[5] node_loads      HASH node_id -> slots held
-- ARGV[1] ref   ARGV[2] call_id   ARGV[3] tombstone TTL (ms)   ARGV[4] node_id
-- Returns 1 if the slot was held and is now free, 0 if it was not held.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[5], ARGV[4], -1)
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[3]))
return 1
