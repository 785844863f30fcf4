-- idempotency_release: give back a reservation whose start failed, so a retry can start.
-- Only the holder's own pending reservation goes: never an answer, never another's.
-- KEYS[1] idempotency key   ARGV[1] the holder's token
-- Returns 1 when released, 0 when the key was not this token's pending reservation.
local held = redis.call('HMGET', KEYS[1], 'state', 'token')
if held[1] == 'pending' and held[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
