-- KEYS[1] the run's KV hash, KEYS[2] its owner; ARGV[1] the most keys it
-- may hold, ARGV[2] the tenant charged if the run has no owner, ARGV[3]
-- that tenant's kvBytes limit, ARGV[4] the usage key prefix, ARGV[5..]
-- key, value, key, value, ...
local max, limit = tonumber(ARGV[1]), tonumber(ARGV[3])
local fresh, growth = 0, 0
for i = 5, #ARGV, 2 do
  local k, v = ARGV[i], ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[1], k) == 1 then
    growth = growth + #v - redis.call('HSTRLEN', KEYS[1], k)
  else
    fresh = fresh + 1
    growth = growth + #k + #v
  end
end
local total = redis.call('HLEN', KEYS[1]) + fresh
if fresh > 0 and total > max then return {1, total} end
local owner = redis.call('GET', KEYS[2]) or ARGV[2]
local usage = ARGV[4] .. owner
local used = tonumber(redis.call('HGET', usage, 'kvBytes') or '0')
if growth > 0 and used + growth > limit then return {2, used, growth} end
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', usage, 'kvBytes', string.format('%d', math.max(0, used + growth)))
redis.call('SET', KEYS[2], owner)
return {0}
