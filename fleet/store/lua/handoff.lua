-- handoff: move a draining node's session slot to another live node with room.
-- KEYS[1] nodes   KEYS[2] from node_sessions   KEYS[3] target node_sessions
-- KEYS[4] node_loads   HASH node_id -> slots held
-- ARGV[1] ref   ARGV[2] target node_id   ARGV[3] target capacity (-1 = unlimited)
-- ARGV[4] the draining node's id
-- Returns 'moved', 'no_room' (the target is full or not live) or 'gone' (no slot to move).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then
  return 'gone'
end
local lease = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[2]))
local cap = tonumber(ARGV[3])
if not lease or lease < now or (cap >= 0 and redis.call('SCARD', KEYS[3]) >= cap) then
  return 'no_room'
end
redis.call('SMOVE', KEYS[2], KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], ARGV[4], -1)
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
return 'moved'
