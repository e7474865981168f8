-- Retention (SAGAS_RETENTION, `sagactl prune`): finished instances older than the retention are
-- deleted with their events, timers and outbox rows (docs/operations.md, "Retention").
--
-- The newest `finished before` time a prune deleted with. An instance created after it cannot
-- have been deleted (it finished after it); one created before it may have been. `sagactl
-- reconcile` reads it so as not to report barrier rows of pruned transactions as orphans
-- (transaction ids are UUIDv7: their creation time is in the id). One row at most.
CREATE TABLE sagas_retention (
    singleton     boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_before timestamptz NOT NULL
);
