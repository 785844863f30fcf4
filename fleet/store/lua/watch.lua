-- watch: what the maintenance pass must act on, among many sessions of one node. Returns
-- only the sessions that need attention, so a node with thousands of sessions reads a
-- short answer.
-- KEYS[i]   the session HASH of the node's i-th local session (all in one slot on Cluster)
-- ARGV[1]   node_id   ARGV[i + 1]   the epoch the node runs session i under
-- Returns a flat list of (i, code, detail): code 'missing' (Redis lost the record),
-- 'moved' (another owner or epoch, or ended elsewhere) or 'close' (detail: the reason).
local out = {}
for i, key in ipairs(KEYS) do
  local rec = redis.call('HMGET', key, 'node_id', 'epoch', 'state', 'close_reason')
  local code, detail = nil, ''
  if not rec[1] then
    code = 'missing'
  elseif rec[1] ~= ARGV[1] or rec[2] ~= ARGV[i + 1] or rec[3] == 'ended' then
    code = 'moved'
  elseif rec[4] then
    code, detail = 'close', rec[4]
  end
  if code then
    out[#out + 1] = i
    out[#out + 1] = code
    out[#out + 1] = detail
  end
end
return out
