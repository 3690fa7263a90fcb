-- Subscriptions as an append-only change log: one row per create, plan change, migration
-- or cancel, never updated or deleted. What a customer had in force at any instant is a fold
-- of their rows (rater/src/subscription.rs), so the log is the audit trail and the state at
-- once: nothing can drift between them, and a past invoice is reproducible from the rows it
-- read. ClickHouse suits that shape: inserts are durable once acknowledged, rows are
-- immutable, and an invoice run reads a batch of customers' logs in one query. It has no
-- transactions or unique keys, which is why the writer checks before inserting
-- (rater/src/store.rs says why that is enough). Not partitioned: the table stays small and
-- no part of a log may ever be dropped.
CREATE TABLE IF NOT EXISTS subscription_changes
(
    tenant String,
    customer String,
    -- Idempotency key, unique per customer: supplied by the client, or derived from the
    -- change's content. A change whose id is in the customer's log is not written again,
    -- and readers count an id once should two writers race.
    change_id String,
    kind Enum8('create' = 1, 'change' = 2, 'cancel' = 3, 'migrate' = 4),
    -- From when the change applies; changes at one instant apply in recorded_at, then
    -- change_id order. Whole seconds, UTC.
    effective_at DateTime('UTC'),
    recorded_at DateTime('UTC'),
    -- The plan version in force from effective_at; empty and 0 for a cancel.
    plan String,
    version UInt32,
    -- Set by the create, kept by every later change of the subscription.
    billing_anchor DateTime('UTC'),
    -- Who asked, and why.
    actor String,
    reason String,
    -- The bulk migration that wrote the row; empty unless kind = 'migrate'.
    migration_id String
)
ENGINE = MergeTree
ORDER BY (tenant, customer, effective_at, change_id)
