-- The participant barrier: one row per (transaction, step, operation) that a participant has
-- answered, written in the same transaction as the business change. Idempotent on purpose:
-- `sagas_participant::barrier::install` runs it at every start-up, and participants may also
-- run it from their own migration tool.
--
-- origin:
--   'handler'           the operation's handler ran; reply is what it returned
--   'null_compensation' an undo arrived for a forward operation that never took effect
--   'guard'             a forward-operation row written by its undo, so that a late forward
--                       operation is refused (anti-hanging); reply is that refusal
CREATE TABLE IF NOT EXISTS sagas_barrier (
    transaction_id uuid        NOT NULL,
    step           text        NOT NULL,
    operation      text        NOT NULL,
    origin         text        NOT NULL,
    reply          jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transaction_id, step, operation)
);

CREATE INDEX IF NOT EXISTS sagas_barrier_created_at ON sagas_barrier (created_at);
