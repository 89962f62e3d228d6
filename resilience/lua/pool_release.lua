-- Give one lease back: remove exactly that member, nothing else.
--
-- KEYS[1]  the global lease set: sorted set of lease id -> expiry (ms)
-- KEYS[2]  the holder's lease set, same shape
-- ARGV[1]  the lease id
--
-- Returns 1 when the lease was removed, 0 when there was nothing to remove.
-- The id counts only together with its holder: an id released under
-- another caller's name, a second release or an unknown id remove
-- nothing, so no release can free someone else's slot. (A lease whose
-- caller entry Redis lost stays in the global set until its TTL passes.)

if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
