-- The participants' circuit breakers (as migrations/orchestrator/0010): the state as JSON,
-- `updated_at` in microseconds since the epoch.
CREATE TABLE sagas_breakers (
    participant TEXT    PRIMARY KEY,
    state       TEXT    NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;
