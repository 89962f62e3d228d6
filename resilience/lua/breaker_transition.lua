-- Apply one operation to a provider's circuit breaker, atomically.
--
-- Every state change of the shared breaker happens here, in one script, so
-- the fleet sees one state machine driven by one clock (Redis TIME).
--
-- KEYS[1]  hash  state: state, consecutive, opened_at (ms), successes
-- KEYS[2]  zset  half-open probe slots: member = permit token,
--                score = the slot's expiry in ms
-- KEYS[3]  hash  sliding window: "<bucket>:c" calls, "<bucket>:f" failures
-- ARGV[1]  op: acquire | success | failure | cancelled | state
--               | force_open | force_closed | reset
-- ARGV[2]  now in ms, or "" to use Redis TIME (tests pass their clock)
-- ARGV[3]  the permit token (acquire, success, failure, cancelled) or ""
-- ARGV[4]  failure_threshold (0 disables)
-- ARGV[5]  failure_rate_percent (0 disables)
-- ARGV[6]  window_ms          ARGV[7]  minimum_calls
-- ARGV[8]  recovery_ms        ARGV[9]  half_open_probes
-- ARGV[10] probe_timeout_ms   ARGV[11] bucket_ms
--
-- Returns {verdict, state, consecutive, opened_at, next_probe, now, changed,
--          window_calls, window_failures, probes_in_flight}
--   verdict     "admit", "probe", "reject" or "ok"
--   next_probe  ms when a probe may next be admitted, -1 if never by itself,
--               0 when calls are admitted now
--   changed     1 when this call changed the state (the caller logs it)
-- Times are integer ms, since Redis truncates Lua numbers it returns.

local op, token = ARGV[1], ARGV[3]
local threshold, rate = tonumber(ARGV[4]), tonumber(ARGV[5])
local window_ms, minimum = tonumber(ARGV[6]), tonumber(ARGV[7])
local recovery_ms, probes_max = tonumber(ARGV[8]), tonumber(ARGV[9])
local probe_timeout_ms, bucket_ms = tonumber(ARGV[10]), tonumber(ARGV[11])

local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local raw = redis.call('HMGET', KEYS[1], 'state', 'consecutive', 'opened_at',
  'successes')
local state = raw[1] or 'closed'
local consecutive = tonumber(raw[2] or '0')
local opened_at = tonumber(raw[3] or '0')
local successes = tonumber(raw[4] or '0')
local changed = 0
local verdict = 'ok'
local calls, fails = nil, nil

local function move(new)
  if new ~= state then
    state = new
    changed = 1
  end
end

local function window_counts()
  local oldest = math.floor(now / bucket_ms) - math.ceil(window_ms / bucket_ms) + 1
  local all = redis.call('HGETALL', KEYS[3])
  local c, f = 0, 0
  for i = 1, #all, 2 do
    local bucket = tonumber(string.sub(all[i], 1, -3))
    if bucket < oldest then
      redis.call('HDEL', KEYS[3], all[i])
    elseif string.sub(all[i], -1) == 'f' then
      f = f + tonumber(all[i + 1])
    else
      c = c + tonumber(all[i + 1])
    end
  end
  return c, f
end

local function count_call(failed)
  local bucket = tostring(math.floor(now / bucket_ms))
  redis.call('HINCRBY', KEYS[3], bucket .. ':c', 1)
  if failed then
    redis.call('HINCRBY', KEYS[3], bucket .. ':f', 1)
  end
  redis.call('PEXPIRE', KEYS[3], window_ms + bucket_ms)
end

local function trip()
  move('open')
  opened_at = now
  successes = 0
  redis.call('DEL', KEYS[2], KEYS[3])
end

local function should_trip()
  calls, fails = window_counts()
  if threshold > 0 and consecutive >= threshold then
    return true
  end
  return rate > 0 and calls >= minimum and calls > 0
    and fails * 100 >= rate * calls
end

local function claim_probe()
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if successes + redis.call('ZCARD', KEYS[2]) < probes_max then
    redis.call('ZADD', KEYS[2], now + probe_timeout_ms, token)
    redis.call('PEXPIRE', KEYS[2], probe_timeout_ms + recovery_ms)
    return 'probe'
  end
  return 'reject'
end

-- An open breaker whose recovery time has passed is half-open, whoever asks.
if state == 'open' and now >= opened_at + recovery_ms then
  move('half_open')
  successes = 0
  redis.call('DEL', KEYS[2])
end
if state == 'half_open' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end

if op == 'acquire' then
  if state == 'closed' or state == 'forced_closed' then
    verdict = 'admit'
  elseif state == 'half_open' then
    verdict = claim_probe()
  else
    verdict = 'reject'
  end
elseif op == 'success' then
  if state == 'closed' then
    consecutive = 0
    count_call(false)
  elseif state == 'half_open' and redis.call('ZREM', KEYS[2], token) == 1 then
    successes = successes + 1
    if successes >= probes_max then
      move('closed')
      consecutive, successes = 0, 0
      redis.call('DEL', KEYS[2], KEYS[3])
    end
  end
elseif op == 'failure' then
  if state == 'closed' then
    consecutive = consecutive + 1
    count_call(true)
    if should_trip() then
      trip()
    end
  elseif state == 'half_open' then
    -- Any failure seen while half-open, probe or late call, reopens it.
    consecutive = consecutive + 1
    trip()
  end
elseif op == 'cancelled' then
  redis.call('ZREM', KEYS[2], token)
elseif op == 'force_open' then
  move('forced_open')
  opened_at = now
  redis.call('DEL', KEYS[2])
elseif op == 'force_closed' then
  move('forced_closed')
  consecutive, successes = 0, 0
  redis.call('DEL', KEYS[2], KEYS[3])
elseif op == 'reset' then
  move('closed')
  consecutive, successes, opened_at = 0, 0, 0
  redis.call('DEL', KEYS[2], KEYS[3])
elseif op ~= 'state' then
  return redis.error_reply('unknown breaker op ' .. op)
end

redis.call('HSET', KEYS[1], 'state', state, 'consecutive', consecutive,
  'opened_at', opened_at, 'successes', successes)

local next_probe = 0
if state == 'open' then
  next_probe = opened_at + recovery_ms
elseif state == 'forced_open' then
  next_probe = -1
elseif state == 'half_open' and verdict == 'reject' then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  next_probe = tonumber(first[2] or now)
end
if calls == nil then
  calls, fails = window_counts()
end
local in_flight = 0
if state == 'half_open' then
  in_flight = redis.call('ZCARD', KEYS[2])
end
return {verdict, state, consecutive, opened_at, next_probe, now, changed,
  calls, fails, in_flight}
