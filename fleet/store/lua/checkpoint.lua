-- checkpoint: save a session's state, fenced by owner and epoch.
-- KEYS[1] session      HASH
-- KEYS[2] checkpoint   LIST of checkpoint envelopes (JSON), newest first
-- KEYS[3] inbox        STREAM of messages
-- ARGV[1] node_id   ARGV[2] epoch   ARGV[3] state (JSON text, already validated)
-- ARGV[4] saved_at (unix seconds)   ARGV[5] how many versions to keep
-- ARGV[6] the version this write makes: a retry of a write that was applied (its answer
--         was lost) finds the version there already and is not applied twice
-- ARGV[7] the last inbox entry this state has consumed ('' = none new)
-- ARGV[8] how many messages that is, since the session began: consumed atomically with the
--         state, so a resume gets exactly the messages after it
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
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'inbox_pos', ARGV[7], 'inbox_done', ARGV[8])
  -- Consumed entries are no longer needed: keep the ones after the position.
  local ms, seq = string.match(ARGV[7], '^(%d+)-(%d+)$')
  redis.call('XTRIM', KEYS[3], 'MINID', ms .. '-' .. (tonumber(seq) + 1))
end
return version
