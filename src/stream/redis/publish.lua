local meta, xs = KEYS[1], KEYS[2]
local channel, run = ARGV[1], ARGV[2]
if ARGV[5] ~= '' then
  local holder = redis.call('HGET', KEYS[4], ARGV[5]) or ''
  if string.sub(holder, 1, #ARGV[6]) ~= ARGV[6] then return 'fenced' end
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[3]
  create(meta, KEYS[3], channel, run, epoch, 'active')
end
local ended = redis.call('HGET', meta, 'end')
if ended then return 'ended:' .. ended end
local next = tonumber(redis.call('HGET', meta, 'next'))
local seq = redis.call('HGET', meta, 'seq') or ''
local first = next
local flags, kept = {}, {}
for i = 8, #ARGV, 2 do
  local s = ARGV[i]
  if s ~= '' and seq ~= '' and s <= seq then
    flags[#flags + 1] = '0'
  else
    if s ~= '' then seq = s end
    flags[#flags + 1] = '1'
    kept[#kept + 1] = ARGV[i + 1]
  end
end
local parts = {}
local floor = math.max(0, next + #kept - tonumber(ARGV[4]))
local per = tonumber(ARGV[7])
local j = 1
while j <= #kept do
  local fields = {}
  local last = math.min(#kept, j + per - 1)
  for k = j, last do
    fields[#fields + 1] = 'e'
    fields[#fields + 1] = kept[k]
    parts[k] = field(kept[k])
  end
  redis.call('XADD', xs, 'MINID', '=', string.format('%d-0', floor),
    string.format('%d-1', next), unpack(fields))
  next = next + (last - j + 1)
  j = last + 1
end
if #kept > 0 then
  redis.call('HSET', meta, 'next', string.format('%d', next), 'seq', seq)
  redis.call('PUBLISH', channel, 'B' .. field(run) .. field(epoch)
    .. field(string.format('%d', first)) .. field(seq) .. table.concat(parts))
end
return {epoch, first, #kept, #flags - #kept, next, seq, table.concat(flags)}
