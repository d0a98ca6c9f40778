local m = redis.call('HMGET', KEYS[1], 'epoch', 'next', 'seq', 'idle', 'end', 'endedAt', 'endMsg', 'aliases')
if not m[1] then return nil end
local entries = {}
if ARGV[1] == '' or ARGV[1] == m[1] then
  local start = ARGV[2] .. '-1'
  if ARGV[4] == 'after' then
    start = '(' .. start
  else
    local holding = redis.call('XREVRANGE', KEYS[2], start, '-', 'COUNT', 1)
    if holding[1] then
      -- The last entry starting at or before `from`: it holds `from`
      -- unless it ends before it (then the read starts after it).
      local first = tonumber(string.match(holding[1][1], '^(%d+)'))
      if first + #holding[1][2] / 2 > tonumber(ARGV[2]) then
        start = holding[1][1]
      else
        start = '(' .. holding[1][1]
      end
    end
  end
  entries = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', ARGV[3])
end
return {m[1], m[2], m[3] or '', m[4] or 'active', entries, m[5] or '', m[6] or '', m[7] or '', m[8] or ''}
