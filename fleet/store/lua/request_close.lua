-- request_close: set the durable close flag, write session_closing into the session's
-- stream and tell the owner, in one atomic step. The owner then only has to end it.
-- KEYS[1] session   HASH
-- KEYS[2] events    STREAM
-- ARGV[1] close reason   ARGV[2] requested_at (unix seconds)
-- ARGV[3] owner channel prefix (keys.py; the owner's node id is appended here because
--         only the record knows it: a channel, not a key, so Cluster is unaffected)
-- ARGV[4] the message to publish
-- ARGV[5] the asking node's id: no message when it is the owner (it acts at once itself)
-- ARGV[6] principal: '' for anyone; else only a session that principal started is seen
-- ARGV[7] stream max length (approximate)   ARGV[8] session_closing event data (JSON)
-- ARGV[9] the stream's channel, to announce the entry on by SPUBLISH ('' = none: see keys.py)
-- Returns {'missing'}, {'closing', owner} or {'ended', owner, field, value, ...}.
local rec = redis.call('HMGET', KEYS[1], 'node_id', 'state', 'close_reason', 'principal')
if not rec[1] or (ARGV[6] ~= '' and rec[4] ~= ARGV[6]) then
  return {'missing'}
end
if rec[2] == 'ended' then
  local out = {'ended', rec[1]}
  for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do
    out[#out + 1] = v
  end
  return out
end
if not rec[3] then
  -- The first request: later ones (another client, a retry) change nothing.
  redis.call('HSET', KEYS[1], 'close_reason', ARGV[1], 'close_requested_at', ARGV[2])
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*',
    'type', 'session_closing', 'data', ARGV[8])
  if ARGV[9] ~= '' then
    redis.call('SPUBLISH', ARGV[9], id)
  end
end
redis.call('HSET', KEYS[1], 'state', 'closing')
if rec[1] ~= ARGV[5] then
  redis.call('PUBLISH', ARGV[3] .. rec[1], ARGV[4])
end
return {'closing', rec[1]}
