-- Every accepted event as the collector stored it in Kafka: the audit trail, the source
-- rollups are rebuilt from after a meter change, and drill-down for dashboards.
-- Partitioned by month of event time so retention is `ALTER TABLE … DROP PARTITION`
-- (ClickHouse 18.16 has no TTL). Works unchanged on 18.16 and on current ClickHouse.
CREATE TABLE IF NOT EXISTS events_raw
(
    tenant String,
    customer String,
    id String,
    type String,
    -- Event time, UTC, whole seconds; the sub-second part apart (no DateTime64 on 18.16).
    time DateTime('UTC'),
    time_nanos UInt32,
    received_at DateTime('UTC'),
    source String,
    -- `data` exactly as sent (numbers keep their decimal text).
    data String,
    -- Where the event was read from, for audit and replay.
    kafka_partition UInt32,
    kafka_offset UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (tenant, customer, type, time, id)
