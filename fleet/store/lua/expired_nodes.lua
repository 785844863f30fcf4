-- expired_nodes: the nodes whose lease has lapsed (or, with ARGV[2] = 'count', how many nodes
-- hold their lease: a count, O(log N), never a list), by Redis' own clock: no node's clock
-- needs to agree with another's.
-- KEYS[1] nodes   ZSET node_id -> lease expiry (ms)
-- ARGV[1] how many at most (0 = all)   ARGV[2] 'expired' (default) or 'count'
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local limit = tonumber(ARGV[1])
if limit == 0 then
  limit = -1
end
if ARGV[2] == 'count' then
  return redis.call('ZCOUNT', KEYS[1], now, '+inf')
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, limit)
