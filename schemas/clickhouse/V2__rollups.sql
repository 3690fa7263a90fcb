-- Hourly rollups and the aggregator's checkpoints, all written by ONE insert per flush.
--
-- The aggregator inserts a flush's rows into `ingest_ledger` (engine Null: it keeps
-- nothing) in a single INSERT; materialized views route them: new events to `events_raw`,
-- pre-aggregated deltas to `rollups_hourly`, and the Kafka offsets the flush covers to
-- `aggregator_checkpoints`. One INSERT body is one block, so a killed aggregator leaves
-- all three or none: a restart resumes from the checkpoints and its dedupe state is the
-- raw events table, which is never ahead of the rollups it guards.
--
-- ClickHouse pushes a block to a table's views one after another, in the order of their
-- names, so the names order the writes: raw events, rollups, then the checkpoint. Whoever
-- sees a checkpoint sees that flush's rollups. (The views are written apart, so a
-- ClickHouse server crash in the middle of one insert could leave part of a flush; a
-- killed aggregator cannot.)
CREATE TABLE IF NOT EXISTS ingest_ledger
(
    -- 1 = event (to events_raw), 2 = rollup delta, 3 = checkpoint
    kind UInt8,
    tenant String,
    customer String,
    id String,
    type String,
    time DateTime('UTC'),
    time_nanos UInt32,
    received_at DateTime('UTC'),
    source String,
    data String,
    topic String,
    kafka_partition UInt32,
    kafka_offset UInt64,
    meter String,
    hour DateTime('UTC'),
    dim_values Array(String),
    d_count UInt64,
    d_sum Decimal(38, 9),
    d_min Decimal(38, 9),
    d_max Decimal(38, 9),
    d_latest Decimal(38, 9),
    -- event time as nanoseconds since the epoch: LATEST's ordering key
    d_latest_at UInt64,
    d_unique String
)
ENGINE = Null;

-- Per tenant, customer, meter, dimension values (in the meter's group_by order) and UTC
-- hour. Each meter reads the column of its aggregation; days and months are summed from
-- hours at query time (24 rows a day per group: cheaper than keeping a second table
-- consistent, and any whole-hour time zone's days come out right).
CREATE TABLE IF NOT EXISTS rollups_hourly
(
    tenant String,
    customer String,
    meter String,
    hour DateTime('UTC'),
    dim_values Array(String),
    events AggregateFunction(sum, UInt64),
    value_sum AggregateFunction(sum, Decimal(38, 9)),
    value_min AggregateFunction(min, Decimal(38, 9)),
    value_max AggregateFunction(max, Decimal(38, 9)),
    value_latest AggregateFunction(argMax, Decimal(38, 9), UInt64),
    value_unique AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant, customer, meter, hour, dim_values);

CREATE TABLE IF NOT EXISTS aggregator_checkpoints
(
    topic String,
    kafka_partition UInt32,
    kafka_offset UInt64,
    flushed_at DateTime('UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(flushed_at)
ORDER BY (topic, kafka_partition, kafka_offset);

CREATE MATERIALIZED VIEW IF NOT EXISTS ledger_1_events_raw TO events_raw AS
SELECT tenant, customer, id, type, time, time_nanos, received_at, source, data,
       kafka_partition, kafka_offset
FROM ingest_ledger
WHERE kind = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS ledger_2_rollups_hourly TO rollups_hourly AS
SELECT tenant, customer, meter, hour, dim_values,
       sumState(d_count) AS events,
       sumState(d_sum) AS value_sum,
       minState(d_min) AS value_min,
       maxState(d_max) AS value_max,
       argMaxState(d_latest, d_latest_at) AS value_latest,
       uniqExactState(d_unique) AS value_unique
FROM ingest_ledger
WHERE kind = 2
GROUP BY tenant, customer, meter, hour, dim_values;

CREATE MATERIALIZED VIEW IF NOT EXISTS ledger_9_checkpoints TO aggregator_checkpoints AS
SELECT topic, kafka_partition, kafka_offset, received_at AS flushed_at
FROM ingest_ledger
WHERE kind = 3;
