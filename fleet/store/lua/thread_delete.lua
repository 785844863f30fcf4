-- thread_delete: forget a thread that no session holds (or whose holder is known to be
-- over: ARGV[1] names it, and only that holder is overridden).
-- KEYS[1] thread   KEYS[2] thread_sessions
-- ARGV[1] the ref of a holder known to be over ('' = none)
-- Returns {'deleted', latest, state_from}, {'busy', live} or {'missing'}.
local t = redis.call('HMGET', KEYS[1], 'live', 'latest', 'state_from', 'created_at')
if not t[4] then
  return {'missing'}
end
if t[1] and t[1] ~= '' and t[1] ~= ARGV[1] then
  return {'busy', t[1]}
end
redis.call('DEL', KEYS[1], KEYS[2])
return {'deleted', t[2] or '', t[3] or ''}
