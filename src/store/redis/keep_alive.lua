local p, me, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', p .. ':alive:' .. me, '1', 'PX', ttl)
redis.call('SADD', p .. ':nodes', me)
redis.call('HDEL', p .. ':suspects', me)
local taken = {}
for _, node in ipairs(redis.call('SMEMBERS', p .. ':nodes')) do
  if node ~= me then
    if redis.call('EXISTS', p .. ':alive:' .. node) == 1 then
      redis.call('HDEL', p .. ':suspects', node)
    else
      redis.call('HSETNX', p .. ':suspects', node, now)
      local since = tonumber(redis.call('HGET', p .. ':suspects', node))
      if now - since >= ttl then
        local held = p .. ':held:' .. node
        for _, sid in ipairs(redis.call('SMEMBERS', held)) do
          local h = redis.call('HGET', KEYS[1], sid)
          if h then
            local hnode, rest = string.match(h, '^(%S+) (.*)$')
            if hnode == node then
              redis.call('HSET', KEYS[1], sid, me .. ' ' .. rest)
              redis.call('SADD', p .. ':held:' .. me, sid)
              local record = redis.call('HGET', KEYS[2], sid)
              if record then taken[#taken + 1] = record end
            end
          end
        end
        redis.call('DEL', held)
        redis.call('SREM', p .. ':nodes', node)
        redis.call('HDEL', p .. ':suspects', node)
      end
    end
  end
end
return taken
