local sid = redis.call('HGET', KEYS[1], ARGV[1])
if not sid then return nil end
local record = redis.call('HGET', KEYS[2], sid)
if not record then return nil end
return {record, redis.call('HGET', KEYS[3], sid) or ''}
