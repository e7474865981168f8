-- The barrier cleanup horizon: the newest cutoff a cleanup deleted rows with. A transaction
-- created after it has all its rows (they are newer than the cutoff); one created before it
-- may have lost them. `sagactl reconcile --participant` reads it so as not to report a cleaned
-- transaction as missing rows. One row at most. Idempotent, like 0001.
CREATE TABLE IF NOT EXISTS sagas_barrier_retention (
    singleton     boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_before timestamptz NOT NULL
);
