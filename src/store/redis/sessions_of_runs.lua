local out = {}
for i, run in ipairs(ARGV) do
  local sid = redis.call('HGET', KEYS[1], run)
  out[i] = (sid and redis.call('HGET', KEYS[2], sid)) or false
end
return out
