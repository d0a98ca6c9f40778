local id = ARGV[2]
if ARGV[1] == 'latest' then
  id = redis.call('GET', KEYS[2])
  if not id then return nil end
end
local record = redis.call('HGET', KEYS[1], id)
if not record then return {id} end
return {id, record}
