-- thread_claim: mark a thread busy with a new session, or say which session holds it.
-- At most one live session per thread: this is the only step that sets ``live``.
-- KEYS[1] thread   HASH   KEYS[2] thread_sessions   ZSET ref -> start time (ms)
-- ARGV[1] the new session's ref   ARGV[2] principal   ARGV[3] thread_id
-- Returns {'claimed', latest ref, state_from ref}
--      or {'busy', live ref, live since (ms), 1 if that session has started on the thread}.
local live = redis.call('HGET', KEYS[1], 'live')
if live and live ~= '' then
  local t = redis.call('HMGET', KEYS[1], 'live_since', 'latest')
  return {'busy', live, t[1] or '0', t[2] == live and 1 or 0}
end
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSETNX', KEYS[1], 'created_at', ms)
redis.call('HSET', KEYS[1], 'live', ARGV[1], 'live_since', ms,
  'principal', ARGV[2], 'thread_id', ARGV[3])
-- While a session runs on it a thread does not expire; the release sets its TTL again.
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
local t = redis.call('HMGET', KEYS[1], 'latest', 'state_from')
return {'claimed', t[1] or '', t[2] or ''}
