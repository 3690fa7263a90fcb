-- Plan-version migrations, one audit record each (rater/src/store.rs, migration.rs). A
-- migration writes one 'migrate' row per moved subscription into subscription_changes
-- (migration_id = id); this table says who ran it, why, over what, and how far it got.
-- Append-only like the change log: one row per step reached ('started' fixes the instant
-- the plan is computed at, so a rerun after a kill plans the same moves; 'written' when
-- every change row is in; 'notified' when every entitlement-changes chunk is acknowledged).
-- The latest step of an id is its state. Never updated or deleted.
CREATE TABLE IF NOT EXISTS plan_migrations
(
    id String,
    tenant String,
    plan String,
    -- Versions moved; empty: every version older than to_version.
    from_versions Array(UInt32),
    to_version UInt32,
    -- The customer filter; empty: every subscriber of the plan.
    customers Array(String),
    -- 'next-period' or an RFC 3339 instant.
    effective String,
    actor String,
    reason String,
    state Enum8('started' = 1, 'written' = 2, 'notified' = 3),
    -- The instant subscriptions are judged at (whole seconds, UTC).
    as_of DateTime('UTC'),
    -- Subscriptions moved, in total and per group (JSON: from/to version, count, effective
    -- range); zero and '[]' on the 'started' row.
    affected UInt64,
    groups String,
    -- Change rows this step's run inserted (a resumed run counts only its own).
    written UInt64,
    started_at DateTime('UTC'),
    recorded_at DateTime('UTC')
)
ENGINE = MergeTree
ORDER BY (tenant, id, state, recorded_at);
