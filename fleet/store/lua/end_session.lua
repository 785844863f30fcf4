-- end_session: turn a live session into a tombstone, fenced by owner and epoch.
-- KEYS[1] session      HASH
-- KEYS[2] call_live    ZSET session_id -> start time (ms)
-- KEYS[3] call_ended   ZSET session_id -> end time (ms)
-- KEYS[4] checkpoint   checkpoint list (expires with the tombstone)
-- KEYS[5] events       event stream (expires with the tombstone)
-- KEYS[6] inbox, KEYS[7] inbox_ids   the conversation (expire with the tombstone)
-- ARGV[1] owner node_id   ARGV[2] epoch ('' = any epoch of that owner)
-- ARGV[3] end_reason      ARGV[4] ended_at (unix seconds)   ARGV[5] tombstone TTL (s)
-- ARGV[6] error summary ('' = none)   ARGV[7] stream max length (approximate)
-- ARGV[8] session_ended event data (JSON)
-- ARGV[9] the stream's channel, to announce session_ended on by SPUBLISH ('' = none: see keys.py)
-- ARGV[10] a message for the nodes that wait for this end ('' = none)
-- ARGV[11] the worker's final metrics (a JSON object; '' = keep the last report), written
--          with metrics_reported_at = ended_at: the owner's last report rides on its end
-- ARGV[12] what the worker's run returned (JSON; '' = nothing)
-- ARGV[13] how long the checkpoints are kept (s): a tombstone's TTL, or a thread's (the
--          latest checkpoint of a thread's session is the thread's state)
-- ARGV[14..] the channels of the nodes that wait (a channel is not a key: Cluster is
--          unaffected)
-- Returns 1 ended now, 0 no such session, 2 already ended, -1 fenced (owner moved on).
local rec = redis.call('HMGET', KEYS[1], 'node_id', 'epoch', 'state', 'session_id')
if not rec[1] then
  return 0
end
local function notify()
  for i = 14, #ARGV do
    redis.call('PUBLISH', ARGV[i], ARGV[10])
  end
end
if rec[3] == 'ended' then
  notify()
  return 2
end
if rec[1] ~= ARGV[1] or (ARGV[2] ~= '' and rec[2] ~= ARGV[2]) then
  return -1
end
local ttl = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'state', 'ended', 'ended_at', ARGV[4], 'end_reason', ARGV[3])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[6])
end
if ARGV[12] ~= '' then
  redis.call('HSET', KEYS[1], 'result', ARGV[12])
end
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[1], 'metrics', ARGV[11], 'metrics_reported_at', ARGV[4])
end
local id = redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*',
  'type', 'session_ended', 'data', ARGV[8])
if ARGV[9] ~= '' then
  redis.call('SPUBLISH', ARGV[9], id)
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[13]))
redis.call('EXPIRE', KEYS[5], ttl)
redis.call('EXPIRE', KEYS[6], ttl)
redis.call('EXPIRE', KEYS[7], ttl)

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREM', KEYS[2], rec[4])
redis.call('ZADD', KEYS[3], now, rec[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - ttl * 1000)
-- The call's indexes outlive its last live session by one tombstone TTL.
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('EXPIRE', KEYS[3], ttl)
end
notify()
return 1
