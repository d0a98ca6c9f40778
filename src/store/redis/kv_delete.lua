-- KEYS[1] the run's KV hash, KEYS[2] its owner; ARGV[1] the usage key
-- prefix, ARGV[2..] the keys to delete. Returns how many there were.
local deleted, freed = 0, 0
for i = 2, #ARGV do
  local k = ARGV[i]
  local len = redis.call('HSTRLEN', KEYS[1], k)
  if redis.call('HDEL', KEYS[1], k) == 1 then
    deleted = deleted + 1
    freed = freed + #k + len
  end
end
local owner = redis.call('GET', KEYS[2])
if owner and freed > 0 then
  local usage = ARGV[1] .. owner
  local used = tonumber(redis.call('HGET', usage, 'kvBytes') or '0')
  redis.call('HSET', usage, 'kvBytes', string.format('%d', math.max(0, used - freed)))
end
return deleted
