-- report_metrics: write the owner's latest ctx.metrics into the records of several of its
-- sessions, each fenced by owner and epoch (a node that lost a session cannot overwrite
-- what its new owner reports) and refused once the session ended (the end wrote the final
-- values).
-- KEYS[i]   the session HASH of the i-th reported session (all in one slot on Cluster)
-- ARGV[1]   node_id   ARGV[2]   reported_at (unix seconds)
-- ARGV[2i + 1]   the epoch the node runs session i under
-- ARGV[2i + 2]   session i's metrics (a JSON object, validated by the node)
-- Returns one code per session, in order: 1 written; -1 fenced out (another owner or epoch,
-- or ended); -2 no record (Redis lost it: the maintenance pass writes it back).
local out = {}
for i, key in ipairs(KEYS) do
  local rec = redis.call('HMGET', key, 'node_id', 'epoch', 'state')
  if not rec[1] then
    out[i] = -2
  elseif rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2 * i + 1] or rec[3] == 'ended' then
    out[i] = -1
  else
    redis.call('HSET', key, 'metrics', ARGV[2 * i + 2], 'metrics_reported_at', ARGV[2])
    out[i] = 1
  end
end
return out
