-- claim: hand a session to a new owner after its slot moved there (reap.lua on a dead
-- node, or handoff.lua on a draining one). Bumps the epoch, so every write of the old owner
-- is refused from now on, and tells the new owner to resume it.
-- KEYS[1] session   HASH
-- ARGV[1] previous owner   ARGV[2] new owner
-- ARGV[3] owner channel prefix (keys.py; the new owner's id is appended)
-- ARGV[4] the message to publish
-- Returns the new epoch; -1 when the session ended or its record is gone (the slot that
-- moved may be freed); -3 when another node holds it now (the new owner itself finished
-- this claim while the mover was paused, say): the slot is that node's, leave it alone.
local rec = redis.call('HMGET', KEYS[1], 'node_id', 'state')
if not rec[2] or rec[2] == 'ended' then
  return -1
end
if rec[1] ~= ARGV[1] then
  return -3
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HINCRBY', KEYS[1], 'resumed_count', 1)
local state = 'starting'
if rec[2] == 'closing' then
  state = 'closing' -- a close was requested: the new owner closes it at once
end
redis.call('HSET', KEYS[1], 'node_id', ARGV[2], 'state', state)
redis.call('PUBLISH', ARGV[3] .. ARGV[2], ARGV[4])
return epoch
