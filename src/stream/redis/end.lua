local meta = KEYS[1]
local channel, run = ARGV[1], ARGV[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[3]
  create(meta, KEYS[2], channel, run, epoch, ARGV[5])
end
local m = redis.call('HMGET', meta, 'end', 'endedAt', 'endMsg', 'next')
if m[1] then return {epoch, m[4], m[1], m[2], m[3] or '', 0} end
redis.call('HSET', meta, 'end', ARGV[4], 'endedAt', ARGV[5], 'endMsg', ARGV[6], 'idle', ARGV[5])
redis.call('PUBLISH', channel, 'E' .. field(run) .. field(epoch))
return {epoch, m[4], ARGV[4], ARGV[5], ARGV[6], 1}
