"""The Redis ledger's Lua scripts: each write is one script, so it is atomic and idempotent by item id.

A caption, once written, is never replaced; counters move only when an item's status changes; rows for items in
neither the manifest nor the rows hash are refused. Key layout: ``ledger.redis.keys``; row layout: ``rows``.
"""

from __future__ import annotations

from ledger import codec

# A shebang makes Redis (7+) refuse the whole script at maxmemory. Without one, Redis checks memory only at a
# script's first write, and a script that starts by deleting (HDEL) could then grow past maxmemory unchecked.
OOM_CHECKED = "#!lua\n"

# Marks a job done once every manifest item has a row and no container is open, unless the producer is still
# adding items ('open'). KEYS[1] is the job hash, KEYS[7] the containers hash; ARGV[1] is now.
FINISH = """
local finished = 0
local h = redis.call('HMGET', KEYS[1], 'n_total', 'n_ok', 'n_error', 'n_cancelled', 'state', 'open')
local total = tonumber(h[1] or '0') or 0
local settled = (tonumber(h[2] or '0') or 0) + (tonumber(h[3] or '0') or 0) + (tonumber(h[4] or '0') or 0)
if total > 0 and settled >= total and h[5] == 'running' and not h[6] and redis.call('HLEN', KEYS[7]) == 0 then
  redis.call('HSET', KEYS[1], 'state', 'done', 'finished', ARGV[1])
  finished = 1
end
"""

# A stored row's first byte holds its status (bits 0-1: 1 ok, 2 error, 3 cancelled) and quality flags (bits 2-4).
STATUS_FIELD = """local names = {o = 'n_ok', e = 'n_error', c = 'n_cancelled'}
local codes = {[1] = 'o', [2] = 'e', [3] = 'c'}
local function status_of(row) return codes[string.byte(row, 1) % 4] end
local function quality_of(row) return math.floor(string.byte(row, 1) / 4) % 8 end
"""
FLAG_NAMES = (
    "local flagnames = {"
    + ", ".join(f"'{f}'" for f in codec.FLAG_BITS)
    + """}
local function countflags(job, bits, delta)
  for b = 1, #flagnames do
    if bit.band(bits, bit.lshift(1, b - 1)) ~= 0 then redis.call('HINCRBY', job, 'flag_' .. flagnames[b], delta) end
  end
end
"""
)

# KEYS: job, src, res, att, err, flg, ctr.  ARGV: now, then (id, status byte, flag byte, row) quads.
# Returns {rows whose status changed, 1 if the job finished, rows refused (item not in the job)}.
RECORD = (
    STATUS_FIELD
    + FLAG_NAMES
    + """
local changed, refused = 0, 0
for i = 2, #ARGV, 4 do
  local id, st, bits, body = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local prev = redis.call('HGET', KEYS[3], id)
  if not prev and redis.call('HEXISTS', KEYS[2], id) == 0 then
    refused = refused + 1
  else
    redis.call('HDEL', KEYS[4], id, id .. ':f', id .. ':s')
    local prevst = prev and status_of(prev)
    if prevst ~= 'o' then  -- a caption is final: exactly one row per item, whatever is redelivered
      redis.call('HSET', KEYS[3], id, body)
      redis.call('HDEL', KEYS[2], id)
      if prevst ~= st then
        if prevst then redis.call('HINCRBY', KEYS[1], names[prevst], -1) end
        redis.call('HINCRBY', KEYS[1], names[st], 1)
        changed = changed + 1
      end
      if prevst == 'e' and st ~= 'e' then redis.call('SREM', KEYS[5], id) end
      if st == 'e' then redis.call('SADD', KEYS[5], id) end
      if st == 'o' and bit.band(bits, 7) ~= 0 then
        redis.call('SADD', KEYS[6], id)
        countflags(KEYS[1], bits, 1)
      end
    end
  end
end
"""
    + FINISH
    + "return {changed, finished, refused}\n"
)

# The reference a stored row holds: after the header, three varints (provenance, attempts, finished) and its length.
REF_OF = """
local function varint(s, pos)
  local n, mul = 0, 1
  while true do
    local b = string.byte(s, pos)
    pos = pos + 1
    n = n + (b % 128) * mul
    if b < 128 then return n, pos end
    mul = mul * 128
  end
end
local function ref_of(row)
  local pos = 2
  for _ = 1, 3 do
    local _, next_pos = varint(row, pos)
    pos = next_pos
  end
  local len, start = varint(row, pos)
  return string.sub(row, start, start + len - 1)
end
"""

# KEYS: job, src, res, att, err, flg.  ARGV: mode ('failed', 'flagged' or 'all'), then item ids going back on the
# queue. Their failed or cancelled rows (in mode 'flagged' also captions with quality flags, in mode 'all' every
# caption) are removed, counters follow, and the reference moves back to the manifest: the item is pending again.
REQUEUE = (
    STATUS_FIELD
    + FLAG_NAMES
    + REF_OF
    + """
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local prev = redis.call('HGET', KEYS[3], id)
  if prev then
    local st, bits = status_of(prev), quality_of(prev)
    local flagged = bits ~= 0
    if st ~= 'o' or ARGV[1] == 'all' or (ARGV[1] == 'flagged' and flagged) then
      redis.call('HSET', KEYS[2], id, ref_of(prev))
      redis.call('HDEL', KEYS[3], id)
      redis.call('HINCRBY', KEYS[1], names[st], -1)
      redis.call('SREM', KEYS[5], id)
      if st == 'o' then
        redis.call('SREM', KEYS[6], id)
        countflags(KEYS[1], bits, -1)
      end
      n = n + 1
    end
  end
  redis.call('HDEL', KEYS[4], id, id .. ':f', id .. ':s')
end
return n
"""
)

# KEYS: src, job, res.  ARGV: (id, ref) pairs.  New manifest entries and the job's total move together.
ADD_ITEMS = """
local new = 0
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0 then
    new = new + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if new > 0 then redis.call('HINCRBY', KEYS[2], 'n_total', new) end
return new
"""

# KEYS: attempts hash.  ARGV: item ids starting an attempt.  Returns, per id: attempts started (this one
# included), attempts finished, attempts run alone.
BEGIN = """
local out = {}
for i = 1, #ARGV do
  local id = ARGV[i]
  out[#out + 1] = redis.call('HINCRBY', KEYS[1], id, 1)
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[1], id .. ':f') or '0')
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[1], id .. ':s') or '0')
end
return out
"""

# KEYS: job, src, res, att, err, flg, ctr (the record script's).  ARGV: now.
SEAL = "redis.call('HDEL', KEYS[1], 'open')\n" + FINISH + "return finished\n"
# KEYS: the same.  ARGV: now, container id.
CLOSE_CONTAINER = "redis.call('HDEL', KEYS[7], ARGV[2])\n" + FINISH + "return finished\n"

# KEYS: provenance hash.  ARGV: provenance key.  Its index, given the next free one if new.
PROVENANCE = """
local idx = redis.call('HGET', KEYS[1], ARGV[1])
if idx then return tonumber(idx) end
idx = redis.call('HLEN', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], idx)
return idx
"""

# KEYS: lock key.  ARGV: owner, ttl seconds.  Take a free lock or refresh our own; 0 when another owner has it.
LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""
# KEYS: lock key.  ARGV: owner.  Delete the lock only if we still hold it.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
