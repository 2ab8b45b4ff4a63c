"""
The Lua scripts of L{lmgate.limits.redis.RedisStore}: each admission, each
settlement, each renewal, show and reset is one script, run atomically by Redis
with Redis's own clock (C{TIME}), so every gateway sharing the Redis counts the
same way without trusting its own clock.

Every script takes C{ARGV[1]} = the key prefix and C{ARGV[2]} = an offset in
milliseconds added to C{TIME} (0 in service; tests use it to stand on either
side of a window boundary or past a lease without waiting).

Key layout (C{P} = the prefix, C{lmgate:} by default; docs/limits.md): one
hash per counter holds everything but its leases, so an admission reads and
writes each counter once, whatever its number of figures.

  - C{P s:<counter>}: hash. For each figure kind C{K} the counter has:
    C{K.f} = C{<limit>|<rule>} (the figure as last admitted: what show and
    reset read); a token bucket (C{requests_per_minute}, C{tokens_per_minute}):
    C{K.t} taken from it at C{K.s} (ms; nothing taken = full); a calendar window
    (C{tokens_per_day}, ...): C{K.w} its id (C{YYYY-MM-DD} or C{YYYY-MM}, UTC),
    C{K.u} used, C{K.r} reserved (an older id: the window has turned, both 0);
    leases (C{concurrent}): C{concurrent.n} the lease set's size as last
    counted (never less than its live leases: an admission that would not fit
    counts them exactly), C{concurrent.x} when the lease set expires (ms, as
    last set; absent or 0: not known to exist). C{x}: when the hash itself
    expires (ms). It expires when its longest-lived state would be gone.
  - C{P c:<counter>}: sorted set of request ids scored by lease expiry (ms).
  - C{P r:<request id>}: string, a MessagePack array: counter, what the
    admission reserved there (C{K|amount|limit[|window]} joined by C{;}),
    counter, ..., so the settlement applies to the same figures (and to the
    window it reserved in).

An admission is one C{HMGET} and one C{HSET} per counter, a C{ZADD} per lease
set, one C{SET} of its reservation and C{TIME}; a batch of settlements reads
every reservation with one C{MGET}, deletes them with one C{DEL}, and reads and
writes each counter it touches once, whatever the number of settlements.
"""

from __future__ import annotations

#: What every script shares: the time, the calendar, a figure's shape and state.
COMMON = r"""
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local DAY = 86400000
local WINDOW_MARGIN = 3600000
local RESERVATION_MARGIN = DAY
local SHAPE = {requests_per_minute = 'b', tokens_per_minute = 'b', concurrent = 'l',
               tokens_per_day = 'd', usd_per_day = 'd', tokens_per_month = 'm', usd_per_month = 'm'}
-- Each kind's field names in a counter's state: its figure, then its state
-- (constants: no string is built per call).
local FIELDS = {
  requests_per_minute = {'requests_per_minute.f', 'requests_per_minute.t', 'requests_per_minute.s'},
  tokens_per_minute = {'tokens_per_minute.f', 'tokens_per_minute.t', 'tokens_per_minute.s'},
  concurrent = {'concurrent.f', 'concurrent.n', 'concurrent.x'},
  tokens_per_day = {'tokens_per_day.f', 'tokens_per_day.w', 'tokens_per_day.u', 'tokens_per_day.r'},
  tokens_per_month = {'tokens_per_month.f', 'tokens_per_month.w', 'tokens_per_month.u', 'tokens_per_month.r'},
  usd_per_day = {'usd_per_day.f', 'usd_per_day.w', 'usd_per_day.u', 'usd_per_day.r'},
  usd_per_month = {'usd_per_month.f', 'usd_per_month.w', 'usd_per_month.u', 'usd_per_month.r'},
}
-- What each kind counts: calls, tokens or nano-dollars.
local COUNTS = {requests_per_minute = 'calls', concurrent = 'calls', tokens_per_minute = 'tokens', tokens_per_day = 'tokens',
                tokens_per_month = 'tokens', usd_per_day = 'usd', usd_per_month = 'usd'}
local function fmt(x) return string.format('%.17g', x) end
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
-- The current day's and month's window (id, end in ms), worked out once per script.
local windows = {}
local function window(shape)
  local known = windows[shape]
  if not known then
    local day = math.floor(now / DAY)
    local y, m, d = civil(day)
    if shape == 'd' then
      known = {string.format('%04d-%02d-%02d', y, m, d), (day + 1) * DAY}
    else
      local ny, nm = y, m + 1
      if nm > 12 then ny, nm = y + 1, 1 end
      known = {string.format('%04d-%02d', y, m), daysFromCivil(ny, nm, 1) * DAY}
    end
    windows[shape] = known
  end
  return known[1], known[2]
end
-- A bucket keeps what was taken from it (not its level), so a changed limit
-- keeps what was counted and only changes the capacity and the refill rate.
local function bucketLevel(taken, stamp, limit)
  if not taken then return limit end
  local elapsed = math.max(0, now - tonumber(stamp))
  return limit - math.max(0, tonumber(taken) - elapsed * limit / 60000)
end
local function keepLonger(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
-- A figure's state {used, reserved, remaining, reset seconds, fill} from its
-- fields (fill: bucket level, lease count, window used + reserved).
local function bucketState(level, limit)
  local used = math.max(0, math.ceil(limit - level - 1e-9))
  return {used, 0, math.max(0, math.floor(level + 1e-9)), (limit - level) * 60 / limit, level}
end
local function windowState(shape, id, used, reserved, limit)
  local current, ends = window(shape)
  if id ~= current then used, reserved = 0, 0 end
  used, reserved = tonumber(used or '0'), tonumber(reserved or '0')
  return {used, reserved, math.max(0, limit - used - reserved), (ends - now) / 1000, used + reserved}
end
local function leaseState(key, count, limit)
  local reset = 0
  if count >= limit and count > 0 then
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    reset = math.max(0, (tonumber(last[2]) - now) / 1000)
  end
  return {count, 0, math.max(0, limit - count), reset, count}
end
local function pushState(out, st)
  table.insert(out, string.format('%d', st[1]))
  table.insert(out, string.format('%d', st[2]))
  table.insert(out, string.format('%d', st[3]))
  table.insert(out, string.format('%d', math.ceil(st[4] * 1000)))
end
"""

#: ARGV: prefix, offset, request id, tokens, nano-dollars, lease ms, the number
#: of counters, then for each counter: its name, its rule, its number of figures
#: n, then n × (kind, limit); plain arguments, so that neither side encodes or
#: decodes JSON. Answers C{1} when admitted (the states after an admission are
#: read by no one: computing and sending them cost more than the rest of the
#: reply); when refused, integers joined by commas: 0, the refusing figure's
#: index (1-based, over all counters), retry after ms (-1 if unknown), then for
#: each figure: used, reserved, remaining, reset ms.
ADMIT = COMMON + r"""
local rid, tokensText, nanoText, lease = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local tokens, nano = tonumber(tokensText), tonumber(nanoText)
local groups, states, refused = {}, {}, nil
local a = 8
for g = 1, tonumber(ARGV[7]) do
  local counter, rule, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  local state, leases = P .. 's:' .. counter, nil
  local figures, fields = {}, {}
  for i = 1, n do
    local kind, limitText = ARGV[a], ARGV[a + 1]
    a = a + 2
    local shape = SHAPE[kind]
    local amount, amountText = tokens, tokensText
    local counts = COUNTS[kind]
    if counts == 'calls' then
      amount, amountText = 1, '1'
    elseif counts == 'usd' then
      amount, amountText = nano, nanoText
    end
    local names = FIELDS[kind]
    figures[i] = {kind, shape, tonumber(limitText), limitText, amount, amountText, #fields + 1, nil, nil, names}
    for k = 1, #names do fields[#fields + 1] = names[k] end
  end
  fields[#fields + 1] = 'x'
  local h = redis.call('HMGET', state, unpack(fields))
  local expires = tonumber(h[#fields])
  for i = 1, n do
    local f = figures[i]
    local kind, shape, limit, at = f[1], f[2], f[3], f[7]
    local st
    if shape == 'b' then
      st = bucketState(bucketLevel(h[at + 1], h[at + 2], limit), limit)
    elseif shape == 'l' then
      -- the lease set's size as last counted: never less than its live
      -- leases; when this call would not fit, the lapsed leases (of an
      -- instance that died) are removed and the rest counted
      leases = P .. 'c:' .. counter
      local count = tonumber(h[at + 1] or '0')
      f[12] = tonumber(h[at + 2])  -- the lease set's expiry, as last set
      if count + f[5] > limit then
        redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
        count = redis.call('ZCARD', leases)
        f[11] = true
      end
      st = leaseState(leases, count, limit)
    else
      st = windowState(shape, h[at + 1], h[at + 2], h[at + 3], limit)
    end
    f[8] = st
    f[9] = h[at]
    states[#states + 1] = st
    local fits
    if shape == 'b' then fits = st[5] + 1e-9 >= f[5] else fits = st[5] + f[5] <= limit end
    if not fits and not refused then
      -- the first refusing figure: its index over every counter; every
      -- figure's state is still read (the refusal's headers show them)
      local retry = -1
      if shape == 'b' then retry = math.ceil((f[5] - st[5]) * 60000 / limit)
      elseif shape ~= 'l' then retry = math.ceil(st[4] * 1000) end
      refused = {#states, retry}
    end
  end
  table.insert(groups, {counter, rule, state, leases, figures, expires})
end
if refused then
  local out = {'0', tostring(refused[1]), string.format('%d', refused[2])}
  for _, st in ipairs(states) do pushState(out, st) end
  return table.concat(out, ',')
end
local reservation, reservationTtl = {}, 0
for _, group in ipairs(groups) do
  local counter, rule, state, leases, figures, expires = group[1], group[2], group[3], group[4], group[5], group[6]
  local writes, entries, ttl = {}, {}, 1000
  for _, f in ipairs(figures) do
    local kind, shape, limit, limitText, amount, amountText, st, names = f[1], f[2], f[3], f[4], f[5], f[6], f[8], f[10]
    local figure = limitText .. '|' .. rule
    if f[9] ~= figure then
      writes[#writes + 1] = names[1]
      writes[#writes + 1] = figure
    end
    if shape == 'b' then
      local taken = limit - (st[5] - amount)
      writes[#writes + 1] = names[2]
      writes[#writes + 1] = taken  -- Redis writes a number so that it reads back the same
      writes[#writes + 1] = names[3]
      writes[#writes + 1] = now
      ttl = math.max(ttl, math.ceil(taken * 60000 / limit) + 1000)
      if kind ~= 'requests_per_minute' then
        table.insert(entries, kind .. '|' .. amountText .. '|' .. limitText)
        reservationTtl = math.max(reservationTtl, RESERVATION_MARGIN)
      end
    elseif shape == 'l' then
      redis.call('ZADD', leases, now + lease, rid)
      writes[#writes + 1] = names[2]
      writes[#writes + 1] = st[1] + 1
      -- made to last two leases: extended about once a lease, not on every
      -- admission; at once when it may not have existed (emptied, or counted)
      local known = f[12]
      if f[11] or not known or known < now + lease + 1000 then
        local keep = 2 * math.ceil(lease) + 1000
        redis.call('PEXPIRE', leases, keep)
        writes[#writes + 1] = names[3]
        writes[#writes + 1] = now + keep
      end
      ttl = math.max(ttl, math.ceil(lease) + 1000)
      table.insert(entries, kind .. '|1|' .. limitText)
      reservationTtl = math.max(reservationTtl, math.ceil(lease) + RESERVATION_MARGIN)
    else
      local id, ends = window(shape)
      writes[#writes + 1] = names[2]
      writes[#writes + 1] = id
      writes[#writes + 1] = names[3]
      writes[#writes + 1] = st[1]
      writes[#writes + 1] = names[4]
      writes[#writes + 1] = st[2] + amount
      ttl = math.max(ttl, ends - now + WINDOW_MARGIN)
      table.insert(entries, kind .. '|' .. amountText .. '|' .. limitText .. '|' .. id)
      reservationTtl = math.max(reservationTtl, ends - now + RESERVATION_MARGIN)
    end
  end
  -- the state's own expiry, kept in it (x): extended only when it would come
  -- too soon, then with a minute to spare (no PTTL on every admission)
  local extend = not expires or expires < now + ttl
  if extend then
    writes[#writes + 1] = 'x'
    writes[#writes + 1] = now + ttl + 60000
  end
  if #writes > 0 then redis.call('HSET', state, unpack(writes)) end
  if extend then redis.call('PEXPIRE', state, ttl + 60000) end
  if #entries > 0 then
    table.insert(reservation, counter)
    table.insert(reservation, table.concat(entries, ';'))
  end
end
if #reservation > 0 then
  redis.call('SET', P .. 'r:' .. rid, cmsgpack.pack(reservation), 'PX', reservationTtl)
end
return '1'
"""

#: ARGV: prefix, offset, n, then n × (request id, tokens or '', nano-dollars
#: or '', '1' if the upstream answered else '0'). Answers how many were
#: applied (the others were settled before, or never admitted here). Applied
#: in order, as one by one would, but each counter is read and written once.
SETTLE = COMMON + r"""
local count = tonumber(ARGV[3])
local keys = {}
for i = 1, count do keys[i] = P .. 'r:' .. ARGV[i * 4] end
local values = redis.call('MGET', unpack(keys))
local applied, gone, seen = 0, {}, {}
-- what each counter is owed, counters in the order first met
local order, owed = {}, {}
for i = 1, count do
  local b = 3 + (i - 1) * 4
  local rid, tokens, nano, reached = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), ARGV[b + 4] == '1'
  local v = values[i]
  if v and not seen[rid] then  -- false: settled before, never admitted, or not this layout's
    seen[rid] = true
    applied = applied + 1
    gone[#gone + 1] = keys[i]
    local e = cmsgpack.unpack(v)
    for j = 1, #e, 2 do
      local counter = e[j]
      local w = owed[counter]
      if not w then
        w = {rids = {}, ops = {}}
        owed[counter] = w
        order[#order + 1] = counter
      end
      for entry in string.gmatch(e[j + 1], '[^;]+') do
        local kind, amountText, limitText, id = string.match(entry, '^([^|]*)|([^|]*)|([^|]*)|?(.*)$')
        local shape = SHAPE[kind]
        local amount = tonumber(amountText)
        local real, counts = tokens, COUNTS[kind]
        if counts == 'calls' then real = 1 elseif counts == 'usd' then real = nano end
        if real == nil then
          if reached then real = amount else real = 0 end
        end
        if shape == 'l' then
          w.rids[#w.rids + 1] = rid
        elseif shape ~= 'b' or real ~= amount then
          w.ops[#w.ops + 1] = {kind, shape, amount, tonumber(limitText), id, real}
        end
      end
    end
  end
end
if #gone > 0 then redis.call('DEL', unpack(gone)) end
-- Give a counter back what its settlements owe it: leases, then each kind's state,
-- read and written once.
local function settleCounter(counter, w)
  local state = P .. 's:' .. counter
  local size
  if #w.rids > 0 then
    -- the leases given back, and those of instances that died
    local leases = P .. 'c:' .. counter
    redis.call('ZREM', leases, unpack(w.rids))
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
    size = redis.call('ZCARD', leases)
  end
  -- each kind's state fields once, after the state's expiry (x)
  local fields, at = {'x'}, {}
  for _, op in ipairs(w.ops) do
    local kind = op[1]
    if not at[kind] then
      at[kind] = #fields + 1
      local names = FIELDS[kind]
      for n = 2, #names do fields[#fields + 1] = names[n] end
    end
  end
  local h = redis.call('HMGET', state, unpack(fields))
  local expires = tonumber(h[1])
  -- each kind's state as the settlements before left it
  local cur, changed, writes, ttl = {}, {}, {}, 0
  for _, op in ipairs(w.ops) do
    local kind, shape, amount, limit, id, real = op[1], op[2], op[3], op[4], op[5], op[6]
    local k = at[kind]
    local c = cur[kind]
    if not c then
      c = {h[k], h[k + 1], h[k + 2]}
      cur[kind] = c
    end
    if shape == 'b' then
      local level = math.min(limit, bucketLevel(c[1], c[2], limit) + amount - real)
      if c[1] or level < limit then  -- absent and still full: nothing to write
        c[1], c[2] = limit - level, now
        changed[kind] = limit
      end
    elseif c[1] == id then  -- the window it reserved in (else it has turned, or was reset)
      c[2] = tonumber(c[2] or '0') + real
      c[3] = math.max(0, tonumber(c[3] or '0') - amount)
      changed[kind] = limit
    end
  end
  for kind, limit in pairs(changed) do
    local c, names = cur[kind], FIELDS[kind]
    if SHAPE[kind] == 'b' then
      local taken = tonumber(c[1])
      writes[#writes + 1] = names[2]
      writes[#writes + 1] = fmt(taken)
      writes[#writes + 1] = names[3]
      writes[#writes + 1] = c[2]
      ttl = math.max(ttl, math.ceil(taken * 60000 / limit) + 1000)
    else
      writes[#writes + 1] = names[3]
      writes[#writes + 1] = string.format('%d', c[2])
      writes[#writes + 1] = names[4]
      writes[#writes + 1] = string.format('%d', c[3])
    end
  end
  if size and expires then  -- the lease set's size (a state gone with its leases lapsed is not made again)
    writes[#writes + 1] = 'concurrent.n'
    writes[#writes + 1] = size
    if size == 0 then  -- the set is gone: the next admission sets its expiry
      writes[#writes + 1] = 'concurrent.x'
      writes[#writes + 1] = 0
    end
  end
  if #writes > 0 then
    -- a bucket may now need the state to last longer than x says; x extended as admissions do
    local extend = ttl > 0 and (not expires or expires < now + ttl)
    if extend then
      writes[#writes + 1] = 'x'
      writes[#writes + 1] = now + ttl + 60000
    end
    redis.call('HSET', state, unpack(writes))
    if extend then redis.call('PEXPIRE', state, ttl + 60000) end
  end
end
for _, counter in ipairs(order) do
  local w = owed[counter]
  -- nothing owed (a bucket that used what it reserved): not even read
  if #w.rids > 0 or #w.ops > 0 then settleCounter(counter, w) end
end
return applied
"""

#: ARGV: prefix, offset, lease ms, then request ids. Answers how many leases were extended.
RENEW = COMMON + r"""
local lease = tonumber(ARGV[3])
local renewed = 0
if #ARGV < 4 then return 0 end
local keys = {}
for i = 4, #ARGV do keys[#keys + 1] = P .. 'r:' .. ARGV[i] end
local values = redis.call('MGET', unpack(keys))
for i = 4, #ARGV do
  local rid, v = ARGV[i], values[i - 3]
  local e = v and cmsgpack.unpack(v) or {}
  for j = 1, #e, 2 do
    if string.find(';' .. e[j + 1], ';concurrent|', 1, true) then
      local leases, state = P .. 'c:' .. e[j], P .. 's:' .. e[j]
      redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
      if redis.call('ZSCORE', leases, rid) then
        redis.call('ZADD', leases, 'XX', now + lease, rid)
        keepLonger(leases, math.ceil(lease) + 1000)
        keepLonger(state, math.ceil(lease) + 1000)
        renewed = renewed + 1
      else
        -- its lease lapsed (and the set may be gone with it): the next
        -- admission sets the set's expiry (HDEL makes no state)
        redis.call('HDEL', state, 'concurrent.x')
      end
    end
  end
end
return renewed
"""

#: ARGV: prefix, offset, then counters. Answers 8 fields per figure: counter,
#: rule, kind, limit, used, reserved, remaining, reset ms.
SHOW = COMMON + r"""
local out = {}
for i = 3, #ARGV do
  local counter = ARGV[i]
  local h = redis.call('HGETALL', P .. 's:' .. counter)
  local fields = {}
  for j = 1, #h, 2 do fields[h[j]] = h[j + 1] end
  for j = 1, #h, 2 do
    local name = h[j]
    if string.sub(name, -2) == '.f' then
      local kind = string.sub(name, 1, -3)
      local shape = SHAPE[kind]
      local v = h[j + 1]
      local bar = string.find(v, '|', 1, true)
      local limit, rule = tonumber(string.sub(v, 1, bar - 1)), string.sub(v, bar + 1)
      local st
      if shape == 'b' then
        st = bucketState(bucketLevel(fields[kind .. '.t'], fields[kind .. '.s'], limit), limit)
      elseif shape == 'l' then
        local leases = P .. 'c:' .. counter
        st = leaseState(leases, redis.call('ZCOUNT', leases, '(' .. now, '+inf'), limit)
      else
        st = windowState(shape, fields[kind .. '.w'], fields[kind .. '.u'], fields[kind .. '.r'], limit)
      end
      table.insert(out, counter)
      table.insert(out, rule)
      table.insert(out, kind)
      table.insert(out, limit)
      pushState(out, st)
    end
  end
end
return out
"""

#: ARGV: prefix, offset, then counters. Deletes each counter's state and leases;
#: answers how many figures were removed.
RESET = COMMON + r"""
local removed = 0
for i = 3, #ARGV do
  local counter = ARGV[i]
  for _, name in ipairs(redis.call('HKEYS', P .. 's:' .. counter)) do
    if string.sub(name, -2) == '.f' then removed = removed + 1 end
  end
  redis.call('DEL', P .. 's:' .. counter, P .. 'c:' .. counter)
end
return removed
"""
