-- thread_release: the session is over (or never started): the thread is free again, and
-- expires FLEET_THREAD_TTL after this update unless a new session claims it.
-- KEYS[1] thread   KEYS[2] thread_sessions
-- ARGV[1] the session's ref   ARGV[2] thread TTL (s)
-- Returns 1 released, 0 the thread was not marked busy with this session.
if redis.call('HGET', KEYS[1], 'live') ~= ARGV[1] then
  return 0
end
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSET', KEYS[1], 'live', '', 'updated_at', ms)
redis.call('HDEL', KEYS[1], 'live_since')
redis.call('EXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
