-- forgo_start: give up a start that was forwarded to another node (placement) and not
-- answered in time, unless that node created the session meanwhile. With no record yet,
-- one is written ended (failed, error 'not_started'), so the node can never create the
-- session later (create_session.lua never overwrites): the asker's "not started" stays
-- true, and a retry cannot make a second run of it.
-- KEYS[1] session   KEYS[2] call_ended
-- ARGV[1] session_id   ARGV[2] ended_at (unix seconds)   ARGV[3] ended_at (ms)
-- ARGV[4] tombstone TTL (s)   ARGV[5..] the record's field, value pairs
-- Returns 1 when given up; 0 when the record exists (the node created it: read it).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('HSET', KEYS[1], 'state', 'ended', 'ended_at', ARGV[2], 'end_reason', 'failed',
  'error', 'not_started')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
