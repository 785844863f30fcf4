-- thread_started: the session that claimed the thread runs: it is the thread's latest.
-- KEYS[1] thread   KEYS[2] thread_sessions
-- ARGV[1] the session's ref   ARGV[2] the ref whose checkpoint it started from ('' none)
-- ARGV[3] its start time (ms)
-- Returns {1, previous latest, previous state_from}, or {0} if the thread is no longer
-- marked busy with this session (a repair released it: see docs/architecture.md).
if redis.call('HGET', KEYS[1], 'live') ~= ARGV[1] then
  return {0}
end
local t = redis.call('HMGET', KEYS[1], 'latest', 'state_from')
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSET', KEYS[1], 'latest', ARGV[1], 'state_from', ARGV[2], 'updated_at', ms)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {1, t[1] or '', t[2] or ''}
