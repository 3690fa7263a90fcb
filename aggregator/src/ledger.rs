//! Rows of `ingest_ledger` in ClickHouse's RowBinary, written by hand.
//!
//! A flush is one INSERT of every row it carries (see `V2__rollups.sql`). Event rows are the
//! bulk of it, one per record, so they are encoded as each record is counted, straight from
//! the fields borrowed from the Kafka payload: no owned row, no per-field allocation, and at
//! flush time the partition's bytes are handed to the insert as they are. Rollup, coverage
//! and checkpoint rows, a few per flush, go through [`LedgerRow`]. Both paths share
//! [`RowRef::encode`], so the layout is written down once, in [`COLUMNS`]' order.

/// The columns of the insert, in the order [`RowRef::encode`] writes them.
pub const COLUMNS: &str = "kind, tenant, customer, id, type, time, time_nanos, received_at, \
     source, data, topic, kafka_partition, kafka_offset, meter, hour, dim_values, d_count, \
     d_sum, d_min, d_max, d_latest, d_latest_at, d_unique";

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

    /// Appends this row's RowBinary to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
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

    /// Appends the row in RowBinary, columns in [`COLUMNS`]' order: integers little-endian
    /// at their width (`DateTime` as `UInt32`, `Decimal(38, 9)` as `Int128`), strings and
    /// arrays as a LEB128 length and their bytes or elements.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.kind);
        put_str(out, self.tenant);
        put_str(out, self.customer);
        put_str(out, self.id);
        put_str(out, self.event_type);
        out.extend_from_slice(&self.time.to_le_bytes());
        out.extend_from_slice(&self.time_nanos.to_le_bytes());
        out.extend_from_slice(&self.received_at.to_le_bytes());
        put_str(out, self.source);
        put_str(out, self.data);
        put_str(out, self.topic);
        out.extend_from_slice(&self.kafka_partition.to_le_bytes());
        out.extend_from_slice(&self.kafka_offset.to_le_bytes());
        put_str(out, self.meter);
        out.extend_from_slice(&self.hour.to_le_bytes());
        put_len(out, self.dim_values.len());
        for d in self.dim_values {
            put_str(out, d);
        }
        out.extend_from_slice(&self.d_count.to_le_bytes());
        for v in [self.d_sum, self.d_min, self.d_max, self.d_latest] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.d_latest_at.to_le_bytes());
        put_str(out, self.d_unique);
    }
}

/// The body of one flush's INSERT: chunks of encoded rows, sent in order without being
/// joined into one buffer.
#[derive(Debug, Default)]
pub struct Body {
    chunks: Vec<Vec<u8>>,
    tail: Vec<u8>,
    rows: usize,
}

impl Body {
    pub fn push(&mut self, row: RowRef<'_>) {
        row.encode(&mut self.tail);
        self.rows += 1;
    }

    /// Adds `rows` rows encoded elsewhere, as one chunk (not copied).
    pub fn append_encoded(&mut self, bytes: Vec<u8>, rows: usize) {
        if rows == 0 {
            return;
        }
        if !self.tail.is_empty() {
            self.chunks.push(std::mem::take(&mut self.tail));
        }
        self.chunks.push(bytes);
        self.rows += rows;
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn into_chunks(mut self) -> Vec<Vec<u8>> {
        if !self.tail.is_empty() {
            self.chunks.push(self.tail);
        }
        self.chunks
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

    #[test]
    fn a_row_is_its_columns_in_order() {
        let row = LedgerRow {
            kind: KIND_ROLLUP,
            tenant: "t".into(),
            customer: "cü".into(),
            hour: 3600,
            dim_values: vec!["a".into(), String::new()],
            d_count: 2,
            d_sum: -1,
            ..LedgerRow::default()
        };
        let mut out = Vec::new();
        row.encode(&mut out);
        let mut want = vec![KIND_ROLLUP, 1, b't', 3, b'c', 0xc3, 0xbc, 0, 0];
        want.extend([0u8; 12]); // time, time_nanos, received_at
        want.extend([0, 0, 0]); // source, data, topic
        want.extend([0u8; 12]); // kafka_partition, kafka_offset
        want.push(0); // meter
        want.extend(3600u32.to_le_bytes());
        want.extend([2, 1, b'a', 0]);
        want.extend(2u64.to_le_bytes());
        want.extend([0xff; 16]); // d_sum = -1
        want.extend([0u8; 48 + 8]); // d_min, d_max, d_latest, d_latest_at
        want.push(0); // d_unique
        assert_eq!(out, want);
        assert_eq!(COLUMNS.split(", ").count(), 23);
    }
}
