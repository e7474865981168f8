-- The start outbox: requests to start a transaction, written by `sagas_participant::start_in`
-- in the service's own transaction, and delivered to the orchestrator by a start relay
-- (docs/protocol.md, "Transactional starts"). Idempotent, like 0001:
-- `sagas_participant::start::install` runs it at every start-up of a relay.
--
-- A row is deleted once the orchestrator accepted it; a row it refused stays, with
-- state 'failed', the reason and the time (never published again).
CREATE TABLE IF NOT EXISTS sagas_start_outbox (
    id              uuid        PRIMARY KEY,
    definition      text        NOT NULL,
    version         integer,
    input           jsonb       NOT NULL,
    idempotency_key text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    published_at    timestamptz,
    last_error      text,
    failed_at       timestamptz
);

CREATE INDEX IF NOT EXISTS sagas_start_outbox_pending
    ON sagas_start_outbox (created_at) WHERE state = 'pending';

-- Every insert wakes the relays (LISTEN sagas_start_outbox) when its transaction commits,
-- whoever wrote it: a service in another language needs no more than a plain INSERT.
CREATE OR REPLACE FUNCTION sagas_start_outbox_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sagas_start_outbox', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER sagas_start_outbox_inserted
    AFTER INSERT ON sagas_start_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION sagas_start_outbox_notify();
