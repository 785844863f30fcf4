-- admit: check every admission limit and reserve the slot, in one atomic step.
-- KEYS[1] nodes           ZSET node_id -> lease expiry (ms)
-- KEYS[2] node_sessions   SET of refs held by the admitting node
-- KEYS[3] call_counts     HASH call_id -> live sessions
-- KEYS[4] live            ZSET ref -> start time (ms)
-- KEYS[5] settling        STRING: until when (ms) admission waits after a data loss
-- ARGV[1] node_id   ARGV[2] ref   ARGV[3] call_id
-- ARGV[4] max_sessions_per_call   ARGV[5] max_sessions   ARGV[6] max_sessions_per_node
--         (each -1 for unlimited)
-- Returns {code, now_ms}; code is one of the AdmitResult values in scripts.py.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

local lease = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if not lease or lease < now then
  return {'not_ready', now}
end
-- Already reserved: this is a retry of a call whose answer was lost. Count it once.
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then
  return {'ok', now}
end
-- Redis lost its data moments ago: the counts below are short of the sessions that nodes
-- are still writing back. Admitting now could exceed a limit once they have.
if (tonumber(redis.call('GET', KEYS[5])) or 0) > now then
  return {'settling', now}
end

local per_call = tonumber(ARGV[4])
if per_call >= 0 and (tonumber(redis.call('HGET', KEYS[3], ARGV[3])) or 0) >= per_call then
  return {'max_sessions_per_call', now}
end
local total = tonumber(ARGV[5])
if total >= 0 and redis.call('ZCARD', KEYS[4]) >= total then
  return {'max_sessions', now}
end
local per_node = tonumber(ARGV[6])
if per_node >= 0 and redis.call('SCARD', KEYS[2]) >= per_node then
  return {'node_capacity', now}
end

redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('ZADD', KEYS[4], now, ARGV[2])
return {'ok', now}
