-- KEYS[1] the run's KV hash, KEYS[2] its checkpoint hash, KEYS[3] its
-- latest checkpoint id, KEYS[4] its owner; ARGV[1] the usage key prefix,
-- ARGV[2] the checkpoint record header's length. Deletes them all and
-- gives their bytes back to the owner.
local kv, cp, header = 0, 0, tonumber(ARGV[2])
for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
  kv = kv + #k + redis.call('HSTRLEN', KEYS[1], k)
end
for _, id in ipairs(redis.call('HKEYS', KEYS[2])) do
  cp = cp + #id + math.max(0, redis.call('HSTRLEN', KEYS[2], id) - header)
end
local owner = redis.call('GET', KEYS[4])
if owner then
  local usage = ARGV[1] .. owner
  for field, freed in pairs({kvBytes = kv, checkpointBytes = cp}) do
    if freed > 0 then
      local used = tonumber(redis.call('HGET', usage, field) or '0')
      redis.call('HSET', usage, field, string.format('%d', math.max(0, used - freed)))
    end
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 0
