-- The participants' circuit breakers (docs/architecture.md, "Circuit breakers"): one row per
-- participant, its state as JSON (`breaker::BreakerState` in the orchestrator: open or closed,
-- the current window's counts, the next probe). About once a second every orchestrator process
-- adds the outcomes of the attempts it counted and advances every row under its lock, so one
-- process makes, and logs, each change; the others read the result.
CREATE TABLE IF NOT EXISTS sagas_breakers (
    participant text        PRIMARY KEY,
    state       jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL
);
