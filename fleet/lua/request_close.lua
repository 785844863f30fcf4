-- request_close: set the durable close flag and tell the owner, in one atomic step.
-- KEYS[1] session   HASH
-- ARGV[1] close reason   ARGV[2] requested_at (unix seconds)
-- ARGV[3] owner channel prefix (keys.py; the owner's node id is appended here because
--         only the record knows it: a channel, not a key, so Cluster is unaffected)
-- ARGV[4] the message to publish
-- Returns {status, owner}: status 'missing', 'ended' or 'closing'.
local rec = redis.call('HMGET', KEYS[1], 'node_id', 'state', 'close_reason')
if not rec[1] then
  return {'missing', ''}
end
if rec[2] == 'ended' then
  return {'ended', rec[1]}
end
if not rec[3] then
  redis.call('HSET', KEYS[1], 'close_reason', ARGV[1], 'close_requested_at', ARGV[2])
end
redis.call('HSET', KEYS[1], 'state', 'closing')
redis.call('PUBLISH', ARGV[3] .. rec[1], ARGV[4])
return {'closing', rec[1]}
