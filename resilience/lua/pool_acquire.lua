-- Take one lease against a global cap and a per-caller cap, atomically.
--
-- KEYS[1]  the global lease set: sorted set of lease id -> expiry (ms, Redis time)
-- KEYS[2]  the caller's lease set, same shape
-- ARGV[1]  the new lease id (an unguessable token)
-- ARGV[2]  global cap (integer >= 0)
-- ARGV[3]  per-caller cap (integer >= 0)
-- ARGV[4]  lease TTL in milliseconds (integer > 0)
--
-- Returns {1, global_in_use, caller_in_use} when the lease was granted,
-- {0, "per_user" | "global", in_use} when a cap is reached. The caller's
-- cap is checked first: it is the more specific answer.
--
-- Time is Redis's own (TIME), never an app server's. Expired members are
-- purged before counting, so a crashed holder's lease stops counting by
-- itself once its TTL passes; nothing is counted by incr/decr pairs. Both
-- keys must live in one slot under Redis Cluster (the caller puts a hash
-- tag in both names).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[4])

local function keep_until_last(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', key, last[2])
  end
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)

local caller_in_use = redis.call('ZCARD', KEYS[2])
if caller_in_use >= tonumber(ARGV[3]) then
  return {0, 'per_user', caller_in_use}
end
local global_in_use = redis.call('ZCARD', KEYS[1])
if global_in_use >= tonumber(ARGV[2]) then
  return {0, 'global', global_in_use}
end

redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
keep_until_last(KEYS[1])
keep_until_last(KEYS[2])
return {1, global_in_use + 1, caller_in_use + 1}
