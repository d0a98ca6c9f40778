-- KEYS[1] the run's checkpoint hash, KEYS[2] its latest id, KEYS[3] its
-- owner; ARGV[1] the tenant charged if the run has no owner, ARGV[2] that
-- tenant's checkpointBytes limit, ARGV[3] the usage key prefix, ARGV[4]
-- the record header's length, ARGV[5] the id, ARGV[6] the record.
-- Returns {} when saved, {used, growth} when refused.
local id, record, header = ARGV[5], ARGV[6], tonumber(ARGV[4])
local before = 0
if redis.call('HEXISTS', KEYS[1], id) == 1 then
  before = #id + math.max(0, redis.call('HSTRLEN', KEYS[1], id) - header)
end
local growth = #id + math.max(0, #record - header) - before
local owner = redis.call('GET', KEYS[3]) or ARGV[1]
local usage = ARGV[3] .. owner
local used = tonumber(redis.call('HGET', usage, 'checkpointBytes') or '0')
if growth > 0 and used + growth > tonumber(ARGV[2]) then return {used, growth} end
redis.call('HSET', KEYS[1], id, record)
redis.call('SET', KEYS[2], id)
redis.call('HSET', usage, 'checkpointBytes', string.format('%d', math.max(0, used + growth)))
redis.call('SET', KEYS[3], owner)
return {}
