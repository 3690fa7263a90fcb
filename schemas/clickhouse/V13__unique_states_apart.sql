-- UNIQUE_COUNT states in tables of their own: `rollups_unique_hourly` and
-- `usage_unique_daily`, keyed like `rollups_hourly` and `usage_daily`.
--
-- Until now every row of those two tables carried a `uniqExact` state, whatever its meter's
-- aggregation (for the other meters a set holding the empty string). ClickHouse 18.16 pays
-- for that column on every row it inserts, merges and reads, even where no reader wants it:
-- measured on the local server, about 0.3 s per million rows inserted and as much per two
-- million merged, and 8-14 % of the server's time in the rater's usage read (five meters
-- per customer, one of them UNIQUE_COUNT). Now only UNIQUE_COUNT meters' rows carry one.
--
-- The aggregator's ledger rows do not change. A UNIQUE_COUNT delta is the one rollup row
-- with a non-empty `d_unique` (the collector and the aggregator refuse an empty identifier):
-- its `d_count` still goes to `rollups_hourly` and `usage_daily` (so every meter keeps its
-- `events` there), its identifier to the new tables. The new views are named to run before
-- the checkpoint view (V2): whoever sees a flush's checkpoint sees its unique states too.
--
-- The copies below move the states already stored: a row holds a meter's identifiers
-- unless its set contains the empty string, which only other meters' rows do. Run again
-- after a kill, each copies only the keys not there yet. The views of V2 and V11 are then
-- replaced by the same views without the state; V14 drops the column. Apply with no
-- aggregator flushing (`tally-aggregator migrate` waits for quiet, as for V11): a flush
-- between the new views' creation and the copies, or between a view's drop and its
-- re-creation, would be counted wrongly.
CREATE TABLE IF NOT EXISTS rollups_unique_hourly
(
    tenant String,
    customer String,
    meter String,
    hour DateTime('UTC'),
    dim_values Array(String),
    value_unique AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant, customer, meter, hour, dim_values);

CREATE TABLE IF NOT EXISTS usage_unique_daily
(
    tenant String,
    customer String,
    meter String,
    day DateTime('UTC'),
    value_unique AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (tenant, customer, meter, day);

CREATE MATERIALIZED VIEW IF NOT EXISTS ledger_3_unique_hourly TO rollups_unique_hourly AS
SELECT tenant, customer, meter, hour, dim_values,
       uniqExactState(d_unique) AS value_unique
FROM ingest_ledger
WHERE kind = 2 AND d_unique != ''
GROUP BY tenant, customer, meter, hour, dim_values;

CREATE MATERIALIZED VIEW IF NOT EXISTS ledger_5_unique_daily TO usage_unique_daily AS
SELECT tenant, customer, meter, toStartOfDay(hour) AS day,
       uniqExactState(d_unique) AS value_unique
FROM ingest_ledger
WHERE kind = 2 AND d_unique != ''
GROUP BY tenant, customer, meter, day;

INSERT INTO rollups_unique_hourly
SELECT tenant, customer, meter, hour, dim_values, uniqExactMergeState(value_unique)
FROM rollups_hourly CROSS JOIN (SELECT uniqExactState('') AS no_identifier) AS empty_set
WHERE finalizeAggregation(value_unique) > 0
  AND arrayReduce('uniqExactMerge', [value_unique, no_identifier]) > finalizeAggregation(value_unique)
  AND (tenant, customer, meter, hour, dim_values) NOT IN
      (SELECT tenant, customer, meter, hour, dim_values FROM rollups_unique_hourly)
GROUP BY tenant, customer, meter, hour, dim_values;

INSERT INTO usage_unique_daily
SELECT tenant, customer, meter, day, uniqExactMergeState(value_unique)
FROM usage_daily CROSS JOIN (SELECT uniqExactState('') AS no_identifier) AS empty_set
WHERE finalizeAggregation(value_unique) > 0
  AND arrayReduce('uniqExactMerge', [value_unique, no_identifier]) > finalizeAggregation(value_unique)
  AND (tenant, customer, meter, day) NOT IN
      (SELECT tenant, customer, meter, day FROM usage_unique_daily)
GROUP BY tenant, customer, meter, day;

DROP TABLE IF EXISTS ledger_2_rollups_hourly;

CREATE MATERIALIZED VIEW IF NOT EXISTS ledger_2_rollups_hourly TO rollups_hourly AS
SELECT tenant, customer, meter, hour, dim_values,
       sumState(d_count) AS events,
       sumState(d_sum) AS value_sum,
       minState(d_min) AS value_min,
       maxState(d_max) AS value_max,
       argMaxState(d_latest, d_latest_at) AS value_latest
FROM ingest_ledger
WHERE kind = 2
GROUP BY tenant, customer, meter, hour, dim_values;

DROP TABLE IF EXISTS ledger_4_usage_daily;

CREATE MATERIALIZED VIEW IF NOT EXISTS ledger_4_usage_daily TO usage_daily AS
SELECT tenant, customer, meter, toStartOfDay(hour) AS day,
       sumState(d_count) AS events,
       sumState(d_sum) AS value_sum,
       minState(d_min) AS value_min,
       maxState(d_max) AS value_max,
       argMaxState(d_latest, d_latest_at) AS value_latest
FROM ingest_ledger
WHERE kind = 2
GROUP BY tenant, customer, meter, day;
