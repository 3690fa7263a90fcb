//! The usage query: request parameters to one SQL statement over the rollups, and rows
//! back to windows. Pure: the HTTP edge runs the statement.
//!
//! Days and months are summed from hours at query time, shifted by the requested offset,
//! so any whole-hour time zone gets its own day and month boundaries. A query that needs
//! no hour and no dimension (days, months or one total in UTC, bounds on UTC midnights, no
//! dimension grouped or filtered) reads `usage_daily` instead, the same states per UTC day
//! (schema V11): a month is 30 rows per customer there, against up to 720 per dimension
//! value in `rollups_hourly`.

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
    pub tz: UtcOffset,
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
    let mut tz = UtcOffset::UTC;
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
            "tz" => tz = offset(v)?,
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

/// SQL expression reading a meter's value from its rollup column.
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

/// Builds the statement for `q` over `tenant`'s rollups. Columns: `window_start`
/// (Int64, unix seconds), `c` (customer or ''), `d` (Array(String) of grouped dimensions), `value`
/// (Decimal(38, 9)).
pub fn sql(q: &UsageQuery, tenant: &str) -> Sql {
    let off = q.tz.whole_seconds();
    let (table, time) = if by_day(q) {
        ("usage_daily", "day")
    } else {
        ("rollups_hourly", "hour")
    };
    let window = match q.window {
        Some(Window::Hour) => format!("toInt64({time})"),
        Some(Window::Day) => format!("toInt64(toStartOfDay({time} + ({off}))) - ({off})"),
        Some(Window::Month) => {
            format!("toInt64(toDateTime(toStartOfMonth({time} + ({off})), 'UTC')) - ({off})")
        }
        None => "toInt64(0)".to_owned(),
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
        "SELECT {window} AS window_start, {customer} AS c, {dims} AS d, {value} AS value \
         FROM {table} WHERE {where_} GROUP BY window_start, c, d ORDER BY window_start, c, d",
        value = merge_expr(q.meter.aggregation),
        where_ = conditions.join(" AND "),
    );
    Sql { text, binds }
}

/// Whether `q` can be answered from `usage_daily`: UTC days, months or one total, bounds
/// on UTC midnights, no dimension grouped or filtered (the daily rows have none).
fn by_day(q: &UsageQuery) -> bool {
    let midnight = |t: Option<OffsetDateTime>| {
        t.is_none_or(|t| t.unix_timestamp() % 86_400 == 0 && t.nanosecond() == 0)
    };
    q.window != Some(Window::Hour)
        && q.tz.whole_seconds() == 0
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
}

/// The JSON answer: one entry per window (and group), values as exact decimal strings.
pub fn answer(q: &UsageQuery, rows: &[UsageRow]) -> Value {
    let fmt = |t: OffsetDateTime| t.to_offset(q.tz).format(&Rfc3339).unwrap_or_default();
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            let (start, end) = match q.window {
                None => (q.from.map(fmt), q.to.map(fmt)),
                Some(w) => {
                    let start = OffsetDateTime::from_unix_timestamp(r.window_start)
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                    let local = start.to_offset(q.tz);
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
    json!({
        "meter": q.meter.key,
        "aggregation": q.meter.aggregation.name(),
        "window": q.window.map(|w| format!("{w:?}").to_uppercase()),
        "tz": format!("{}{:02}:00", if q.tz.is_negative() { '-' } else { '+' }, q.tz.whole_hours().abs()),
        "data": data,
    })
}

#[cfg(test)]
mod tests;
