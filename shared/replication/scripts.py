"""The Redis scripts behind the execution store (shared/replication/store.py): each change
that must be seen whole by workers on other hosts runs as one atomic script.

Hashes hold JSON-encoded values; the counts by task status and `bytes_moved` are plain
integers, so HINCRBY moves them.
"""

from __future__ import annotations

# Running and recent executions indexed in Redis, per rule and overall.
INDEX_LENGTH = 1000

# Take the marker (or replace a stale holder the caller names) and write the execution's
# hash and index entries, in one step: a marker never names an execution with no record.
START = f"""
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[5] then return holder end
redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
redis.call('del', KEYS[2])
for i = 6, #ARGV, 2 do redis.call('hset', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('expire', KEYS[2], ARGV[3])
for i = 3, 4 do
  redis.call('zadd', KEYS[i], ARGV[4], ARGV[1])
  redis.call('zremrangebyrank', KEYS[i], 0, {-1 - INDEX_LENGTH})
end
return 0
"""

# Add tasks not added yet, counting each once (a redelivered start adds nothing twice).
ADD_TASKS = """
for i = 2, #ARGV, 4 do
  if redis.call('hsetnx', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('hincrby', KEYS[2], 'total', 1)
    redis.call('hincrby', KEYS[2], ARGV[i + 2], 1)
    redis.call('hincrby', KEYS[2], 'bytes_moved', ARGV[i + 3])
  end
end
redis.call('expire', KEYS[1], ARGV[1])
redis.call('expire', KEYS[2], ARGV[1])
return 1
"""

# Replace a task and move the execution's counts and bytes by the difference, in one
# step. ARGV[5] lists the statuses the stored task must have (empty: any). The running
# marker is renewed if this execution holds it.
UPDATE_TASK = """
local old = redis.call('hget', KEYS[1], ARGV[1])
if not old then return 0 end
local previous = cjson.decode(old)
if ARGV[5] ~= '' then
  local allowed = false
  for status in string.gmatch(ARGV[5], '[^,]+') do
    if status == previous['status'] then allowed = true end
  end
  if not allowed then return 0 end
end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
if previous['status'] ~= ARGV[3] then
  redis.call('hincrby', KEYS[2], previous['status'], -1)
  redis.call('hincrby', KEYS[2], ARGV[3], 1)
end
local delta = tonumber(ARGV[4]) - (tonumber(previous['bytes_moved']) or 0)
if delta ~= 0 then redis.call('hincrby', KEYS[2], 'bytes_moved', string.format('%d', delta)) end
redis.call('expire', KEYS[1], ARGV[7])
redis.call('expire', KEYS[2], ARGV[7])
if redis.call('get', KEYS[3]) == ARGV[8] and redis.call('pttl', KEYS[3]) < tonumber(ARGV[6]) then
  redis.call('pexpire', KEYS[3], ARGV[6])
end
return 1
"""

# Close a running execution whose tasks are all over, and free its rule's marker: only
# one caller does it.
FINISH = """
if redis.call('hget', KEYS[1], 'status') ~= '"running"' then return 0 end
for _, field in ipairs({'pending', 'running', 'waiting'}) do
  if tonumber(redis.call('hget', KEYS[1], field) or '0') > 0 then return 0 end
end
redis.call('hset', KEYS[1], 'status', ARGV[2], 'finished', ARGV[3])
redis.call('expire', KEYS[1], ARGV[4])
redis.call('expire', KEYS[3], ARGV[4])
if redis.call('get', KEYS[2]) == ARGV[1] then redis.call('del', KEYS[2]) end
return 1
"""

# Finish an execution left by its worker while planning (its marker lapsed) with the fields
# given; not if it runs again (the marker names it) or is over already.
INTERRUPT = """
if redis.call('get', KEYS[2]) == ARGV[1] then return 0 end
if redis.call('hget', KEYS[1], 'status') ~= '"running"' then return 0 end
for i = 3, #ARGV, 2 do redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('expire', KEYS[1], ARGV[2])
return 1
"""

# Renew the marker if this execution holds it (never shorten it).
REFRESH = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('pttl', KEYS[1]) < tonumber(ARGV[2]) then redis.call('pexpire', KEYS[1], ARGV[2]) end
return 1
"""
