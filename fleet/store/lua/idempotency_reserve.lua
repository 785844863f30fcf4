-- idempotency_reserve: take a start's Idempotency-Key, or say what holds it.
-- KEYS[1] idempotency key   HASH state ('pending' | 'done'), fingerprint, token, answer
-- ARGV[1] fingerprint of the start (what it asks)   ARGV[2] this request's token
-- ARGV[3] how long a pending reservation lives (ms): a holder that dies frees the key
-- Returns {'reserved'} (the key is now this token's), {'pending'} (another request is
-- starting it), {'done', answer} (the first start's answer) or {'mismatch'} (the key was
-- used for a start that asked something else).
local held = redis.call('HMGET', KEYS[1], 'state', 'fingerprint', 'answer')
if not held[1] then
  redis.call('HSET', KEYS[1], 'state', 'pending', 'fingerprint', ARGV[1], 'token', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'reserved'}
end
if held[2] ~= ARGV[1] then
  return {'mismatch'}
end
if held[1] == 'done' then
  return {'done', held[3]}
end
return {'pending'}
