-- Which Kafka offsets each meter version's rollups already count, per partition.
--
-- A meter's rollups are stored under its storage key (key@definition-fingerprint), so a
-- changed meter starts with empty rollups. Every flush records, in the same insert as its
-- rollup deltas, the offset range it counted for each meter version it knows (source
-- 'live'); `tally-aggregator rebuild` fills every range no flush covered from
-- `events_raw` and records those ranges too (source 'rebuild'), in the same insert as the
-- rebuilt rollups. Running it again covers only what is still missing.
--
-- Ledger rows of kind 4 carry a range: `meter`, `kafka_partition`, `d_count` = first
-- offset, `kafka_offset` = last offset, `source` = 'live' or 'rebuild'.
CREATE TABLE IF NOT EXISTS meter_coverage
(
    topic String,
    meter String,
    kafka_partition UInt32,
    offset_from UInt64,
    offset_to UInt64,
    source String,
    written_at DateTime('UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(written_at)
ORDER BY (topic, meter, kafka_partition, offset_from);

CREATE MATERIALIZED VIEW IF NOT EXISTS ledger_3_meter_coverage TO meter_coverage AS
SELECT topic, meter, kafka_partition, d_count AS offset_from, kafka_offset AS offset_to,
       source, received_at AS written_at
FROM ingest_ledger
WHERE kind = 4;
