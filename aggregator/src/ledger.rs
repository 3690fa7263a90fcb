//! Rows of `ingest_ledger` in ClickHouse's Native format, written by hand.
//!
//! A flush is one INSERT of every row it carries (see `V2__rollups.sql`), sent as a single
//! Native block: column after column, each column's values back to back. ClickHouse reads
//! such a block with one bulk copy per column instead of decoding every row field by field,
//! which cost the server 5–14 % less CPU than RowBinary of the same rows in replays of
//! captured flushes (the inserts' own user time about a quarter less;
//! `scripts/ledger_replay.py`, BENCHMARKS.md); and one block sent is one block inserted,
//! whatever its size, so a flush stays one atomic write through the ledger's views.
//!
//! Event rows are the bulk of a flush, one per record, so they are encoded as each record
//! is counted, straight from the fields borrowed from the Kafka payload into the
//! partition's own [`Columns`]: no owned row, no per-field allocation, and at flush time
//! the partition's column buffers are handed to the insert as they are. Rollup, coverage
//! and checkpoint rows, a few per flush, go through [`LedgerRow`]. Both paths share
//! [`RowRef::encode`], so the layout is written down once, in [`COLUMNS`]' order.

use hashbrown::HashMap;

/// The columns of the insert, in the order of [`COLUMN_TYPES`].
pub const COLUMNS: &str = "kind, tenant, customer, id, type, time, time_nanos, received_at, \
     source, data, topic, kafka_partition, kafka_offset, meter, hour, dim_values, d_count, \
     d_sum, d_min, d_max, d_latest, d_latest_at, d_unique";

/// Each column's name and type as the Native block declares them (`ingest_ledger`'s own).
pub const COLUMN_TYPES: [(&str, &str); NCOLS] = [
    ("kind", "UInt8"),
    ("tenant", "String"),
    ("customer", "String"),
    ("id", "String"),
    ("type", "String"),
    ("time", "DateTime('UTC')"),
    ("time_nanos", "UInt32"),
    ("received_at", "DateTime('UTC')"),
    ("source", "String"),
    ("data", "String"),
    ("topic", "String"),
    ("kafka_partition", "UInt32"),
    ("kafka_offset", "UInt64"),
    ("meter", "String"),
    ("hour", "DateTime('UTC')"),
    ("dim_values", "Array(String)"),
    ("d_count", "UInt64"),
    ("d_sum", "Decimal(38, 9)"),
    ("d_min", "Decimal(38, 9)"),
    ("d_max", "Decimal(38, 9)"),
    ("d_latest", "Decimal(38, 9)"),
    ("d_latest_at", "UInt64"),
    ("d_unique", "String"),
];

const NCOLS: usize = 23;
/// The position of `dim_values`, the one array column.
const DIM_VALUES: usize = 15;

/// Row kinds of `ingest_ledger` (see `schemas/clickhouse/V2__rollups.sql`).
pub const KIND_EVENT: u8 = 1;
pub const KIND_ROLLUP: u8 = 2;
pub const KIND_CHECKPOINT: u8 = 3;
pub const KIND_COVERAGE: u8 = 4;

/// One owned row of the ledger: what the rollups, coverage and checkpoints are built as,
/// and what tests inspect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerRow {
    pub kind: u8,
    pub tenant: String,
    pub customer: String,
    pub id: String,
    pub event_type: String,
    pub time: u32,
    pub time_nanos: u32,
    pub received_at: u32,
    pub source: String,
    pub data: String,
    pub topic: String,
    pub kafka_partition: u32,
    pub kafka_offset: u64,
    pub meter: String,
    pub hour: u32,
    pub dim_values: Vec<String>,
    pub d_count: u64,
    /// Decimal(38, 9) values as their nano-units.
    pub d_sum: i128,
    pub d_min: i128,
    pub d_max: i128,
    pub d_latest: i128,
    pub d_latest_at: u64,
    pub d_unique: String,
}

impl LedgerRow {
    pub fn as_ref(&self) -> RowRef<'_> {
        RowRef {
            kind: self.kind,
            tenant: &self.tenant,
            customer: &self.customer,
            id: &self.id,
            event_type: &self.event_type,
            time: self.time,
            time_nanos: self.time_nanos,
            received_at: self.received_at,
            source: &self.source,
            data: &self.data,
            topic: &self.topic,
            kafka_partition: self.kafka_partition,
            kafka_offset: self.kafka_offset,
            meter: &self.meter,
            hour: self.hour,
            dim_values: &self.dim_values,
            d_count: self.d_count,
            d_sum: self.d_sum,
            d_min: self.d_min,
            d_max: self.d_max,
            d_latest: self.d_latest,
            d_latest_at: self.d_latest_at,
            d_unique: &self.d_unique,
        }
    }

    /// Appends this row to `out`.
    pub fn encode(&self, out: &mut Columns) {
        self.as_ref().encode(out);
    }
}

/// A ledger row over borrowed fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowRef<'a> {
    pub kind: u8,
    pub tenant: &'a str,
    pub customer: &'a str,
    pub id: &'a str,
    pub event_type: &'a str,
    pub time: u32,
    pub time_nanos: u32,
    pub received_at: u32,
    pub source: &'a str,
    pub data: &'a str,
    pub topic: &'a str,
    pub kafka_partition: u32,
    pub kafka_offset: u64,
    pub meter: &'a str,
    pub hour: u32,
    pub dim_values: &'a [String],
    pub d_count: u64,
    pub d_sum: i128,
    pub d_min: i128,
    pub d_max: i128,
    pub d_latest: i128,
    pub d_latest_at: u64,
    pub d_unique: &'a str,
}

impl RowRef<'_> {
    pub fn to_row(&self) -> LedgerRow {
        LedgerRow {
            kind: self.kind,
            tenant: self.tenant.to_owned(),
            customer: self.customer.to_owned(),
            id: self.id.to_owned(),
            event_type: self.event_type.to_owned(),
            time: self.time,
            time_nanos: self.time_nanos,
            received_at: self.received_at,
            source: self.source.to_owned(),
            data: self.data.to_owned(),
            topic: self.topic.to_owned(),
            kafka_partition: self.kafka_partition,
            kafka_offset: self.kafka_offset,
            meter: self.meter.to_owned(),
            hour: self.hour,
            dim_values: self.dim_values.to_vec(),
            d_count: self.d_count,
            d_sum: self.d_sum,
            d_min: self.d_min,
            d_max: self.d_max,
            d_latest: self.d_latest,
            d_latest_at: self.d_latest_at,
            d_unique: self.d_unique.to_owned(),
        }
    }

    /// Appends the row to `out`, one value per column in Native's encoding: integers
    /// little-endian at their width (`DateTime` as `UInt32`, `Decimal(38, 9)` as `Int128`),
    /// strings as a LEB128 length and their bytes. A column's default (zero, the empty
    /// string, the empty array) is not written here: [`Columns`] pads it in when the
    /// column's next value comes or the block is assembled, so an event row touches only
    /// the dozen columns it fills.
    pub fn encode(&self, out: &mut Columns) {
        let row = out.rows;
        out.fixed(0, row, self.kind);
        out.str(1, row, self.tenant);
        out.str(2, row, self.customer);
        out.str(3, row, self.id);
        out.str(4, row, self.event_type);
        out.fixed(5, row, self.time);
        out.fixed(6, row, self.time_nanos);
        out.fixed(7, row, self.received_at);
        out.str(8, row, self.source);
        out.str(9, row, self.data);
        out.str(10, row, self.topic);
        out.fixed(11, row, self.kafka_partition);
        out.fixed(12, row, self.kafka_offset);
        out.str(13, row, self.meter);
        out.fixed(14, row, self.hour);
        if !self.dim_values.is_empty() {
            out.dim_counts.resize(row, 0);
            out.dim_counts.push(self.dim_values.len() as u32);
            for d in self.dim_values {
                put_str(&mut out.cols[DIM_VALUES], d);
            }
        }
        out.fixed(16, row, self.d_count);
        out.fixed(17, row, self.d_sum);
        out.fixed(18, row, self.d_min);
        out.fixed(19, row, self.d_max);
        out.fixed(20, row, self.d_latest);
        out.fixed(21, row, self.d_latest_at);
        out.str(22, row, self.d_unique);
        out.rows += 1;
    }
}

/// Rows of the ledger, column by column: each column's values in Native encoding, except
/// `dim_values`, whose array lengths are kept apart (a Native block gives each array its
/// end offset in the whole block, known only when the block is assembled).
///
/// A column may hold fewer values than there are rows: the rows after its last value hold
/// its default, padded in by [`pad`](Self::pad) (every default is zero bytes: a zero, or
/// the zero length of an empty string).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    cols: [Vec<u8>; NCOLS],
    /// Values written to each column so far.
    filled: [usize; NCOLS],
    dim_counts: Vec<u32>,
    rows: usize,
}

/// A fixed-width column value: its little-endian bytes, and whether it is the default.
trait Fixed: Copy {
    fn is_zero(self) -> bool;
    fn put(self, out: &mut Vec<u8>);
}

macro_rules! fixed {
    ($($t:ty),*) => {$(
        impl Fixed for $t {
            fn is_zero(self) -> bool {
                self == 0
            }
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
fixed!(u8, u32, u64, i128);

impl Columns {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Empty columns with the room these ones take (taken columns count as empty).
    pub fn sized_like(&self) -> Columns {
        let mut next = Columns::default();
        for (col, used) in next.cols.iter_mut().zip(&self.cols) {
            col.reserve(used.capacity());
        }
        next.dim_counts.reserve(self.dim_counts.capacity());
        next
    }

    /// Bytes of one default value of column `c`.
    fn width(c: usize) -> usize {
        match COLUMN_TYPES[c].1 {
            "UInt8" | "String" => 1,
            "UInt32" | "DateTime('UTC')" => 4,
            "UInt64" => 8,
            "Decimal(38, 9)" => 16,
            // The array column's defaults live in `dim_counts`.
            _ => 0,
        }
    }

    /// Fills column `c` with defaults up to row `row` (exclusive).
    #[inline]
    fn pad(&mut self, c: usize, row: usize) {
        if self.filled[c] < row {
            self.pad_cold(c, row);
        }
    }

    #[cold]
    fn pad_cold(&mut self, c: usize, row: usize) {
        let missing = row - self.filled[c];
        let col = &mut self.cols[c];
        col.resize(col.len() + missing * Self::width(c), 0);
        self.filled[c] = row;
    }

    fn fixed(&mut self, c: usize, row: usize, v: impl Fixed) {
        if !v.is_zero() {
            self.pad(c, row);
            v.put(&mut self.cols[c]);
            self.filled[c] = row + 1;
        }
    }

    fn str(&mut self, c: usize, row: usize, v: &str) {
        if !v.is_empty() {
            self.pad(c, row);
            put_str(&mut self.cols[c], v);
            self.filled[c] = row + 1;
        }
    }

    /// Every column holding a value for every row.
    fn padded(mut self) -> Columns {
        for c in 0..NCOLS {
            if c != DIM_VALUES {
                self.pad(c, self.rows);
            }
        }
        self.dim_counts.resize(self.rows, 0);
        self
    }
}

/// The body of one flush's INSERT: the rows of each partition's [`Columns`] and the
/// flush's own rows, sent as one Native block without copying the columns into one buffer.
#[derive(Debug, Default)]
pub struct Body {
    parts: Vec<Columns>,
    unordered: Vec<Columns>,
    tail: Columns,
}

impl Body {
    pub fn push(&mut self, row: RowRef<'_>) {
        row.encode(&mut self.tail);
    }

    /// Adds rows encoded elsewhere (not copied).
    pub fn append(&mut self, columns: Columns) {
        if !columns.is_empty() {
            self.parts.push(columns);
        }
    }

    /// Adds rows encoded elsewhere, to be sent as they are, after the appended ones: how
    /// every flush sent its events before they were sorted (the baseline of
    /// `benches/flush.rs`).
    pub fn append_unordered(&mut self, columns: Columns) {
        if !columns.is_empty() {
            self.unordered.push(columns);
        }
    }

    pub fn rows(&self) -> usize {
        self.parts
            .iter()
            .chain(&self.unordered)
            .map(Columns::rows)
            .sum::<usize>()
            + self.tail.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows() == 0
    }

    /// The Native block, as chunks to send in order: the block header, then for each
    /// column its name, its type and every part's values. The appended rows come first, in
    /// `events_raw`'s sort order (see [`in_table_order`]), then the unordered ones, then the
    /// pushed rows as pushed.
    pub fn into_chunks(self) -> Vec<Vec<u8>> {
        let rows = self.rows();
        let mut parts = Vec::with_capacity(2 + self.unordered.len());
        if !self.parts.is_empty() {
            parts.push(in_table_order(self.parts));
        }
        parts.extend(self.unordered);
        if !self.tail.is_empty() {
            parts.push(self.tail);
        }
        let mut parts: Vec<Columns> = parts.into_iter().map(Columns::padded).collect();
        let mut chunks = Vec::with_capacity(1 + NCOLS * (1 + parts.len()));
        let mut head = Vec::new();
        put_len(&mut head, NCOLS);
        put_len(&mut head, rows);
        for (i, (name, kind)) in COLUMN_TYPES.iter().enumerate() {
            put_str(&mut head, name);
            put_str(&mut head, kind);
            if i == DIM_VALUES {
                // Array(String): every row's end offset (UInt64), then the strings.
                let mut end = 0u64;
                head.reserve(rows * 8);
                for part in &parts {
                    for &n in &part.dim_counts {
                        end += u64::from(n);
                        head.extend_from_slice(&end.to_le_bytes());
                    }
                }
            }
            chunks.push(std::mem::take(&mut head));
            for part in &mut parts {
                let col = std::mem::take(&mut part.cols[i]);
                if !col.is_empty() {
                    chunks.push(col);
                }
            }
        }
        chunks
    }
}

/// Columns of the sort key of `events_raw`: `ORDER BY (tenant, customer, type, time, id)`.
const TENANT: usize = 1;
const CUSTOMER: usize = 2;
const ID: usize = 3;
const TYPE: usize = 4;
const TIME: usize = 5;

/// The rows of `parts` as one set of columns, sorted by `events_raw`'s key: tenant,
/// customer, type, time, then id, strings compared byte by byte as ClickHouse compares them.
///
/// ClickHouse sorts every block it writes to a MergeTree by the table's key unless the block
/// already is in that order, which it checks in one pass. Event rows come from several
/// partitions' batches in arrival order; sorted here, the sort leaves the server. Replays of
/// flush-sized ledger inserts cost the server about a fifth less CPU sorted than unsorted
/// (BENCHMARKS.md). The other views see the same rows; row order means nothing to them.
///
/// The sort runs on ranks: each distinct (tenant, customer, type) gets its rank among the
/// distinct ones, so most comparisons are of one integer (rank and time), and ids are
/// compared only between rows equal in all the rest. Columns no row filled stay unfilled.
pub fn in_table_order(parts: Vec<Columns>) -> Columns {
    let rows: usize = parts.iter().map(Columns::rows).sum();
    let mut used = [false; NCOLS];
    for (c, used) in used.iter_mut().enumerate() {
        *used = parts.iter().any(|p| p.filled[c] > 0);
    }
    let dims_used = parts.iter().any(|p| p.dim_counts.iter().any(|&n| n > 0));
    let parts: Vec<Columns> = parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|mut p| {
            for (c, &u) in used.iter().enumerate() {
                if u {
                    p.pad(c, p.rows);
                }
            }
            p.dim_counts.resize(p.rows, 0);
            p
        })
        .collect();
    if rows <= 1 {
        return parts.into_iter().next().unwrap_or_default();
    }

    // Where each row's value starts in a string column of each part (a column no row
    // filled holds nothing: every value is the empty string).
    let bounds = |c: usize| -> Vec<Vec<usize>> {
        if !used[c] {
            return parts.iter().map(|p| vec![0; p.rows + 1]).collect();
        }
        parts
            .iter()
            .map(|p| string_bounds(&p.cols[c], p.rows))
            .collect()
    };
    let (tenants, customers, types, ids) =
        (bounds(TENANT), bounds(CUSTOMER), bounds(TYPE), bounds(ID));
    let text = |c: usize, b: &[Vec<usize>], p: usize, r: usize| -> &[u8] {
        string_at(&parts[p].cols[c], b[p][r], b[p][r + 1])
    };

    // Rank the distinct (tenant, customer, type) triples.
    let mut seen: HashMap<Triple<'_>, u32> = HashMap::new();
    let mut distinct: Vec<Triple<'_>> = Vec::new();
    let mut order: Vec<(u64, u32, u32)> = Vec::with_capacity(rows);
    for (p, part) in parts.iter().enumerate() {
        let times = &part.cols[TIME];
        for r in 0..part.rows {
            let triple = (
                text(TENANT, &tenants, p, r),
                text(CUSTOMER, &customers, p, r),
                text(TYPE, &types, p, r),
            );
            let next = distinct.len() as u32;
            let slot = *seen.entry(triple).or_insert_with(|| {
                distinct.push(triple);
                next
            });
            let time = if used[TIME] {
                u32::from_le_bytes(times[r * 4..r * 4 + 4].try_into().expect("4 bytes"))
            } else {
                0
            };
            order.push((
                (u64::from(slot) << 32) | u64::from(time),
                p as u32,
                r as u32,
            ));
        }
    }
    let mut by_triple: Vec<u32> = (0..distinct.len() as u32).collect();
    by_triple.sort_unstable_by(|&a, &b| distinct[a as usize].cmp(&distinct[b as usize]));
    let mut rank = vec![0u32; distinct.len()];
    for (position, &slot) in by_triple.iter().enumerate() {
        rank[slot as usize] = position as u32;
    }
    for entry in &mut order {
        let slot = (entry.0 >> 32) as usize;
        entry.0 = (u64::from(rank[slot]) << 32) | (entry.0 & 0xffff_ffff);
    }
    // By rank and time first (integers only), then each run of equal ones by id.
    order.sort_unstable_by_key(|e| e.0);
    let id = |e: &(u64, u32, u32)| text(ID, &ids, e.1 as usize, e.2 as usize);
    let mut from = 0;
    while from < order.len() {
        let key = order[from].0;
        let to = from + order[from..].iter().take_while(|e| e.0 == key).count();
        if to - from > 1 {
            order[from..to].sort_unstable_by(|a, b| id(a).cmp(id(b)));
        }
        from = to;
    }

    // Every used column rewritten in that order.
    let mut out = Columns {
        rows,
        ..Columns::default()
    };
    for c in 0..NCOLS {
        if c == DIM_VALUES || !used[c] {
            continue;
        }
        let total: usize = parts.iter().map(|p| p.cols[c].len()).sum();
        let mut col = Vec::with_capacity(total);
        let width = Columns::width(c);
        if matches!(c, TENANT | CUSTOMER | TYPE) {
            // One value per run of equal rank: written from the distinct triples, in
            // order, instead of gathered row by row from the parts.
            let mut run = u64::MAX;
            let mut encoded = Vec::new();
            for e in &order {
                let rank = e.0 >> 32;
                if rank != run {
                    run = rank;
                    let triple = distinct[by_triple[rank as usize] as usize];
                    let value = match c {
                        TENANT => triple.0,
                        CUSTOMER => triple.1,
                        _ => triple.2,
                    };
                    encoded.clear();
                    put_len(&mut encoded, value.len());
                    encoded.extend_from_slice(value);
                }
                col.extend_from_slice(&encoded);
            }
        } else if COLUMN_TYPES[c].1 == "String" {
            let owned;
            let b = match c {
                ID => &ids,
                _ => {
                    owned = bounds(c);
                    &owned
                }
            };
            for &(_, p, r) in &order {
                let (p, r) = (p as usize, r as usize);
                col.extend_from_slice(&parts[p].cols[c][b[p][r]..b[p][r + 1]]);
            }
        } else {
            let cols: Vec<&[u8]> = parts.iter().map(|p| p.cols[c].as_slice()).collect();
            match width {
                1 => gather::<1>(&cols, &order, &mut col),
                4 => gather::<4>(&cols, &order, &mut col),
                8 => gather::<8>(&cols, &order, &mut col),
                16 => gather::<16>(&cols, &order, &mut col),
                w => unreachable!("no column is {w} bytes wide"),
            }
        }
        out.cols[c] = col;
        out.filled[c] = rows;
    }
    if dims_used {
        // Each row's strings are the next `dim_counts[row]` strings of the column.
        let firsts: Vec<Vec<usize>> = parts
            .iter()
            .map(|p| {
                let mut first = Vec::with_capacity(p.rows + 1);
                let mut n = 0usize;
                first.push(0);
                for &count in &p.dim_counts {
                    n += count as usize;
                    first.push(n);
                }
                first
            })
            .collect();
        let strings: Vec<Vec<usize>> = parts
            .iter()
            .zip(&firsts)
            .map(|(p, f)| string_bounds(&p.cols[DIM_VALUES], f[p.rows]))
            .collect();
        for &(_, p, r) in &order {
            let (p, r) = (p as usize, r as usize);
            let (from, to) = (strings[p][firsts[p][r]], strings[p][firsts[p][r + 1]]);
            out.cols[DIM_VALUES].extend_from_slice(&parts[p].cols[DIM_VALUES][from..to]);
            out.dim_counts.push(parts[p].dim_counts[r]);
        }
    }
    out
}

/// Appends the `W`-byte values of `cols` (one column, per part) in `order`.
fn gather<const W: usize>(cols: &[&[u8]], order: &[(u64, u32, u32)], out: &mut Vec<u8>) {
    for &(_, p, r) in order {
        let at = r as usize * W;
        let v: [u8; W] = cols[p as usize][at..at + W]
            .try_into()
            .expect("a whole value");
        out.extend_from_slice(&v);
    }
}

/// A row's tenant, customer and event type.
type Triple<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// The boundaries of the first `n` LEB128-length-prefixed strings of `col`: string `i` is
/// `col[b[i]..b[i + 1]]`, its length included.
fn string_bounds(col: &[u8], n: usize) -> Vec<usize> {
    let mut bounds = Vec::with_capacity(n + 1);
    let mut at = 0;
    bounds.push(0);
    for _ in 0..n {
        let (len, width) = read_len(&col[at..]);
        at += width + len;
        bounds.push(at);
    }
    bounds
}

/// A string's bytes, without its length, from its encoded boundaries.
fn string_at(col: &[u8], from: usize, to: usize) -> &[u8] {
    if from == to {
        return &[];
    }
    let (_, width) = read_len(&col[from..to]);
    &col[from + width..to]
}

/// A LEB128 length and how many bytes it took.
fn read_len(b: &[u8]) -> (usize, usize) {
    let (mut v, mut shift, mut i) = (0usize, 0, 0);
    loop {
        let byte = b[i];
        i += 1;
        v |= usize::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return (v, i);
        }
        shift += 7;
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    let mut v = len as u64;
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_leb128() {
        for (len, bytes) in [
            (0usize, vec![0u8]),
            (1, vec![1]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (300, vec![0xac, 0x02]),
            (16_384, vec![0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_len(&mut out, len);
            assert_eq!(out, bytes, "length {len}");
        }
    }

    /// A column read back from a Native block: name, type and raw bytes.
    type Column = (String, String, Vec<u8>);

    /// Reads a Native block back: its column and row counts, and each column.
    fn columns_of(block: &[u8]) -> (usize, usize, Vec<Column>) {
        fn varint(b: &[u8], i: &mut usize) -> usize {
            let (mut v, mut shift) = (0usize, 0);
            loop {
                let byte = b[*i];
                *i += 1;
                v |= usize::from(byte & 0x7f) << shift;
                shift += 7;
                if byte < 0x80 {
                    return v;
                }
            }
        }
        fn string(b: &[u8], i: &mut usize) -> Vec<u8> {
            let n = varint(b, i);
            *i += n;
            b[*i - n..*i].to_vec()
        }
        let mut i = 0;
        let ncols = varint(block, &mut i);
        let rows = varint(block, &mut i);
        let mut out = Vec::new();
        for _ in 0..ncols {
            let name = String::from_utf8(string(block, &mut i)).expect("name");
            let kind = String::from_utf8(string(block, &mut i)).expect("type");
            let start = i;
            let fixed = |k: &str| match k {
                "UInt8" => Some(1),
                "UInt32" | "DateTime('UTC')" => Some(4),
                "UInt64" => Some(8),
                "Decimal(38, 9)" => Some(16),
                _ => None,
            };
            match (fixed(&kind), kind.as_str()) {
                (Some(w), _) => i += w * rows,
                (None, "String") => (0..rows).for_each(|_| drop(string(block, &mut i))),
                (None, "Array(String)") => {
                    let ends: Vec<u64> = (0..rows)
                        .map(|r| {
                            let at = i + r * 8;
                            u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"))
                        })
                        .collect();
                    i += rows * 8;
                    let strings = ends.last().copied().unwrap_or(0);
                    (0..strings).for_each(|_| drop(string(block, &mut i)));
                }
                (None, other) => panic!("unexpected type {other}"),
            }
            out.push((name, kind, block[start..i].to_vec()));
        }
        assert_eq!(i, block.len(), "nothing after the block");
        (ncols, rows, out)
    }

    #[test]
    fn a_body_is_one_native_block_of_its_rows_in_order() {
        let event = LedgerRow {
            kind: KIND_EVENT,
            tenant: "t".into(),
            customer: "cü".into(),
            id: "e1".into(),
            time: 7,
            data: "{}".into(),
            kafka_offset: 9,
            ..LedgerRow::default()
        };
        let rollup = LedgerRow {
            kind: KIND_ROLLUP,
            tenant: "t".into(),
            hour: 3600,
            dim_values: vec!["a".into(), String::new()],
            d_count: 2,
            d_sum: -1,
            ..LedgerRow::default()
        };
        let third = LedgerRow {
            kind: KIND_ROLLUP,
            dim_values: vec!["b".into()],
            ..LedgerRow::default()
        };
        // An event encoded in a partition's columns, then the flush's own rows.
        let mut part = Columns::default();
        event.encode(&mut part);
        let mut body = Body::default();
        body.append(part);
        body.append(Columns::default());
        body.push(rollup.as_ref());
        body.push(third.as_ref());
        assert_eq!(body.rows(), 3);
        let block: Vec<u8> = body.into_chunks().concat();
        let (ncols, rows, cols) = columns_of(&block);
        assert_eq!((ncols, rows), (23, 3));
        let names: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(names, COLUMNS.split(", ").collect::<Vec<_>>());
        let col = |name: &str| {
            cols.iter()
                .find(|c| c.0 == name)
                .map(|c| c.2.clone())
                .expect("column")
        };
        assert_eq!(col("kind"), [KIND_EVENT, KIND_ROLLUP, KIND_ROLLUP]);
        assert_eq!(col("customer"), [3, b'c', 0xc3, 0xbc, 0, 0]);
        assert_eq!(col("tenant"), [1, b't', 1, b't', 0]);
        let mut time = 7u32.to_le_bytes().to_vec();
        time.extend([0u8; 8]);
        assert_eq!(col("time"), time);
        let mut hour = 0u32.to_le_bytes().to_vec();
        hour.extend(3600u32.to_le_bytes());
        hour.extend([0u8; 4]);
        assert_eq!(col("hour"), hour);
        // Array(String): each row's end offset in the block, then the strings.
        let mut dims = Vec::new();
        for end in [0u64, 2, 3] {
            dims.extend(end.to_le_bytes());
        }
        dims.extend([1, b'a', 0, 1, b'b']);
        assert_eq!(col("dim_values"), dims);
        let mut sums = 0i128.to_le_bytes().to_vec();
        sums.extend((-1i128).to_le_bytes());
        sums.extend(0i128.to_le_bytes());
        assert_eq!(col("d_sum"), sums);
        let mut offsets = 9u64.to_le_bytes().to_vec();
        offsets.extend([0u8; 16]);
        assert_eq!(col("kafka_offset"), offsets);
    }

    /// Reads a Native block of the ledger's columns back into rows.
    fn rows_of(block: &[u8]) -> Vec<LedgerRow> {
        let (_, rows, cols) = columns_of(block);
        let mut out = vec![LedgerRow::default(); rows];
        for (name, kind, bytes) in cols {
            let mut at = 0;
            fn take<'b>(bytes: &'b [u8], at: &mut usize, n: usize) -> &'b [u8] {
                *at += n;
                &bytes[*at - n..*at]
            }
            let text = |b: &[u8]| String::from_utf8(b.to_vec()).expect("utf-8");
            if kind == "Array(String)" {
                let ends: Vec<usize> = (0..rows)
                    .map(|_| {
                        u64::from_le_bytes(take(&bytes, &mut at, 8).try_into().expect("8")) as usize
                    })
                    .collect();
                let mut strings = Vec::new();
                let rest = &bytes[rows * 8..];
                let mut i = 0;
                while i < rest.len() {
                    let (len, width) = read_len(&rest[i..]);
                    strings.push(text(&rest[i + width..i + width + len]));
                    i += width + len;
                }
                let mut from = 0;
                for (row, end) in out.iter_mut().zip(ends) {
                    row.dim_values = strings[from..end].to_vec();
                    from = end;
                }
                continue;
            }
            for row in out.iter_mut() {
                let fixed = |b: &[u8]| {
                    let mut v = [0u8; 16];
                    v[..b.len()].copy_from_slice(b);
                    i128::from_le_bytes(v)
                };
                match kind.as_str() {
                    "String" => {
                        let (len, width) = read_len(&bytes[at..]);
                        take(&bytes, &mut at, width);
                        let v = text(take(&bytes, &mut at, len));
                        match name.as_str() {
                            "tenant" => row.tenant = v,
                            "customer" => row.customer = v,
                            "id" => row.id = v,
                            "type" => row.event_type = v,
                            "source" => row.source = v,
                            "data" => row.data = v,
                            "topic" => row.topic = v,
                            "meter" => row.meter = v,
                            "d_unique" => row.d_unique = v,
                            other => panic!("unexpected column {other}"),
                        }
                    }
                    _ => {
                        let c = COLUMN_TYPES
                            .iter()
                            .position(|c| c.0 == name)
                            .expect("column");
                        let v = fixed(take(&bytes, &mut at, Columns::width(c)));
                        match name.as_str() {
                            "kind" => row.kind = v as u8,
                            "time" => row.time = v as u32,
                            "time_nanos" => row.time_nanos = v as u32,
                            "received_at" => row.received_at = v as u32,
                            "kafka_partition" => row.kafka_partition = v as u32,
                            "kafka_offset" => row.kafka_offset = v as u64,
                            "hour" => row.hour = v as u32,
                            "d_count" => row.d_count = v as u64,
                            "d_sum" => row.d_sum = v,
                            "d_min" => row.d_min = v,
                            "d_max" => row.d_max = v,
                            "d_latest" => row.d_latest = v,
                            "d_latest_at" => row.d_latest_at = v as u64,
                            other => panic!("unexpected column {other}"),
                        }
                    }
                }
            }
            assert_eq!(at, bytes.len(), "column {name} read whole");
        }
        out
    }

    fn table_key(r: &LedgerRow) -> (&str, &str, &str, u32, &str) {
        (&r.tenant, &r.customer, &r.event_type, r.time, &r.id)
    }

    #[test]
    fn appended_rows_are_sent_in_the_tables_order_and_pushed_rows_after_them() {
        let event = |tenant: &str, customer: &str, t: &str, time: u32, id: &str| LedgerRow {
            kind: KIND_EVENT,
            tenant: tenant.into(),
            customer: customer.into(),
            event_type: t.into(),
            time,
            id: id.into(),
            data: format!("{{\"id\":\"{id}\"}}"),
            kafka_offset: u64::from(time) + 1,
            ..LedgerRow::default()
        };
        // Two partitions' batches, each in arrival order: prefixes, lengths, a non-ASCII
        // customer, equal times told apart by id.
        let first = [
            event("t", "cust-b", "request", 5, "e2"),
            event("t", "cust-a", "request", 9, "e1"),
            event("s", "z", "request", 1, "e0"),
            event("t", "cust-ab", "login", 3, "x"),
        ];
        let second = [
            event("t", "cust-ü", "request", 1, "e9"),
            event("t", "cust-a", "request", 9, "e0"),
            event("t", "cust-a", "completion", 10, "e5"),
            event("t", "cust", "request", 2, "e3"),
        ];
        let mut body = Body::default();
        for rows in [&first[..], &second[..]] {
            let mut part = Columns::default();
            rows.iter().for_each(|r| r.encode(&mut part));
            body.append(part);
        }
        let checkpoint = LedgerRow {
            kind: KIND_CHECKPOINT,
            topic: "usage".into(),
            kafka_offset: 7,
            ..LedgerRow::default()
        };
        body.push(checkpoint.as_ref());
        let rows = rows_of(&body.into_chunks().concat());
        let ids: Vec<(&str, &str)> = rows[..8]
            .iter()
            .map(|r| (r.customer.as_str(), r.id.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("z", "e0"),
                ("cust", "e3"),
                ("cust-a", "e5"),
                ("cust-a", "e0"),
                ("cust-a", "e1"),
                ("cust-ab", "x"),
                ("cust-b", "e2"),
                ("cust-ü", "e9"),
            ]
        );
        assert_eq!(rows[8], checkpoint);
        let mut expected: Vec<LedgerRow> = first.iter().chain(&second).cloned().collect();
        expected.sort_by(|a, b| table_key(a).cmp(&table_key(b)));
        assert_eq!(rows[..8], expected[..]);
    }

    #[test]
    fn key_columns_no_row_filled_sort_as_empty_strings() {
        let rows = [(9u32, "b"), (3, "z"), (9, "a")].map(|(time, id)| LedgerRow {
            kind: KIND_EVENT,
            time,
            id: id.into(),
            ..LedgerRow::default()
        });
        let mut part = Columns::default();
        rows.iter().for_each(|r| r.encode(&mut part));
        let mut body = Body::default();
        body.append(part);
        let got: Vec<(u32, String)> = rows_of(&body.into_chunks().concat())
            .into_iter()
            .map(|r| (r.time, r.id))
            .collect();
        assert_eq!(got, [(3, "z".into()), (9, "a".into()), (9, "b".into())]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Whatever the partitions and arrival order, the appended rows come out as the
        /// same rows sorted by the table's key, with every column moved along.
        #[test]
        fn event_rows_come_out_sorted_and_whole(
            rows in proptest::collection::vec(
                (
                    0usize..3,
                    proptest::sample::select(vec!["t", "t2", "ü"]),
                    proptest::sample::select(vec!["c", "c1", "c10", "c2", "", "é", "c-ü"]),
                    proptest::sample::select(vec!["request", "login", "completion"]),
                    0u32..4,
                    0u32..1_000_000,
                    proptest::sample::select(vec!["", "sdk"]),
                    0u64..3,
                    proptest::bool::ANY,
                ),
                0..60,
            )
        ) {
            let mut parts = vec![Columns::default(), Columns::default(), Columns::default()];
            let mut all = Vec::new();
            for (n, (part, tenant, customer, t, time, nanos, source, offset, dims)) in
                rows.into_iter().enumerate()
            {
                let row = LedgerRow {
                    kind: KIND_EVENT,
                    tenant: tenant.into(),
                    customer: customer.into(),
                    id: format!("id-{}", n % 7),
                    event_type: t.into(),
                    time,
                    time_nanos: nanos,
                    received_at: time + 1,
                    source: source.into(),
                    data: "x".repeat(n % 200),
                    kafka_partition: part as u32,
                    kafka_offset: offset,
                    dim_values: if dims { vec![format!("d{n}"), String::new()] } else { vec![] },
                    d_sum: if dims { -(n as i128) } else { 0 },
                    ..LedgerRow::default()
                };
                row.encode(&mut parts[part]);
                all.push(row);
            }
            let mut body = Body::default();
            parts.into_iter().for_each(|p| body.append(p));
            let got = rows_of(&body.into_chunks().concat());
            let mut want = all;
            want.sort_by(|a, b| table_key(a).cmp(&table_key(b)));
            let keys = |rows: &[LedgerRow]| -> Vec<(String, String, String, u32, String)> {
                rows.iter()
                    .map(|r| {
                        let (a, b, c, d, e) = table_key(r);
                        (a.to_owned(), b.to_owned(), c.to_owned(), d, e.to_owned())
                    })
                    .collect()
            };
            // Equal keys may come in either order; the keys' order and the rows are fixed.
            proptest::prop_assert_eq!(keys(&got), keys(&want));
            let mut got_sorted = got.clone();
            let mut want_sorted = want.clone();
            let whole = |a: &LedgerRow, b: &LedgerRow| format!("{a:?}").cmp(&format!("{b:?}"));
            got_sorted.sort_by(whole);
            want_sorted.sort_by(whole);
            proptest::prop_assert_eq!(got_sorted, want_sorted);
        }
    }

    #[test]
    fn an_empty_body_has_no_rows() {
        let mut body = Body::default();
        body.append(Columns::default());
        assert!(body.is_empty());
        let (ncols, rows, cols) = columns_of(&body.into_chunks().concat());
        assert_eq!((ncols, rows), (23, 0));
        assert!(cols.iter().all(|c| c.2.is_empty()));
    }
}
