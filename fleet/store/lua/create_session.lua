-- create_session: write a session record and index it under its call. Never overwrites a
-- record that exists: used to create a new session, and to write back the record of a
-- session this node still runs when Redis lost it (another owner may have moved on).
-- KEYS[1] session   KEYS[2] call_live   KEYS[3] call_ended
-- ARGV[1] start time (ms)   ARGV[2] session_id   ARGV[3..] field, value pairs
-- Returns 1 when written, 2 when this very record is there already (a retry of this write
-- whose answer was lost: same owner, epoch and start), 0 when another record was there.
if redis.call('EXISTS', KEYS[1]) == 1 then
  local mine = {}
  for i = 3, #ARGV - 1, 2 do
    mine[ARGV[i]] = ARGV[i + 1]
  end
  local rec = redis.call('HMGET', KEYS[1], 'node_id', 'epoch', 'started_at')
  if rec[1] == mine['node_id'] and rec[2] == mine['epoch'] and rec[3] == mine['started_at'] then
    return 2
  end
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('PERSIST', KEYS[3])
return 1
