//! Rebuilding a meter version's rollups from `events_raw`.
//!
//! Safe while ingest and the aggregators run: it only fills offset ranges that no flush
//! counted for this meter version (`meter_coverage`), and writes each range's rollups and
//! its coverage record in one insert, so a rebuild that is killed, or run again, never
//! counts a range twice. Run it after deploying a changed or added meter; run it again
//! after a rolling deploy if old-config members were still flushing meanwhile. Two
//! rebuilds of the same meter must not run at once.

use std::borrow::Cow;

use tally_core::{Catalog, Meter};
use time::OffsetDateTime;

use crate::ledger::Body;
use crate::rollup::{coverage_row, Dedupe, Event, Meters, Outcome, PartitionBatch};
use crate::store::{RawEvent, Result, Store};

/// The inclusive ranges of `0..=end` not covered by `covered` (sorted by start).
pub fn gaps(covered: &[(i64, i64)], end: i64) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut next = 0i64;
    for &(from, to) in covered {
        if from > next {
            out.push((next, (from - 1).min(end)));
        }
        next = next.max(to + 1);
        if next > end {
            break;
        }
    }
    if next <= end {
        out.push((next, end));
    }
    out.retain(|(a, b)| a <= b);
    out
}

/// What one rebuild did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub ranges: usize,
    pub events: usize,
    pub rows: usize,
}

/// Fills every uncovered range of every partition of `topic` for `meter`'s current
/// definition. `chunk` bounds the offsets one insert covers (and so the memory used).
pub async fn rebuild(
    store: &Store,
    topic: &str,
    meter: &Meter,
    max_dimension_chars: usize,
    chunk: i64,
) -> Result<Report> {
    let catalog = Catalog::new(vec![meter.clone()]).expect("a meter from a valid catalog");
    let meters = Meters::new(&catalog, max_dimension_chars);
    let storage_key = meter.storage_key();
    let mut report = Report::default();
    for partition in store.partitions(topic).await? {
        let (covered, end) = store.coverage(topic, &storage_key, partition).await?;
        let Some(end) = end else { continue };
        for (lo, hi) in gaps(&covered, end) {
            let mut start = lo;
            while start <= hi {
                let stop = (start + chunk - 1).min(hi);
                let events = store
                    .raw_events(partition, (start, stop), &meter.event_type)
                    .await?;
                let mut batch = PartitionBatch::default();
                let none = Dedupe::default();
                for raw in &events {
                    match batch.add_event(
                        &meters,
                        &none,
                        partition,
                        raw.kafka_offset as i64,
                        record(raw),
                    ) {
                        Outcome::Counted => report.events += 1,
                        // Stored events were measured once already; a meter change can make
                        // one unmeasurable (say, a new value field it lacks): it is skipped.
                        Outcome::Poison(p) => {
                            tracing::warn!(id = %raw.id, detail = %p.detail, "event skipped by the rebuild")
                        }
                        Outcome::Duplicate => {}
                    }
                }
                let mut body = Body::default();
                batch.encode_rollups(&mut body);
                let now = OffsetDateTime::now_utc().unix_timestamp() as u32;
                body.push(coverage_row(
                    topic,
                    &storage_key,
                    partition,
                    (start, stop),
                    "rebuild",
                    now,
                ));
                let rows = body.rows();
                let query_id = crate::store::query_id("rebuild");
                if let Err(e) = store.insert_body(body, &query_id).await {
                    settle(store, &query_id).await;
                    return Err(e);
                }
                report.rows += rows;
                report.ranges += 1;
                start = stop + 1;
            }
        }
    }
    Ok(report)
}

/// After a failed insert, waits (up to a minute) until ClickHouse no longer runs it, so a
/// rebuild run again reads coverage that holds the insert if it landed after all.
async fn settle(store: &Store, query_id: &str) {
    for _ in 0..60 {
        if let Ok(true) = store.settled(query_id).await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    tracing::warn!(
        query_id,
        "a failed rebuild insert may still be running in clickhouse: let it end before running the rebuild again"
    );
}

fn record(raw: &RawEvent) -> Event<'_> {
    let at = |secs: u32, nanos: u32| {
        OffsetDateTime::from_unix_timestamp(i64::from(secs))
            .map(|t| t.replace_nanosecond(nanos).unwrap_or(t))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    };
    Event {
        v: tally_core::event::RECORD_VERSION,
        tenant: Cow::Borrowed(&raw.tenant),
        id: Cow::Borrowed(&raw.id),
        customer: Cow::Borrowed(&raw.customer),
        event_type: Cow::Borrowed(&raw.event_type),
        time: at(raw.time, raw.time_nanos),
        received_at: at(raw.received_at, 0),
        source: (!raw.source.is_empty()).then_some(Cow::Borrowed(raw.source.as_str())),
        data: &raw.data,
    }
}

#[cfg(test)]
mod tests {
    use super::gaps;
    use proptest::prelude::*;

    #[test]
    fn gaps_are_the_uncovered_offsets() {
        assert_eq!(gaps(&[], 9), [(0, 9)]);
        assert_eq!(gaps(&[(0, 9)], 9), []);
        assert_eq!(gaps(&[(3, 5)], 9), [(0, 2), (6, 9)]);
        assert_eq!(gaps(&[(0, 2), (3, 5)], 5), []);
        assert_eq!(gaps(&[(0, 4), (2, 6), (9, 12)], 10), [(7, 8)]);
        assert_eq!(gaps(&[(5, 20)], 9), [(0, 4)]);
    }

    proptest! {
        #[test]
        fn gaps_and_coverage_partition_the_range(mut ranges in prop::collection::vec((0i64..200, 0i64..20), 0..12), end in 0i64..220) {
            let mut covered: Vec<(i64, i64)> = ranges.drain(..).map(|(a, len)| (a, a + len)).collect();
            covered.sort();
            let g = gaps(&covered, end);
            for o in 0..=end {
                let in_cover = covered.iter().any(|&(a, b)| a <= o && o <= b);
                let in_gap = g.iter().any(|&(a, b)| a <= o && o <= b);
                prop_assert!(in_cover != in_gap, "offset {} covered {} gap {}", o, in_cover, in_gap);
            }
            prop_assert!(g.windows(2).all(|w| w[0].1 < w[1].0));
        }
    }
}
