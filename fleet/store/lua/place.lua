-- place: check every admission limit, pick the node that runs a new session, and reserve
-- its slot there, in one atomic step.
-- KEYS[1] nodes           ZSET node_id -> lease expiry (ms)
-- KEYS[2] call_counts     HASH call_id -> live sessions
-- KEYS[3] live            ZSET ref -> start time (ms)
-- KEYS[4] settling        STRING: until when (ms) admission waits after a data loss
-- KEYS[5] node_loads      HASH node_id -> slots held (kept for readers; room is counted
--                         from the SETs themselves)
-- KEYS[6..] per candidate, two keys: its node_sessions SET and its node_info HASH
-- ARGV[1] ref   ARGV[2] call_id
-- ARGV[3] max_sessions_per_call   ARGV[4] max_sessions   (each -1 for unlimited)
-- ARGV[5] worker name ('' = any)   ARGV[6] 'local', 'spread' or 'asked' (the node asked is
--         the only candidate named: it takes the session if it can, else the answer is
--         'others', for the caller to name them all)
-- ARGV[7..] the candidates' node ids, in KEYS order; the node asked comes first
-- A candidate can take the session when its lease is held, it is not draining, it runs
-- the worker (node_info.workers, comma-separated) and it has room (node_info.capacity;
-- '' = unlimited). 'local' takes the node asked when it can; otherwise, and always for
-- 'spread', the candidate with the most room (unlimited counts as most; then the fewest
-- sessions; then the earliest in the list, so the node asked wins a tie).
-- Returns {code, node_id}: code 'ok' (node_id is where the slot is), 'not_ready',
-- 'settling', 'max_sessions_per_call', 'max_sessions', 'no_capacity' or 'elsewhere' (a
-- retry whose slot a node that is no candidate holds now).
-- Cost, in commands: 'local' with room on the node asked is O(1) (about ten, whatever the
-- number of candidates); 'asked' keeps the script's arguments O(1) too. 'spread', and
-- 'local' when the node asked is full, read three per candidate (ZSCORE, HMGET, SCARD):
-- O(N) for N candidates. Making that O(1) would need
-- a room index (a ZSET of room per node) kept by every script that moves a slot and by
-- every change of a node's capacity, drain or workers: not done (docs/architecture.md).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n = #ARGV - 6

-- Already reserved: this is a retry of a call whose answer was lost. Count it once. The
-- live index holds every admitted ref, so a first call costs one lookup whatever the fleet's
-- size; only a retry looks for the candidate that holds the slot.
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  for i = 1, n do
    if redis.call('SISMEMBER', KEYS[4 + 2 * i], ARGV[1]) == 1 then
      return {'ok', ARGV[6 + i]}
    end
  end
  if ARGV[6] == 'asked' then
    return {'others', ''}
  end
  -- Its slot moved to a node that is no candidate (reaped meanwhile): never admit it twice.
  return {'elsewhere', ''}
end
-- Redis lost its data moments ago: the counts below are short of the sessions that nodes
-- are still writing back. Admitting now could exceed a limit once they have.
if (tonumber(redis.call('GET', KEYS[4])) or 0) > now then
  return {'settling', ''}
end
local per_call = tonumber(ARGV[3])
if per_call >= 0 and (tonumber(redis.call('HGET', KEYS[2], ARGV[2])) or 0) >= per_call then
  return {'max_sessions_per_call', ''}
end
local total = tonumber(ARGV[4])
if total >= 0 and redis.call('ZCARD', KEYS[3]) >= total then
  return {'max_sessions', ''}
end

local worker = ',' .. ARGV[5] .. ','
local best, best_room, best_count = nil, -1, 0
for i = 1, n do
  local node_id = ARGV[6 + i]
  local lease = tonumber(redis.call('ZSCORE', KEYS[1], node_id))
  if lease and lease >= now then
    local info = redis.call('HMGET', KEYS[5 + 2 * i], 'draining', 'workers', 'capacity')
    local runs = ARGV[5] == '' or string.find(',' .. (info[2] or '') .. ',', worker, 1, true)
    if info[1] ~= '1' and runs then
      local count = redis.call('SCARD', KEYS[4 + 2 * i])
      local cap = tonumber(info[3])
      local room = math.huge
      if cap then
        room = cap - count
      end
      if room > 0 then
        if i == 1 and ARGV[6] ~= 'spread' then
          best = i
          break
        end
        if room > best_room or (room == best_room and count < best_count) then
          best, best_room, best_count = i, room, count
        end
      end
    end
  end
end
if not best then
  if ARGV[6] == 'asked' then
    return {'others', ''}
  end
  -- The node asked cannot be chosen because its own lease lapsed: say so, so that it
  -- answers 503 (retry another node) rather than 429 for a fleet it cannot see.
  local lease = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[7]))
  if n == 1 and (not lease or lease < now) then
    return {'not_ready', ''}
  end
  return {'no_capacity', ''}
end

redis.call('SADD', KEYS[4 + 2 * best], ARGV[1])
redis.call('HINCRBY', KEYS[5], ARGV[6 + best], 1)
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('ZADD', KEYS[3], now, ARGV[1])
return {'ok', ARGV[6 + best]}
