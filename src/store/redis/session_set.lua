local out = {}
for _, sid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local record = redis.call('HGET', KEYS[2], sid)
  if record then
    out[#out + 1] = record
    out[#out + 1] = redis.call('HGET', KEYS[3], sid) or ''
  else
    redis.call('SREM', KEYS[1], sid)
  end
end
return out
