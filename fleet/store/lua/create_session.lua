-- create_session: write a session record and index it under its call. Never overwrites a
-- record that exists: used to create a new session, and to write back the record of a
-- session this node still runs when Redis lost it (another owner may have moved on).
-- KEYS[1] session   KEYS[2] call_live   KEYS[3] call_ended
-- ARGV[1] start time (ms)   ARGV[2] session_id   ARGV[3..] field, value pairs
-- Returns 1 when written, 0 when a record was there.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('PERSIST', KEYS[3])
return 1
