-- create_session: write a session record and index it under its call. Never overwrites a
-- record that exists: used to create a new session, and to write back the record of a
-- session this node still runs when Redis lost it (another owner may have moved on).
-- With an idempotency key, the record and the start's answer are written together, and
-- only while the key is this start's reservation (or gone: a reservation that expired
-- and nobody took since); a start that lost its reservation creates nothing.
-- KEYS[1] session   KEYS[2] call_live   KEYS[3] call_ended
-- KEYS[4] idempotency key (optional; see idempotency_reserve.lua)
-- ARGV[1] start time (ms)   ARGV[2] session_id
-- ARGV[3] reservation token   ARGV[4] fingerprint   ARGV[5] the answer (SessionInfo JSON)
-- ARGV[6] how long the answer is kept (ms)   (ARGV[3..6] are '' without KEYS[4])
-- ARGV[7..] field, value pairs
-- Returns 1 when written; 2 when this very record is there already (a retry of this write
-- whose answer was lost: same owner, epoch and start, not ended); 0 when another record,
-- or an ended one, was there;
-- -1 when the idempotency key is held by another request or answer (fenced out, like a
-- stale owner).
local once = KEYS[4]
if once then
  local token = redis.call('HGET', once, 'token')
  if token and token ~= ARGV[3] then
    return -1
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local mine = {}
  for i = 7, #ARGV - 1, 2 do
    mine[ARGV[i]] = ARGV[i + 1]
  end
  local rec = redis.call('HMGET', KEYS[1], 'node_id', 'epoch', 'started_at', 'state')
  -- An ended record is never this write's own (a start given up by forgo_start.lua looks
  -- like it otherwise).
  if rec[1] == mine['node_id'] and rec[2] == mine['epoch'] and rec[3] == mine['started_at']
      and rec[4] ~= 'ended' then
    return 2
  end
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('PERSIST', KEYS[3])
if once then
  redis.call('HSET', once, 'state', 'done', 'fingerprint', ARGV[4], 'token', ARGV[3],
    'answer', ARGV[5])
  redis.call('PEXPIRE', once, ARGV[6])
end
return 1
