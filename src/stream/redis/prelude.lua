local function field(s) return #s .. ':' .. s end
local function create(meta, set, channel, run, epoch, idle)
  redis.call('HSET', meta, 'epoch', epoch, 'next', '0', 'seq', '', 'idle', idle)
  redis.call('SADD', set, run)
  redis.call('PUBLISH', channel, 'C' .. field(run) .. field(epoch) .. field(idle))
end
