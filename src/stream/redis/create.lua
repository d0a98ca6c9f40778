local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch then
  -- A losing proposal: that node's stream was empty and takes this epoch
  -- in place, but its viewers were told the proposal. Recorded (at most
  -- ARGV[5]), so every node, and one started later, knows it names this
  -- history.
  if epoch ~= ARGV[3] then
    local aliases = redis.call('HGET', KEYS[1], 'aliases') or ''
    local listed = string.find(' ' .. aliases .. ' ', ' ' .. ARGV[3] .. ' ', 1, true)
    local kept = 0
    for _ in string.gmatch(aliases, '%S+') do kept = kept + 1 end
    if not listed and kept < tonumber(ARGV[5]) then
      if aliases ~= '' then aliases = aliases .. ' ' end
      redis.call('HSET', KEYS[1], 'aliases', aliases .. ARGV[3])
      redis.call('PUBLISH', ARGV[1], 'A' .. field(ARGV[2]) .. field(epoch) .. field(ARGV[3]))
    end
  end
  return epoch
end
create(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return ARGV[3]
