-- emit: append a worker's event to the session's stream, fenced by owner and epoch (a
-- node that lost the session cannot write into its stream).
-- KEYS[1] session   HASH
-- KEYS[2] events    STREAM
-- ARGV[1] node_id   ARGV[2] epoch   ARGV[3] stream max length (approximate)
-- ARGV[4] event type   ARGV[5] event data (JSON)
-- ARGV[6] the stream's channel, to announce the entry on by SPUBLISH ('' = none: see keys.py)
-- Returns the entry id; -1 when fenced out (or ended); -2 when there is no record.
local rec = redis.call('HMGET', KEYS[1], 'node_id', 'epoch', 'state')
if not rec[1] then
  return -2
end
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] or rec[3] == 'ended' then
  return -1
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[4], 'data', ARGV[5])
if ARGV[6] ~= '' then
  redis.call('SPUBLISH', ARGV[6], id)
end
return id
