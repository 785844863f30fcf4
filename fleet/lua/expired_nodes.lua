-- expired_nodes: the nodes whose lease has lapsed, by Redis' own clock (no node's clock
-- needs to agree with another's).
-- KEYS[1] nodes   ZSET node_id -> lease expiry (ms)
-- ARGV[1] how many at most
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1]))
