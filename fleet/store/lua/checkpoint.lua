-- checkpoint: save a session's state, fenced by owner and epoch.
-- KEYS[1] session      HASH
-- KEYS[2] checkpoint   LIST of checkpoint envelopes (JSON), newest first
-- ARGV[1] node_id   ARGV[2] epoch   ARGV[3] state (JSON text, already validated)
-- ARGV[4] saved_at (unix seconds)   ARGV[5] how many versions to keep
-- ARGV[6] the version this write makes: a retry of a write that was applied (its answer
--         was lost) finds the version there already and is not applied twice
-- Returns the new version; -1 when this owner is fenced out (or the session ended); -2 when
-- there is no record (Redis lost it: the owner writes it back, then saves again).
local rec = redis.call('HMGET', KEYS[1], 'node_id', 'epoch', 'state')
if not rec[1] then
  return -2
end
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] or rec[3] == 'ended' then
  return -1
end
local current = tonumber(redis.call('HGET', KEYS[1], 'checkpoint_version') or '0')
if current >= tonumber(ARGV[6]) then
  return current
end
local version = redis.call('HINCRBY', KEYS[1], 'checkpoint_version', 1)
-- The state is spliced in as text: decoding and re-encoding it in Lua would change it.
local envelope = '{"version":' .. version .. ',"epoch":' .. ARGV[2] ..
  ',"saved_at":' .. ARGV[4] .. ',"state":' .. ARGV[3] .. '}'
redis.call('LPUSH', KEYS[2], envelope)
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[5]) - 1)
return version
