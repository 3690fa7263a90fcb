-- Usage per tenant, customer, meter and UTC day: the rater reads whole-day segments here
-- instead of every hour and dimension value of `rollups_hourly`, and so does the usage API
-- for UTC days, months and totals that group and filter on no dimension.
--
-- A month of an active customer's meter is up to 720 hourly rows per dimension value; here
-- it is 30 rows, whatever the dimensions. Invoices need no dimensions: a period that
-- starts and ends at UTC midnight (an anchor at 00:00 UTC) reads only this table, and one
-- with a bound inside a day reads `rollups_hourly` as before.
--
-- Written by the same single insert per flush as the hourly rollups (a view of
-- `ingest_ledger`, named to run before the checkpoint view, see V2): whoever sees a
-- flush's checkpoint sees its days too, and a rebuild's rows reach both tables alike.
--
-- The last statement fills the table from the hourly rollups already stored, each day that
-- is not there yet: run again after a kill, it adds only what the killed run did not (a day
-- is one row of its output, so it was written whole or not at all). Apply this migration
-- with no aggregator flushing (as `tally-aggregator migrate` before starting them): a day
-- that a flush reached between the view's creation and that statement would hold only
-- that flush. The statement groups every hourly row at once; on a large table, run it by
-- hand one month at a time (`WHERE toYYYYMM(hour) = …`) before applying.
CREATE TABLE IF NOT EXISTS usage_daily
(
    tenant String,
    customer String,
    meter String,
    day DateTime('UTC'),
    events AggregateFunction(sum, UInt64),
    value_sum AggregateFunction(sum, Decimal(38, 9)),
    value_min AggregateFunction(min, Decimal(38, 9)),
    value_max AggregateFunction(max, Decimal(38, 9)),
    value_latest AggregateFunction(argMax, Decimal(38, 9), UInt64),
    value_unique AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (tenant, customer, meter, day);

CREATE MATERIALIZED VIEW IF NOT EXISTS ledger_4_usage_daily TO usage_daily AS
SELECT tenant, customer, meter, toStartOfDay(hour) AS day,
       sumState(d_count) AS events,
       sumState(d_sum) AS value_sum,
       minState(d_min) AS value_min,
       maxState(d_max) AS value_max,
       argMaxState(d_latest, d_latest_at) AS value_latest,
       uniqExactState(d_unique) AS value_unique
FROM ingest_ledger
WHERE kind = 2
GROUP BY tenant, customer, meter, day;

INSERT INTO usage_daily
SELECT tenant, customer, meter, day, events, value_sum, value_min, value_max, value_latest,
       value_unique
FROM
(
    SELECT tenant, customer, meter, toStartOfDay(hour) AS day,
           sumMergeState(events) AS events, sumMergeState(value_sum) AS value_sum,
           minMergeState(value_min) AS value_min, maxMergeState(value_max) AS value_max,
           argMaxMergeState(value_latest) AS value_latest,
           uniqExactMergeState(value_unique) AS value_unique
    FROM rollups_hourly
    GROUP BY tenant, customer, meter, day
)
WHERE (tenant, customer, meter, day) NOT IN (SELECT tenant, customer, meter, day FROM usage_daily);
