-- Every plan version the rater has loaded, with the SHA-256 of its file: a published version
-- is immutable, so a file whose content changed under a version number already recorded
-- here is refused ("publish the change as a new version"), instead of repricing invoices
-- and entitlements that were computed from the old content. Append-only: the earliest row
-- of a (plan, version) is the published one; two raters loading a new version at once may
-- both write it.
CREATE TABLE IF NOT EXISTS plan_versions
(
    plan String,
    version UInt32,
    -- hex SHA-256 of the file's bytes, as invoice segments carry it
    digest String,
    first_seen DateTime('UTC')
)
ENGINE = MergeTree
ORDER BY (plan, version, first_seen);
