-- heartbeat: renew a node's lease. One call per renewal, whatever the session count.
-- KEYS[1] nodes       ZSET node_id -> lease expiry (ms)
-- KEYS[2] node_info   HASH
-- KEYS[3] settling    STRING: until when (ms) admission waits after a data loss
-- KEYS[4] born        STRING: when this Redis' fleet data began (gone: the data was lost)
-- KEYS[5] node_directory   HASH node_id -> '<renewal ms> <JSON of what the node reports>'
-- KEYS[6] node_loads       HASH node_id -> slots held: set again here from
-- KEYS[7] node_sessions    the node's SET, so that a count a script missed lasts a renewal
-- ARGV[1] node_id   ARGV[2] lease TTL (ms)
-- ARGV[3] '1' when this node held a lease before: if `born` is gone too, Redis lost its
--         data, and admission waits a moment (SETTLE_MS: every live node's control channel
--         dropped with Redis, so each renews, and writes back its sessions, as soon as Redis
--         answers; renewals are retried every 250 ms meanwhile)
-- ARGV[4] what the node reports, as JSON (for the directory)
-- ARGV[5..] the same as node_info field, value pairs (for place.lua)
-- Returns {status, now_ms}: 'ok' (the lease was held), 'expired' (it had lapsed: others may
-- have taken this node's sessions) or 'new' (unknown: first start, reaped, or Redis lost
-- its data).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[2])

local prev = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
local status = 'ok'
if not prev then
  status = 'new'
elseif prev < now then
  status = 'expired'
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('SET', KEYS[4], now, 'NX') and ARGV[3] == '1' then
  local settle = math.min(ttl, 1000)
  redis.call('SET', KEYS[3], now + settle, 'PX', settle)
end
if #ARGV > 4 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 5))
end
redis.call('HSET', KEYS[2], 'last_heartbeat_ms', now)
redis.call('PEXPIRE', KEYS[2], ttl * 3)
redis.call('HSET', KEYS[5], ARGV[1], now .. ' ' .. ARGV[4])
redis.call('HSET', KEYS[6], ARGV[1], redis.call('SCARD', KEYS[7]))
return {status, now}
