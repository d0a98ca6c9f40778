local max = tonumber(ARGV[1])
local fresh = 0
for i = 2, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then fresh = fresh + 1 end
end
local total = redis.call('HLEN', KEYS[1]) + fresh
if fresh > 0 and total > max then return total end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 0
