--[[
Admit one request against every bucket in KEYS, all or nothing, and lease
spare tokens to the calling instance.

KEYS[i]   the hash of the i-th bucket (rate_limiter.BucketRef.redis_key)

ARGV[1]   id of the calling limiter instance (who holds leases)
ARGV[2]   cost: tokens the request needs from every bucket
ARGV[3]   lease lifetime in ms
ARGV[4]   generation to record on a lease this call grants
then, for bucket i, at b = 4 + 5 * (i - 1):
ARGV[b+1] capacity (tokens)
ARGV[b+2] refill rate (tokens per second)
ARGV[b+3] tokens the caller would like to lease beyond the cost (0 = none)
ARGV[b+4] generation of the lease the caller hands back ("" = none)
ARGV[b+5] unspent tokens of that lease, credited back

Hash fields: t (tokens), ts (last update, ms on Redis's clock) and, per
instance id X holding a lease: o:X (tokens leased), g:X (generation),
e:X (expiry, ms). Leased tokens leave t when granted and also count
against the capacity until they are handed back or expire, so that
t + (all outstanding leases) <= capacity always holds: that invariant is
what keeps the fleet from admitting more than one bucket would.

Returns, as strings (Lua numbers would be truncated to integers):
{allowed (1/0), then per bucket: tokens left, tokens leased to the caller,
ms until the bucket can give `cost` tokens, ms until it is full}.
]]

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local me = ARGV[1]
local cost = tonumber(ARGV[2])
local lifetime = tonumber(ARGV[3])
local new_gen = ARGV[4]
local buckets = {}

-- Full precision: tostring keeps 14 digits, which drops sub-ms of a clock.
local function exact(x)
  return string.format('%.17g', x)
end

local function load(i)
  local b = 4 + 5 * (i - 1)
  local bucket = {
    key = KEYS[i],
    capacity = tonumber(ARGV[b + 1]),
    rate = tonumber(ARGV[b + 2]) / 1000,
    want = tonumber(ARGV[b + 3]),
    out = 0,
    latest = now,
    held = false,
    drop = {},
  }
  local fields = redis.call('HGETALL', bucket.key)
  local h = {}
  for j = 1, #fields, 2 do
    h[fields[j]] = fields[j + 1]
  end
  local tokens = tonumber(h['t']) or bucket.capacity
  local updated = tonumber(h['ts']) or now

  for field, value in pairs(h) do
    local id = string.match(field, '^e:(.*)$')
    if id then
      local expiry = tonumber(value)
      local amount = tonumber(h['o:' .. id]) or 0
      local returned = id == me and h['g:' .. id] == ARGV[b + 4]
      if returned then
        tokens = tokens + math.min(amount, tonumber(ARGV[b + 5]))
      end
      if returned or expiry <= now then
        table.insert(bucket.drop, 'o:' .. id)
        table.insert(bucket.drop, 'g:' .. id)
        table.insert(bucket.drop, field)
      else
        bucket.out = bucket.out + amount
        bucket.latest = math.max(bucket.latest, expiry)
        -- A lease of ours we did not hand back is in flight or its answer
        -- was lost: grant no second one until it expires.
        bucket.held = bucket.held or id == me
      end
    end
  end

  local room = math.max(0, bucket.capacity - bucket.out)
  if tokens < room then
    local elapsed = math.max(0, now - updated)
    tokens = math.min(room, tokens + elapsed * bucket.rate)
  else
    tokens = room
  end
  bucket.tokens = tokens
  return bucket
end

local allowed = true
for i = 1, #KEYS do
  buckets[i] = load(i)
  if buckets[i].tokens < cost then
    allowed = false
  end
end

local result = {allowed and '1' or '0'}
for i = 1, #KEYS do
  local bucket = buckets[i]
  local granted = 0
  if allowed then
    bucket.tokens = bucket.tokens - cost
    if not bucket.held and bucket.want >= 1 then
      granted = math.floor(math.min(bucket.want, bucket.tokens))
    end
  end
  if #bucket.drop > 0 then
    redis.call('HDEL', bucket.key, unpack(bucket.drop))
  end
  if granted > 0 then
    bucket.tokens = bucket.tokens - granted
    bucket.out = bucket.out + granted
    bucket.latest = math.max(bucket.latest, now + lifetime)
    redis.call('HSET', bucket.key, 'o:' .. me, granted, 'g:' .. me, new_gen,
      'e:' .. me, exact(now + lifetime))
  end
  redis.call('HSET', bucket.key, 't', exact(bucket.tokens), 'ts', exact(now))

  local wait = 0
  if bucket.tokens < cost then
    wait = (cost - bucket.tokens) / bucket.rate
    if cost > bucket.capacity - bucket.out then
      -- Outstanding leases hold the room: it frees when they expire.
      wait = math.max(wait, bucket.latest - now)
    end
  end
  local full = (bucket.capacity - bucket.tokens) / bucket.rate
  -- An absent key reads as a full bucket, which is true once it refilled
  -- and every lease on it expired.
  local keep = math.max(full, bucket.latest - now) + 1000
  redis.call('PEXPIRE', bucket.key, math.ceil(keep))

  table.insert(result, exact(bucket.tokens))
  table.insert(result, exact(granted))
  table.insert(result, exact(wait))
  table.insert(result, exact(full))
end
return result
