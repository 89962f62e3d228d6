-- Extend one live lease by its TTL, or report it gone.
--
-- KEYS[1]  the global lease set: sorted set of lease id -> expiry (ms, Redis time)
-- KEYS[2]  the holder's lease set, same shape
-- ARGV[1]  the lease id
-- ARGV[2]  lease TTL in milliseconds (integer > 0)
--
-- Returns 1 when the lease was live in both sets and now expires TTL from
-- now (Redis time), 0 when it is gone: absent from either set or already
-- expired. A half-present lease is removed from both sets, so the two
-- counts never disagree about it.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local in_global = redis.call('ZSCORE', KEYS[1], ARGV[1])
local in_caller = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not in_global or not in_caller
    or tonumber(in_global) <= now or tonumber(in_caller) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end

local expiry = now + tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', expiry, ARGV[1])
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', key, last[2])
end
return 1
