-- mark_running: starting -> running, only for the owner at its epoch, with the
-- session_started event.
-- KEYS[1] session   HASH
-- KEYS[2] events    STREAM
-- ARGV[1] node_id   ARGV[2] epoch   ARGV[3] stream max length (approximate)
-- ARGV[4] event type   ARGV[5] event data (JSON)
-- ARGV[6] the stream's channel, to announce the entry on by SPUBLISH ('' = none: see keys.py)
-- Returns the state after the call, or 'lease_lost' when this owner is fenced out.
local rec = redis.call('HMGET', KEYS[1], 'node_id', 'epoch', 'state')
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] then
  return 'lease_lost'
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[4], 'data', ARGV[5])
if ARGV[6] ~= '' then
  redis.call('SPUBLISH', ARGV[6], id)
end
if rec[3] == 'starting' then
  redis.call('HSET', KEYS[1], 'state', 'running')
  return 'running'
end
return rec[3]
