-- no-transaction
-- Finished instances, oldest first, for the retention loop: it finds what is due without
-- reading open instances. Built concurrently (no transaction) so that a large table keeps
-- taking writes while the index is built; IF NOT EXISTS lets a run that was interrupted be
-- repeated.
CREATE INDEX CONCURRENTLY IF NOT EXISTS sagas_instances_finished ON sagas_instances (updated_at)
    WHERE status IN ('completed', 'compensated', 'resolved');
