"""
The Lua scripts of L{lmgate.limits.redis.RedisStore}: each admission, each
settlement, each renewal, show and reset is one script, run atomically by Redis
with Redis's own clock (C{TIME}), so every gateway sharing the Redis counts the
same way without trusting its own clock.

Every script takes C{ARGV[1]} = the key prefix and C{ARGV[2]} = an offset in
milliseconds added to C{TIME} (0 in service; tests use it to stand on either
side of a window boundary or past a lease without waiting).

Key layout (C{P} = the prefix, C{lmgate:} by default; docs/limits.md):

  - C{P f:<counter>}: hash, kind -> C{<limit>|<rule>}: each figure as last admitted.
  - C{P b:<counter>:<kind>}: hash C{tk} (taken from the bucket at C{ts}), C{ts}
    (ms): a token bucket; absent = full.
  - C{P c:<counter>}: sorted set of request ids scored by lease expiry (ms).
  - C{P w:<counter>:<kind>:<window>}: hash C{used}, C{reserved}; the window is
    C{YYYY-MM-DD} or C{YYYY-MM} (UTC).
  - C{P r:<request id>}: hash, each state key the admission reserved in ->
    C{<kind>|<amount>|<limit>}, so the settlement applies to the same keys.
"""

from __future__ import annotations

#: Functions every script shares.
COMMON = r"""
local P = ARGV[1]
local function nowMs()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
end
local function fmt(x) return string.format('%.17g', x) end
local DAY = 86400000
local WINDOW_MARGIN = 3600000
local RESERVATION_MARGIN = DAY
local function civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m, d
end
local function daysFromCivil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function calendarWindow(kind, now)
  local day = math.floor(now / DAY)
  local y, m, d = civil(day)
  if string.sub(kind, -8) == '_per_day' then
    return string.format('%04d-%02d-%02d', y, m, d), (day + 1) * DAY
  end
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return string.format('%04d-%02d', y, m), daysFromCivil(ny, nm, 1) * DAY
end
-- Each script call asks for the same day's and month's window again for
-- every figure: worked out once.
local windows = {}
local function window(kind, now)
  local per = string.sub(kind, -8) == '_per_day' and 'd' or 'm'
  local known = windows[per]
  if not known then
    local id, ends = calendarWindow(kind, now)
    known = {id, ends}
    windows[per] = known
  end
  return known[1], known[2]
end
local function shape(kind)
  if kind == 'requests_per_minute' or kind == 'tokens_per_minute' then return 'bucket' end
  if kind == 'concurrent' then return 'lease' end
  return 'window'
end
local function stateKey(counter, kind, now)
  local s = shape(kind)
  if s == 'bucket' then return P .. 'b:' .. counter .. ':' .. kind, nil end
  if s == 'lease' then return P .. 'c:' .. counter, nil end
  local id, ends = window(kind, now)
  return P .. 'w:' .. counter .. ':' .. kind .. ':' .. id, ends
end
local function amountOf(kind, tokens, nano)
  if kind == 'requests_per_minute' or kind == 'concurrent' then return 1 end
  if string.sub(kind, 1, 4) == 'usd_' then return nano end
  return tokens
end
-- A bucket keeps what was taken from it (not its level), so a changed limit
-- keeps what was counted and only changes the capacity and the refill rate.
local function bucketLevel(key, limit, now)
  local h = redis.call('HMGET', key, 'tk', 'ts')
  if not h[1] then return limit end
  local elapsed = math.max(0, now - tonumber(h[2]))
  return limit - math.max(0, tonumber(h[1]) - elapsed * limit / 60000)
end
local function writeBucket(key, limit, level, now)
  local taken = limit - level
  if taken <= 0 then
    redis.call('DEL', key)
    return 0
  end
  redis.call('HSET', key, 'tk', fmt(taken), 'ts', now)
  local ttl = math.ceil(taken * 60000 / limit) + 1000
  redis.call('PEXPIRE', key, ttl)
  return ttl
end
local function bucketState(lv, limit)
  local used = math.max(0, math.ceil(limit - lv - 1e-9))
  return {used, 0, math.max(0, math.floor(lv + 1e-9)), (limit - lv) * 60 / limit, lv}
end
-- {used, reserved, remaining, reset seconds, fill}; fill: bucket level, lease count, window used+reserved
local function readState(kind, key, ends, limit, now, prune)
  local s = shape(kind)
  if s == 'bucket' then
    return bucketState(bucketLevel(key, limit, now), limit)
  end
  if s == 'lease' then
    local count
    if prune then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      count = redis.call('ZCARD', key)
    else
      count = redis.call('ZCOUNT', key, '(' .. now, '+inf')
    end
    local reset = 0
    if count >= limit and count > 0 then
      local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      reset = math.max(0, (tonumber(last[2]) - now) / 1000)
    end
    return {count, 0, math.max(0, limit - count), reset, count}
  end
  local h = redis.call('HMGET', key, 'used', 'reserved')
  local used = tonumber(h[1] or '0')
  local reserved = tonumber(h[2] or '0')
  return {used, reserved, math.max(0, limit - used - reserved), (ends - now) / 1000, used + reserved, not h[1] and not h[2]}
end
local function fits(kind, st, amount, limit)
  local s = shape(kind)
  if s == 'bucket' then return st[5] + 1e-9 >= amount end
  return st[5] + amount <= limit
end
-- An admission's reply is one string (comma-separated integers, milliseconds
-- for times): one element to parse on the gateway's side, whatever the number
-- of figures.
local function retryAfter(kind, st, amount, limit)
  local s = shape(kind)
  if s == 'bucket' then return math.ceil((amount - st[5]) * 60000 / limit) end
  if s == 'lease' then return -1 end
  return math.ceil(st[4] * 1000)
end
local function keepLonger(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
local function pushState(out, st)
  table.insert(out, string.format('%d', st[1]))
  table.insert(out, string.format('%d', st[2]))
  table.insert(out, string.format('%d', st[3]))
  table.insert(out, string.format('%d', math.ceil(st[4] * 1000)))
end
"""

#: ARGV: prefix, offset, request id, tokens, nano-dollars, lease ms, C{0}
#: when the caller wrote these counters' figures (the C{f:} keys) lately as
#: they are (C{1}: write them), the number of figures n, then n × (counter,
#: rule, kind, limit): flat, so that neither side encodes or decodes JSON.
#: Answers C{1} when admitted (the states after an admission are read by no
#: one: computing and sending them cost more than the rest of the reply); when
#: refused, integers joined by commas: 0, the refusing figure's index
#: (1-based), retry after ms (-1 if unknown), then for each figure: used,
#: reserved, remaining, reset ms.
#:
#: The call's C{r:} hash names each state key it reserved in (its field) with
#: C{kind|amount|limit} (its value), the amounts and limits as the gateway
#: sent them: the settlement reads it with one C{HGETALL}.
ADMIT = COMMON + r"""
local rid, tokensText, nanoText, lease = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local tokens, nano = tonumber(tokensText), tonumber(nanoText)
local n = tonumber(ARGV[8])
local now = nowMs()
local figures = {}
for i = 1, n do
  local b = 8 + (i - 1) * 4
  local counter, rule, kind, limitText = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local limit = tonumber(limitText)
  local key, ends = stateKey(counter, kind, now)
  local st = readState(kind, key, ends, limit, now, true)
  local amount, amountText = 1, '1'
  if kind ~= 'requests_per_minute' and kind ~= 'concurrent' then
    if string.sub(kind, 1, 4) == 'usd_' then amount, amountText = nano, nanoText else amount, amountText = tokens, tokensText end
  end
  figures[i] = {counter, rule, kind, limit, key, ends, st, amount, amountText, limitText}
end
for i = 1, n do
  local f = figures[i]
  if not fits(f[3], f[7], f[8], f[4]) then
    local out = {'0', tostring(i), string.format('%d', retryAfter(f[3], f[7], f[8], f[4]))}
    for j = 1, n do pushState(out, figures[j][7]) end
    return table.concat(out, ',')
  end
end
local entries = {}
local reservationTtl = 0
local metas, metaOrder = {}, {}
for i = 1, n do
  local counter, rule, kind, limit, key, ends, st, amount, amountText, limitText = unpack(figures[i])
  local s = shape(kind)
  local ttl
  if s == 'bucket' then
    ttl = writeBucket(key, limit, st[5] - amount, now)
  elseif s == 'lease' then
    redis.call('ZADD', key, now + lease, rid)
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    ttl = math.ceil(tonumber(last[2]) - now) + 1000
    redis.call('PEXPIRE', key, ttl)
    reservationTtl = math.max(reservationTtl, math.ceil(lease) + RESERVATION_MARGIN)
  else
    redis.call('HINCRBY', key, 'reserved', amount)
    ttl = ends - now + WINDOW_MARGIN
    -- a window lives until it ends (and a margin): its expiry is set once,
    -- when the admission creates it
    if st[6] then redis.call('PEXPIRE', key, ttl) end
    reservationTtl = math.max(reservationTtl, ends - now + RESERVATION_MARGIN)
  end
  if kind ~= 'requests_per_minute' then
    table.insert(entries, key)
    table.insert(entries, kind .. '|' .. amountText .. '|' .. limitText)
    if s == 'bucket' then reservationTtl = math.max(reservationTtl, RESERVATION_MARGIN) end
  end
  local meta = metas[counter]
  if not meta then
    meta = {ttl = 1000, figures = {}}
    metas[counter] = meta
    table.insert(metaOrder, counter)
  end
  meta.ttl = math.max(meta.ttl, ttl)
  table.insert(meta.figures, i)
end
-- ARGV[7] '0': the caller wrote these figures lately, as they are: only a
-- counter whose figures are gone (expired, reset) gets them again.
local metaKnown = ARGV[7] == '0'
for _, counter in ipairs(metaOrder) do
  local key, meta = P .. 'f:' .. counter, metas[counter]
  if not metaKnown or redis.call('EXISTS', key) == 0 then
    local fields = {}
    for _, i in ipairs(meta.figures) do
      table.insert(fields, figures[i][3])
      table.insert(fields, figures[i][10] .. '|' .. figures[i][2])
    end
    redis.call('HSET', key, unpack(fields))
    keepLonger(key, meta.ttl)
  end
end
if #entries > 0 then
  local r = P .. 'r:' .. rid
  redis.call('HSET', r, unpack(entries))
  redis.call('PEXPIRE', r, reservationTtl)
end
return '1'

"""

#: ARGV: prefix, offset, n, then n × (request id, tokens or '', nano-dollars
#: or '', '1' if the upstream answered else '0'). Answers how many were
#: applied (the others were settled before, or never admitted here).
SETTLE = COMMON + r"""
local n = tonumber(ARGV[3])
local now = nowMs()
local applied = 0
for i = 1, n do
  local b = 3 + (i - 1) * 4
  local rid, tokens, nano, reached = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), ARGV[b + 4] == '1'
  local r = P .. 'r:' .. rid
  local e = redis.call('HGETALL', r)
  if #e > 0 then
    applied = applied + 1
    redis.call('DEL', r)
    for j = 1, #e, 2 do
      local key = e[j]
      local kind, amountText, limitText = string.match(e[j + 1], '^([^|]*)|([^|]*)|(.*)$')
      local amount, limit = tonumber(amountText), tonumber(limitText)
      local s = shape(kind)
      local real = amountOf(kind, tokens, nano)
      if real == nil then
        if reached then real = amount else real = 0 end
      end
      if s == 'lease' then
        redis.call('ZREM', key, rid)
      elseif s == 'bucket' then
        if real ~= amount then
          writeBucket(key, limit, math.min(limit, bucketLevel(key, limit, now) + amount - real), now)
        end
      elseif redis.call('EXISTS', key) == 1 then
        if redis.call('HINCRBY', key, 'reserved', 0 - amount) < 0 then
          redis.call('HSET', key, 'reserved', 0)
        end
        redis.call('HINCRBY', key, 'used', real)
      end
    end
  end
end
return applied
"""

#: ARGV: prefix, offset, lease ms, then request ids. Answers how many leases were extended.
RENEW = COMMON + r"""
local lease = tonumber(ARGV[3])
local now = nowMs()
local renewed = 0
for i = 4, #ARGV do
  local rid = ARGV[i]
  local e = redis.call('HGETALL', P .. 'r:' .. rid)
  for j = 1, #e, 2 do
    local key = e[j]
    if string.sub(e[j + 1], 1, 11) == 'concurrent|' and redis.call('ZSCORE', key, rid) then
      redis.call('ZADD', key, 'XX', now + lease, rid)
      keepLonger(key, math.ceil(lease) + 1000)
      renewed = renewed + 1
    end
  end
end
return renewed
"""

#: ARGV: prefix, offset, then counters. Answers 8 fields per figure: counter,
#: rule, kind, limit, used, reserved, remaining, reset ms.
SHOW = COMMON + r"""
local now = nowMs()
local out = {}
for i = 3, #ARGV do
  local counter = ARGV[i]
  local h = redis.call('HGETALL', P .. 'f:' .. counter)
  for j = 1, #h, 2 do
    local kind, v = h[j], h[j + 1]
    local bar = string.find(v, '|', 1, true)
    local limit, rule = tonumber(string.sub(v, 1, bar - 1)), string.sub(v, bar + 1)
    local key, ends = stateKey(counter, kind, now)
    table.insert(out, counter)
    table.insert(out, rule)
    table.insert(out, kind)
    table.insert(out, limit)
    pushState(out, readState(kind, key, ends, limit, now, false))
  end
end
return out
"""

#: ARGV: prefix, offset, then counters. Deletes each figure's current state
#: and the figures themselves; answers how many figures were removed.
RESET = COMMON + r"""
local now = nowMs()
local removed = 0
for i = 3, #ARGV do
  local counter = ARGV[i]
  local meta = P .. 'f:' .. counter
  local kinds = redis.call('HKEYS', meta)
  for _, kind in ipairs(kinds) do
    local key = stateKey(counter, kind, now)
    redis.call('DEL', key)
    removed = removed + 1
  end
  redis.call('DEL', meta)
end
return removed
"""
