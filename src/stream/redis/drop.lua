local m = redis.call('HMGET', KEYS[1], 'epoch', 'idle')
if m[1] ~= ARGV[3] then return -1 end
if m[2] == 'active' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[1], 'D' .. field(ARGV[2]) .. field(ARGV[3]))
return 1
