local p, me, max_runs = ARGV[1], ARGV[2], tonumber(ARGV[3])
local mine = p .. ':held:' .. me
local refused = {}
-- The tenant a stored record counts for ('' for none).
local function tenant_of(stored)
  if not stored then return '' end
  local ok, r = pcall(cjson.decode, string.sub(stored, 2))
  if ok and type(r) == 'table' and type(r.tenant) == 'string' then return r.tenant end
  return ''
end
-- The runs a tenant holds, and a change to them (never below zero).
local function runs_of(tenant)
  return tonumber(redis.call('HGET', p .. ':usage:' .. tenant, 'runs') or '0')
end
local function count(tenant, delta)
  if tenant == '' then return end
  local n = math.max(0, runs_of(tenant) + delta)
  redis.call('HSET', p .. ':usage:' .. tenant, 'runs', n)
end
for i = 4, #ARGV, 8 do
  local op, sid, run, epoch, expired, parent, record, tenant = ARGV[i], ARGV[i + 1],
    ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local holder = redis.call('HGET', KEYS[2], sid)
  local hnode, hepoch
  if holder then hnode, hepoch = string.match(holder, '^(%S+) (%d+)') end
  if op == 'P' then
    local ok = true
    if holder then
      if epoch < hepoch or (epoch == hepoch and hnode ~= me) then
        ok = false
        refused[#refused + 1] = sid
        refused[#refused + 1] = hepoch
      end
    else
      local other = redis.call('HGET', KEYS[3], run)
      if other and other ~= sid then
        local oh = redis.call('HGET', KEYS[2], other)
        if oh and string.sub(oh, -1) == '0' then
          ok = false
          refused[#refused + 1] = sid
          refused[#refused + 1] = ''
        else
          -- A tombstone of the run gives way to its fresh session, unless
          -- the fresh one is past its tenant's runs (what the tombstone
          -- frees counted).
          local old_tenant = tenant_of(redis.call('HGET', KEYS[1], other))
          local frees = (old_tenant == tenant) and 1 or 0
          if tenant ~= '' and runs_of(tenant) - frees + 1 > max_runs then
            ok = false
            refused[#refused + 1] = sid
            refused[#refused + 1] = 'q' .. runs_of(tenant)
          else
            redis.call('HDEL', KEYS[1], other)
            redis.call('HDEL', KEYS[2], other)
            if oh then
              redis.call('SREM', p .. ':held:' .. string.match(oh, '^(%S+)'), other)
            end
            count(old_tenant, -1)
          end
        end
      end
      -- A session the store did not have counts against its tenant.
      if ok and tenant ~= '' then
        if runs_of(tenant) + 1 > max_runs then
          ok = false
          refused[#refused + 1] = sid
          refused[#refused + 1] = 'q' .. runs_of(tenant)
        else
          count(tenant, 1)
        end
      end
    end
    if ok then
      redis.call('HSET', KEYS[1], sid, record)
      redis.call('HSET', KEYS[2], sid, me .. ' ' .. epoch .. ' ' .. expired)
      redis.call('HSET', KEYS[3], run, sid)
      redis.call('SADD', mine, sid)
      if parent ~= '' then redis.call('SADD', p .. ':children:' .. parent, sid) end
      if holder and hnode ~= me then
        redis.call('SREM', p .. ':held:' .. hnode, sid)
        redis.call('PUBLISH', p .. ':session-moves', sid .. ' ' .. epoch .. ' ' .. me)
      end
    end
  else
    if holder and hnode ~= me then
      refused[#refused + 1] = sid
      refused[#refused + 1] = hepoch
    else
      -- The run's index and the parent's set name the session only
      -- through its record (a delete carries no run): read them there.
      local old = redis.call('HGET', KEYS[1], sid)
      count(tenant_of(old), -1)
      if old then
        local ok, r = pcall(cjson.decode, string.sub(old, 2))
        if ok and type(r) == 'table' then
          if type(r.runId) == 'string' and redis.call('HGET', KEYS[3], r.runId) == sid then
            redis.call('HDEL', KEYS[3], r.runId)
          end
          if type(r.parent) == 'string' then
            redis.call('SREM', p .. ':children:' .. r.parent, sid)
          end
        end
      end
      redis.call('HDEL', KEYS[1], sid)
      redis.call('HDEL', KEYS[2], sid)
      redis.call('SREM', mine, sid)
    end
  end
end
return refused
