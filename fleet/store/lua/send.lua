-- send: append a message to a session's inbox, write it into the session's event stream
-- (followers see both sides of a conversation) and nudge the owner, in one atomic step.
-- KEYS[1] session     HASH
-- KEYS[2] inbox       STREAM of messages
-- KEYS[3] inbox_ids   HASH client message id -> inbox entry id
-- KEYS[4] events      STREAM of the session's events
-- ARGV[1] principal: '' for anyone; else only a session that principal started is seen
-- ARGV[2] message type (an id-like word: spliced into JSON as is)
-- ARGV[3] message data (JSON text, already validated)
-- ARGV[4] client message id ('' = none): a repeat with the same id gets the first answer
-- ARGV[5] how many unconsumed messages the inbox holds at most
-- ARGV[6] owner channel prefix (keys.py; the owner's node id is appended)
-- ARGV[7] the nudge to publish to the owner
-- ARGV[8] event stream max length (approximate)
-- ARGV[9] the event stream's channel, to announce the entry on by SPUBLISH ('' = none: see keys.py)
-- ARGV[10] sent_at (unix seconds)
-- ARGV[11] the asking node, for the reply ('' = nobody waits)   ARGV[12] its ask token
-- Returns {'missing'}, {'ended'}, {'busy'}, {'full'}, {'dup', id} or {'ok', id}.
local rec = redis.call('HMGET', KEYS[1], 'node_id', 'state', 'principal', 'inbox',
  'inbox_sent', 'inbox_done')
if not rec[1] or (ARGV[1] ~= '' and rec[3] ~= ARGV[1]) then
  return {'missing'}
end
if rec[2] == 'ended' then
  return {'ended'}
end
if ARGV[4] ~= '' then
  local seen = redis.call('HGET', KEYS[3], ARGV[4])
  if seen then
    return {'dup', seen}
  end
end
local unconsumed = (tonumber(rec[5]) or 0) - (tonumber(rec[6]) or 0)
if rec[4] == 'reject' and unconsumed > 0 then
  return {'busy'}
end
if unconsumed >= tonumber(ARGV[5]) then
  return {'full'}
end
local id = redis.call('XADD', KEYS[2], '*', 'type', ARGV[2], 'data', ARGV[3],
  'sent_at', ARGV[10], 'reply_to', ARGV[11], 'ask', ARGV[12])
redis.call('HINCRBY', KEYS[1], 'inbox_sent', 1)
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[4], id)
end
local event = '{"message_id":"' .. id .. '","type":"' .. ARGV[2] .. '","data":' .. ARGV[3] .. '}'
local eid = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*',
  'type', 'message', 'data', event)
if ARGV[9] ~= '' then
  redis.call('SPUBLISH', ARGV[9], eid)
end
redis.call('PUBLISH', ARGV[6] .. rec[1], ARGV[7])
return {'ok', id}
