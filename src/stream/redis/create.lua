local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch then return epoch end
create(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return ARGV[3]
