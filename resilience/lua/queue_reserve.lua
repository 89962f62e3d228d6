-- Reserve a place in line for one request, atomically against both caps.
--
-- KEYS[1]  the waiting set: sorted set of request id -> enqueue time (ms,
--          from Redis TIME)
-- KEYS[2]  the caller's waiting set, same members
-- ARGV[1]  request id
-- ARGV[2]  max depth of the whole line
-- ARGV[3]  max requests one caller may have in line
-- ARGV[4]  ms after which a reservation is stale (max wait + grace)
--
-- Returns {1, position} or {0, "global"|"per_user", depth}. Stale entries
-- (their API instance died before withdrawing them) are dropped first.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local stale = now - tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', stale)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', stale)
local depth = redis.call('ZCARD', KEYS[1])
if depth >= tonumber(ARGV[2]) then return {0, 'global', depth} end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  return {0, 'per_user', depth}
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1, redis.call('ZRANK', KEYS[1], ARGV[1]) + 1}
