-- Projection updates that PostgreSQL can make HOT again.
--
-- `sagas_instances_finished` (0008) indexed `updated_at`, which every transition changes. An
-- update that changes any indexed column (a partial index's predicate included) cannot be HOT
-- (heap-only), so since 0008 every transition inserted into every index of the table again:
-- none of 9,000 updates in a 3,000-saga benchmark run was HOT. The retention loop and the
-- activity and latency reads now use `finished_at`: `updated_at` once the status is final, NULL
-- before, derived by PostgreSQL from the row so that no statement has to keep it. While an
-- instance runs it stays NULL, so its updates change no indexed column; it is set in the update
-- that changes the status, which the partial indexes' predicates name anyway.
--
-- Adding a stored generated column rewrites the table under a lock that blocks its writes; on a
-- large table, upgrade in a quiet moment (or prune first).
DROP INDEX IF EXISTS sagas_instances_finished;
ALTER TABLE sagas_instances ADD COLUMN IF NOT EXISTS finished_at timestamptz
    GENERATED ALWAYS AS (
        CASE WHEN status IN ('completed', 'compensated', 'resolved') THEN updated_at END
    ) STORED;
CREATE INDEX IF NOT EXISTS sagas_instances_finished ON sagas_instances (finished_at)
    WHERE finished_at IS NOT NULL;
