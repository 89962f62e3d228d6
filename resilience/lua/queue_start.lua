-- Mark a job started: leave the line and start its heartbeat in one step.
--
-- KEYS[1]  the waiting set
-- KEYS[2]  the caller's waiting set
-- KEYS[3]  the job's heartbeat key
-- KEYS[4]  the job's cancel flag
-- ARGV[1]  request id
-- ARGV[2]  heartbeat TTL (ms)
--
-- Returns 1 when the worker should stream the answer. Returns 0 when the
-- request was cancelled or is no longer in line (its client withdrew it,
-- or its reservation went stale because the API instance holding the
-- client died): nobody would read that answer.
local in_line = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if in_line == 0 or redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
redis.call('SET', KEYS[3], 'running', 'PX', ARGV[2])
return 1
