//! The Lua scripts that run inside Redis, one round trip each.
//!
//! Numbers cross into Lua as strings and are compared as doubles: every value stays below
//! 2^53 (units and microsecond timestamps), where doubles are exact. Values written back
//! are formatted with `%.0f`, because Redis would format a Lua number with 14 significant
//! digits and lose the low digits of a microsecond timestamp.

/// Check-and-consume over every window of one meter, all or nothing.
///
/// `KEYS`: one per window. `ARGV[1]`: amount (units); `ARGV[2]`: `1` to consume; then per
/// window four values: kind (`r` rate, `f` fixed), limit (units), GCRA interval (µs, rate) and
/// counter expiry (ms since the epoch, fixed).
///
/// Returns `{allowed, now_us, state_1, ..., state_n}`: the states as they were before the
/// request (TAT in µs for rate windows, units counted for fixed ones), so the caller can
/// derive used, remaining and reset time with the same rules ([`crate::algo`]). `now` is the
/// Redis server's clock, shared by every gateway process.
pub const CHECK: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local amount = tonumber(ARGV[1])
local consume = ARGV[2] == '1'
local n = #KEYS
local states = {}
local allowed = 1
for i = 1, n do
  local a = 2 + (i - 1) * 4
  local kind = ARGV[a + 1]
  local limit = tonumber(ARGV[a + 2])
  local state = tonumber(redis.call('GET', KEYS[i]) or '0')
  states[i] = state
  if kind == 'r' then
    local interval = tonumber(ARGV[a + 3])
    local backlog = math.max(state, now) - now
    if amount > limit or backlog + amount * interval > limit * interval then
      allowed = 0
    end
  elseif state + amount > limit then
    allowed = 0
  end
end
if allowed == 1 and consume and amount > 0 then
  for i = 1, n do
    local a = 2 + (i - 1) * 4
    if ARGV[a + 1] == 'r' then
      local interval = tonumber(ARGV[a + 3])
      local tat = math.max(states[i], now) + amount * interval
      local ttl = math.ceil((tat - now) / 1000) + 1000
      redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', string.format('%.0f', ttl))
    else
      redis.call('INCRBY', KEYS[i], ARGV[1])
      redis.call('PEXPIREAT', KEYS[i], ARGV[a + 4])
    end
  end
end
local out = {allowed, now}
for i = 1, n do
  out[i + 2] = states[i]
end
return out
"#;

/// Counts one ingested event into a customer's windows, once per event id.
///
/// `KEYS[1]`: the event's seen key; then one key per window. `ARGV[1]`: how long the seen key
/// lives (ms); then per window three values: kind (`r` rate, `f` fixed), units, and the GCRA
/// interval (µs, rate) or counter expiry (ms since the epoch, fixed).
///
/// Returns 1 when counted, 0 when the id was counted before. Rate windows take the event at
/// the Redis clock's now without a cap (usage already happened: it delays later grants);
/// quota windows add the units.
pub const FEED: &str = r#"
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 2, #KEYS do
  local a = 1 + (i - 2) * 3
  local units = tonumber(ARGV[a + 2])
  if ARGV[a + 1] == 'r' then
    local interval = tonumber(ARGV[a + 3])
    local state = tonumber(redis.call('GET', KEYS[i]) or '0')
    local tat = math.max(state, now) + units * interval
    local ttl = math.ceil((tat - now) / 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', string.format('%.0f', ttl))
  else
    redis.call('INCRBY', KEYS[i], ARGV[a + 2])
    redis.call('PEXPIREAT', KEYS[i], ARGV[a + 3])
  end
end
return 1
"#;
