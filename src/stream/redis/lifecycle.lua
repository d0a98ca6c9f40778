local m = redis.call('HMGET', KEYS[1], 'epoch', 'idle')
if not m[1] then return 0 end
local idle = ARGV[3]
if idle ~= 'active' and m[2] ~= 'active' then return 0 end
if idle == m[2] then return 0 end
redis.call('HSET', KEYS[1], 'idle', idle)
redis.call('PUBLISH', ARGV[1], 'L' .. field(ARGV[2]) .. field(m[1]) .. field(idle))
return 1
