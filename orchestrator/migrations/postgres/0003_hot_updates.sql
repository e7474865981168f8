-- Projection updates that PostgreSQL can make HOT (heap-only: no new index entries).
--
-- Every transition rewrites its instance's row. The open-instances index covered `updated_at`,
-- which every transition changes, so no update could be HOT and each one inserted into both
-- indexes. It now covers columns that never change (`created_at`, `id`) after `status`, which
-- changes only a few times per instance; the same index serves "open instances, oldest first"
-- (reconciliation, listing by status) and counting open instances. Free space left in every
-- page (fillfactor) lets the new row version stay on its page, the other condition for HOT.
--
-- On a large existing table the index build holds a lock that blocks writes while it runs;
-- upgrade in a quiet moment (or build the index CONCURRENTLY by hand first, under this name).
DROP INDEX IF EXISTS sagas_instances_open;
CREATE INDEX IF NOT EXISTS sagas_instances_open ON sagas_instances (status, created_at, id)
    WHERE status NOT IN ('completed', 'compensated');
ALTER TABLE sagas_instances SET (fillfactor = 80);
