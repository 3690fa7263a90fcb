//! The usage query: request parameters to one SQL statement over the rollups, and rows
//! back to windows. Pure: the HTTP edge runs the statement.
//!
//! Days and months are summed from hours at query time, shifted by the requested offset,
//! so any whole-hour time zone gets its own day and month boundaries. A named zone
//! (`tz=Europe/Berlin`) gets its own offsets, daylight saving included: ClickHouse computes
//! each window's local start and end (a day across a clock change is 23 or 25 hours) and
//! their offsets, and a zone whose window bounds are not whole UTC hours there (such as
//! `Asia/Kolkata` for days) is refused, since usage is kept per UTC hour. A query that needs
//! no hour and no dimension (days, months or one total in UTC, bounds on UTC midnights, no
//! dimension grouped or filtered) reads `usage_daily` instead, the same states per UTC day
//! (schema V11): a month is 30 rows per customer there, against up to 720 per dimension
//! value in `rollups_hourly`. A UNIQUE_COUNT meter reads the same way from the tables that
//! hold its states apart (schema V13): `rollups_unique_hourly` and `usage_unique_daily`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};
use tally_core::{Aggregation, Catalog, Meter, Quantity};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// A parameter the API refuses, named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadParam {
    pub param: String,
    pub reason: String,
}

impl std::fmt::Display for BadParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.param, self.reason)
    }
}

fn bad(param: &str, reason: impl Into<String>) -> BadParam {
    BadParam {
        param: param.to_owned(),
        reason: reason.into(),
    }
}

/// The time zone of windows and of the bounds shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tz {
    /// A fixed whole-hour offset: `UTC`, `+02:00`.
    Offset(UtcOffset),
    /// A zone of the system's time zone database, by its IANA name: `Europe/Berlin`.
    Zone(String),
}

impl Tz {
    fn is_utc(&self) -> bool {
        matches!(self, Tz::Offset(o) if o.is_utc())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Hour,
    Day,
    Month,
}

/// A validated usage query.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageQuery {
    pub meter: Meter,
    pub customer: Option<String>,
    pub from: Option<OffsetDateTime>,
    pub to: Option<OffsetDateTime>,
    pub window: Option<Window>,
    pub tz: Tz,
    pub group_by_customer: bool,
    /// Dimension names to group by, with their 1-based position in `dim_values`.
    pub group_by: Vec<(String, usize)>,
    /// Dimension filters: position and accepted values.
    pub filters: Vec<(usize, Vec<String>)>,
}

/// Parses the query string (`meter`, `customer`, `from`, `to`, `window`, `group_by`,
/// `filter[<dimension>]` or `filter=<dimension>:<value>`, `tz`).
pub fn parse(pairs: &[(String, String)], catalog: &Catalog) -> Result<UsageQuery, BadParam> {
    let mut meter = None;
    let (mut customer, mut from, mut to, mut window) = (None, None, None, None);
    let mut tz = Tz::Offset(UtcOffset::UTC);
    let mut group_by: Vec<String> = Vec::new();
    let mut raw_filters: Vec<(String, String)> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "meter" => {
                meter = Some(
                    catalog
                        .meter(v)
                        .cloned()
                        .ok_or_else(|| bad("meter", format!("no meter {v:?}")))?,
                )
            }
            "customer" if v.is_empty() => return Err(bad("customer", "must not be empty")),
            "customer" => customer = Some(v.clone()),
            "from" => from = Some(instant("from", v)?),
            "to" => to = Some(instant("to", v)?),
            "window" => {
                window = match v.to_ascii_uppercase().as_str() {
                    "HOUR" => Some(Window::Hour),
                    "DAY" => Some(Window::Day),
                    "MONTH" => Some(Window::Month),
                    "" | "NONE" => None,
                    _ => return Err(bad("window", "must be HOUR, DAY, MONTH or absent")),
                }
            }
            "tz" => tz = time_zone(v)?,
            "group_by" => {
                group_by.extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_owned))
            }
            "filter" => {
                let (d, val) = v
                    .split_once(':')
                    .ok_or_else(|| bad("filter", "must be <dimension>:<value>"))?;
                raw_filters.push((d.to_owned(), val.to_owned()));
            }
            other => match other
                .strip_prefix("filter[")
                .and_then(|s| s.strip_suffix(']'))
            {
                Some(d) => raw_filters.push((d.to_owned(), v.clone())),
                None => return Err(bad(other, "unknown parameter")),
            },
        }
    }
    let meter = meter.ok_or_else(|| bad("meter", "required"))?;
    if let (Some(f), Some(t)) = (from, to) {
        if f >= t {
            return Err(bad("to", "must be after from"));
        }
    }
    let position = |param: &str, name: &str| {
        meter
            .group_by
            .iter()
            .position(|d| d == name)
            .map(|i| i + 1)
            .ok_or_else(|| {
                bad(
                    param,
                    format!("meter {} has no dimension {name:?}", meter.key),
                )
            })
    };
    let mut group_by_customer = false;
    let mut dims = Vec::new();
    for name in group_by {
        if name == "customer" {
            group_by_customer = true;
        } else if !dims.iter().any(|(n, _)| *n == name) {
            let i = position("group_by", &name)?;
            dims.push((name, i));
        }
    }
    let mut filters: HashMap<usize, Vec<String>> = HashMap::new();
    for (d, v) in raw_filters {
        filters.entry(position("filter", &d)?).or_default().push(v);
    }
    let mut filters: Vec<_> = filters.into_iter().collect();
    filters.sort();
    Ok(UsageQuery {
        meter,
        customer,
        from,
        to,
        window,
        tz,
        group_by_customer,
        group_by: dims,
        filters,
    })
}

fn instant(param: &str, v: &str) -> Result<OffsetDateTime, BadParam> {
    let t = OffsetDateTime::parse(v, &Rfc3339)
        .map_err(|_| bad(param, format!("{v:?} is not an RFC 3339 timestamp")))?;
    if t.unix_timestamp() % 3600 != 0 || t.nanosecond() != 0 {
        return Err(bad(
            param,
            "must fall on a whole hour (usage is kept per hour)",
        ));
    }
    if t.unix_timestamp() < 0 || t.unix_timestamp() > i64::from(u32::MAX) {
        return Err(bad(param, "out of range"));
    }
    Ok(t)
}

/// `UTC`, a whole-hour offset, or the IANA name of a zone in the system's time zone
/// database (`TZDIR`, else `/usr/share/zoneinfo`).
fn time_zone(v: &str) -> Result<Tz, BadParam> {
    if v.eq_ignore_ascii_case("utc") || v == "Z" || v.starts_with(['+', '-']) {
        return offset(v).map(Tz::Offset);
    }
    zone_name(v).map_err(|reason| bad("tz", reason))?;
    let dir = std::env::var_os("TZDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/share/zoneinfo".into());
    if !dir.is_dir() {
        return Err(bad(
            "tz",
            format!(
                "named time zones need the system time zone database ({} is missing); \
                 use an offset such as +02:00",
                dir.display()
            ),
        ));
    }
    if !dir.join(v).is_file() {
        return Err(bad("tz", format!("unknown time zone {v:?}")));
    }
    Ok(Tz::Zone(v.to_owned()))
}

/// The shape of an IANA zone name (`Area/Location`, `Etc/GMT+5`, `UTC`): it is written into
/// the statement as a literal, so only these characters pass.
fn zone_name(v: &str) -> Result<(), String> {
    let shape = "must be UTC, an offset such as +02:00, or a zone name such as Europe/Berlin";
    let parts_ok = v.split('/').all(|part| {
        part.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+'))
    });
    if v.is_empty() || v.len() > 64 || !parts_ok {
        return Err(shape.to_owned());
    }
    Ok(())
}

fn offset(v: &str) -> Result<UtcOffset, BadParam> {
    if v.eq_ignore_ascii_case("utc") || v == "Z" {
        return Ok(UtcOffset::UTC);
    }
    let (sign, rest) = match v.as_bytes().first() {
        Some(b'+') => (1, &v[1..]),
        Some(b'-') => (-1, &v[1..]),
        _ => return Err(bad("tz", "must be UTC or an offset such as +02:00")),
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "00"));
    let h: i8 = h
        .parse()
        .map_err(|_| bad("tz", "must be UTC or an offset such as +02:00"))?;
    if m != "00" {
        return Err(bad("tz", "only whole-hour offsets are supported"));
    }
    if !(0..=14).contains(&h) {
        return Err(bad("tz", "offset out of range"));
    }
    UtcOffset::from_hms(sign * h, 0, 0).map_err(|_| bad("tz", "offset out of range"))
}

/// SQL expression reading a meter's value from its rollup column (UNIQUE_COUNT's is in
/// `rollups_unique_hourly` and `usage_unique_daily`).
fn merge_expr(a: Aggregation) -> &'static str {
    match a {
        Aggregation::Count => "toDecimal128(sumMerge(events), 9)",
        Aggregation::Sum => "sumMerge(value_sum)",
        Aggregation::Min => "minMerge(value_min)",
        Aggregation::Max => "maxMerge(value_max)",
        Aggregation::Latest => "argMaxMerge(value_latest)",
        Aggregation::UniqueCount => "toDecimal128(uniqExactMerge(value_unique), 9)",
    }
}

/// One statement, its `?` parameters in order (all strings or integers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sql {
    pub text: String,
    pub binds: Vec<Bind>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    Str(String),
    Int(i64),
}

impl Sql {
    /// The statement with its parameters written in as literals (strings quoted and
    /// escaped), for a client without parameter binding.
    pub fn inlined(&self) -> String {
        let mut out = String::with_capacity(self.text.len() + 64);
        let mut binds = self.binds.iter();
        for c in self.text.chars() {
            if c != '?' {
                out.push(c);
                continue;
            }
            match binds.next() {
                Some(Bind::Str(s)) => {
                    out.push('\'');
                    out.push_str(&s.replace('\\', "\\\\").replace('\'', "\\'"));
                    out.push('\'');
                }
                Some(Bind::Int(i)) => out.push_str(&i.to_string()),
                None => out.push(c),
            }
        }
        out
    }
}

/// Builds the statement for `q` over `tenant`'s rollups. Columns: `window_start`
/// (Int64, unix seconds), `c` (customer or ''), `d` (Array(String) of grouped dimensions), `value`
/// (Decimal(38, 9)), then `window_end`, `start_offset` and `end_offset` (Int64; for a named
/// zone, see [`UsageRow`]; 0 for a fixed offset, whose bounds `answer` computes).
pub fn sql(q: &UsageQuery, tenant: &str) -> Sql {
    // UNIQUE_COUNT states are kept apart (schema V13), in tables keyed like the others.
    let unique = q.meter.aggregation == Aggregation::UniqueCount;
    let (table, time) = match (by_day(q), unique) {
        (true, false) => ("usage_daily", "day"),
        (true, true) => ("usage_unique_daily", "day"),
        (false, false) => ("rollups_hourly", "hour"),
        (false, true) => ("rollups_unique_hourly", "hour"),
    };
    let (window, bounds) = match &q.tz {
        Tz::Offset(o) => {
            let off = o.whole_seconds();
            let window = match q.window {
                Some(Window::Hour) => format!("toInt64({time})"),
                Some(Window::Day) => format!("toInt64(toStartOfDay({time} + ({off}))) - ({off})"),
                Some(Window::Month) => format!(
                    "toInt64(toDateTime(toStartOfMonth({time} + ({off})), 'UTC')) - ({off})"
                ),
                None => "toInt64(0)".to_owned(),
            };
            // A fixed offset's ends and offsets are computed by `answer`.
            let bounds = "toInt64(0) AS window_end, toInt64(0) AS start_offset, \
                          toInt64(0) AS end_offset"
                .to_owned();
            (window, bounds)
        }
        Tz::Zone(zone) => zone_sql(q, time, zone),
    };
    let customer = if q.group_by_customer {
        "customer"
    } else {
        "''"
    };
    let dims = if q.group_by.is_empty() {
        "emptyArrayString()".to_owned()
    } else {
        let items: Vec<String> = q
            .group_by
            .iter()
            .map(|(_, i)| format!("dim_values[{i}]"))
            .collect();
        format!("[{}]", items.join(", "))
    };
    let mut binds = vec![
        Bind::Str(tenant.to_owned()),
        Bind::Str(q.meter.storage_key()),
    ];
    let mut conditions = vec!["tenant = ?".to_owned(), "meter = ?".to_owned()];
    if let Some(c) = &q.customer {
        conditions.push("customer = ?".into());
        binds.push(Bind::Str(c.clone()));
    }
    if let Some(f) = q.from {
        conditions.push(format!("{time} >= toDateTime(?, 'UTC')"));
        binds.push(Bind::Int(f.unix_timestamp()));
    }
    if let Some(t) = q.to {
        conditions.push(format!("{time} < toDateTime(?, 'UTC')"));
        binds.push(Bind::Int(t.unix_timestamp()));
    }
    for (i, values) in &q.filters {
        let marks = vec!["?"; values.len()].join(", ");
        conditions.push(format!("dim_values[{i}] IN ({marks})"));
        binds.extend(values.iter().cloned().map(Bind::Str));
    }
    let text = format!(
        "SELECT {window} AS window_start, {customer} AS c, {dims} AS d, {value} AS value, \
         {bounds} FROM {table} WHERE {where_} GROUP BY window_start, c, d \
         ORDER BY window_start, c, d",
        value = merge_expr(q.meter.aggregation),
        where_ = conditions.join(" AND "),
    );
    Sql { text, binds }
}

/// A named zone's window start, then its end and both offsets (seconds east of UTC, as
/// the zone had them at those instants), all computed by ClickHouse from its own zone data.
/// A day's end is the start of the day 26 hours on, so 23- and 25-hour days end right.
fn zone_sql(q: &UsageQuery, time: &str, zone: &str) -> (String, String) {
    // Checked by `zone_name`: letters, digits, `_+-/` only, so safe as a literal.
    let z = format!("'{zone}'");
    let offset_at =
        |t: &str| format!("toInt64(toDateTime(toString(toDateTime({t}, {z})), 'UTC')) - ({t})");
    let window = match q.window {
        Some(Window::Hour) => format!("toInt64({time})"),
        Some(Window::Day) => format!("toInt64(toStartOfDay({time}, {z}))"),
        Some(Window::Month) => format!("toInt64(toDateTime(toStartOfMonth({time}, {z}), {z}))"),
        None => "toInt64(0)".to_owned(),
    };
    let end = match q.window {
        Some(Window::Hour) => "window_start + 3600".to_owned(),
        Some(Window::Day) => {
            format!("toInt64(toStartOfDay(toDateTime(window_start + 93600, {z})))")
        }
        Some(Window::Month) => format!(
            "toInt64(toDateTime(addMonths(toStartOfMonth(toDateTime(window_start, {z})), 1), {z}))"
        ),
        None => "toInt64(0)".to_owned(),
    };
    let (start_offset, end_offset) = match q.window {
        Some(_) => (offset_at("window_start"), offset_at("window_end")),
        // One total: the offsets at the requested bounds, if any.
        None => {
            let at = |t: Option<OffsetDateTime>| {
                t.map_or("toInt64(0)".to_owned(), |t| {
                    offset_at(&t.unix_timestamp().to_string())
                })
            };
            (at(q.from), at(q.to))
        }
    };
    (
        window,
        format!("{end} AS window_end, {start_offset} AS start_offset, {end_offset} AS end_offset"),
    )
}

/// Whether `q` can be answered from `usage_daily`: UTC days, months or one total, bounds
/// on UTC midnights, no dimension grouped or filtered (the daily rows have none).
fn by_day(q: &UsageQuery) -> bool {
    let midnight = |t: Option<OffsetDateTime>| {
        t.is_none_or(|t| t.unix_timestamp() % 86_400 == 0 && t.nanosecond() == 0)
    };
    q.window != Some(Window::Hour)
        && q.tz.is_utc()
        && q.group_by.is_empty()
        && q.filters.is_empty()
        && midnight(q.from)
        && midnight(q.to)
}

/// One result row as ClickHouse returns it.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub struct UsageRow {
    pub window_start: i64,
    pub c: String,
    pub d: Vec<String>,
    pub value: i128,
    /// For a named zone (0 otherwise): the window's end, and the zone's offset in seconds
    /// at its start and at its end (for a total: at `from` and at `to`).
    pub window_end: i64,
    pub start_offset: i64,
    pub end_offset: i64,
}

/// Refuses an answer whose day or month bounds in a named zone fall inside a UTC hour
/// (an offset such as +05:30): the hours they would split are kept whole.
pub fn check(q: &UsageQuery, rows: &[UsageRow]) -> Result<(), BadParam> {
    let (Tz::Zone(zone), Some(Window::Day | Window::Month)) = (&q.tz, q.window) else {
        return Ok(());
    };
    match rows
        .iter()
        .flat_map(|r| [r.start_offset, r.end_offset])
        .find(|o| o % 3600 != 0)
    {
        Some(o) => Err(bad(
            "tz",
            format!(
                "{zone} is {} from UTC in this range; days and months need whole-hour \
                 offsets, as usage is kept per UTC hour (HOUR windows work)",
                hm(o)
            ),
        )),
        None => Ok(()),
    }
}

/// `+05:30` for 19,800 seconds.
fn hm(seconds: i64) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let s = seconds.abs();
    format!("{sign}{:02}:{:02}", s / 3600, s % 3600 / 60)
}

/// The JSON answer: one entry per window (and group), values as exact decimal strings.
pub fn answer(q: &UsageQuery, rows: &[UsageRow]) -> Value {
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            let (start, end) = match &q.tz {
                Tz::Offset(o) => fixed_bounds(q, *o, r),
                Tz::Zone(_) => zone_bounds(q, r),
            };
            let value = Quantity::from_nanos(r.value)
                .unwrap_or_default()
                .to_string();
            let mut entry = json!({"start": start, "end": end, "value": value});
            if q.group_by_customer {
                entry["customer"] = json!(r.c);
            }
            if !q.group_by.is_empty() {
                let dims: Map<String, Value> = q
                    .group_by
                    .iter()
                    .zip(&r.d)
                    .map(|((name, _), v)| (name.clone(), json!(v)))
                    .collect();
                entry["dimensions"] = Value::Object(dims);
            }
            entry
        })
        .collect();
    let tz = match &q.tz {
        Tz::Offset(o) => hm(i64::from(o.whole_seconds())),
        Tz::Zone(z) => z.clone(),
    };
    json!({
        "meter": q.meter.key,
        "aggregation": q.meter.aggregation.name(),
        "window": q.window.map(|w| format!("{w:?}").to_uppercase()),
        "tz": tz,
        "data": data,
    })
}

fn rfc3339(t: OffsetDateTime, offset_seconds: i64) -> Option<String> {
    let offset = i32::try_from(offset_seconds)
        .ok()
        .and_then(|s| UtcOffset::from_whole_seconds(s).ok())
        .unwrap_or(UtcOffset::UTC);
    t.to_offset(offset).format(&Rfc3339).ok()
}

/// A named zone's window (or the requested bounds of a total), as ClickHouse computed them.
fn zone_bounds(q: &UsageQuery, r: &UsageRow) -> (Option<String>, Option<String>) {
    let at = |t: i64| OffsetDateTime::from_unix_timestamp(t).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    match q.window {
        None => (
            q.from.and_then(|t| rfc3339(t, r.start_offset)),
            q.to.and_then(|t| rfc3339(t, r.end_offset)),
        ),
        Some(_) => (
            rfc3339(at(r.window_start), r.start_offset),
            rfc3339(at(r.window_end), r.end_offset),
        ),
    }
}

/// A fixed offset's window: an hour, a day, or a month of that offset's calendar.
fn fixed_bounds(q: &UsageQuery, tz: UtcOffset, r: &UsageRow) -> (Option<String>, Option<String>) {
    let fmt = |t: OffsetDateTime| t.to_offset(tz).format(&Rfc3339).unwrap_or_default();
    let Some(w) = q.window else {
        return (q.from.map(fmt), q.to.map(fmt));
    };
    let start =
        OffsetDateTime::from_unix_timestamp(r.window_start).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let local = start.to_offset(tz);
    let end = match w {
        Window::Hour => start + time::Duration::HOUR,
        Window::Day => start + time::Duration::DAY,
        Window::Month => {
            let (y, m) = match local.month() {
                time::Month::December => (local.year() + 1, time::Month::January),
                m => (local.year(), m.next()),
            };
            local
                .replace_year(y)
                .and_then(|l| l.replace_month(m))
                .unwrap_or(local)
        }
    };
    (Some(fmt(start)), Some(fmt(end)))
}

#[cfg(test)]
mod tests;
