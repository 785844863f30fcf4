-- expired_nodes: the nodes whose lease has lapsed (or, with ARGV[2] = 'live', the nodes whose
-- lease is held), by Redis' own clock: no node's clock needs to agree with another's.
-- KEYS[1] nodes   ZSET node_id -> lease expiry (ms)
-- ARGV[1] how many at most (0 = all)   ARGV[2] 'expired' (default) or 'live'
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local limit = tonumber(ARGV[1])
if limit == 0 then
  limit = -1
end
if ARGV[2] == 'live' then
  return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'LIMIT', 0, limit)
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, limit)
