-- The last step of V13: the hourly and daily rollups lose the `uniqExact` column that
-- every row carried (its states are in `rollups_unique_hourly` and `usage_unique_daily`
-- now, and no view writes it since V13). 18.16 has no `DROP COLUMN IF EXISTS`: a drop that
-- finds its column gone was applied by a run killed before recording it, and counts as done.
ALTER TABLE rollups_hourly DROP COLUMN value_unique;

ALTER TABLE usage_daily DROP COLUMN value_unique;
