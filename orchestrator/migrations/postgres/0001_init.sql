-- The orchestrator's schema: a projection of every instance, its append-only event log, the
-- outbox of commands to publish, and durable timers. One database transaction per transition
-- writes all four (see docs/architecture.md).

CREATE TABLE sagas_instances (
    id          uuid PRIMARY KEY,
    definition  text        NOT NULL,
    version     integer     NOT NULL,
    mode        text        NOT NULL,
    status      text        NOT NULL,
    -- number of events in the log; the projection is the fold of exactly these events
    seq         bigint      NOT NULL,
    -- the state machine's instance state (machine::Instance) as JSON
    state       jsonb       NOT NULL,
    failure     text,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE INDEX sagas_instances_created ON sagas_instances (created_at, id);
CREATE INDEX sagas_instances_open ON sagas_instances (status, updated_at)
    WHERE status NOT IN ('completed', 'compensated');

CREATE TABLE sagas_events (
    instance_id uuid        NOT NULL,
    seq         bigint      NOT NULL,
    kind        text        NOT NULL,
    step        integer,
    operation   text,
    attempt     integer,
    body        jsonb       NOT NULL,
    at          timestamptz NOT NULL,
    PRIMARY KEY (instance_id, seq)
);

CREATE TABLE sagas_outbox (
    id           bigserial   PRIMARY KEY,
    instance_id  uuid        NOT NULL,
    participant  text        NOT NULL,
    message_id   text        NOT NULL,
    body         jsonb       NOT NULL,
    created_at   timestamptz NOT NULL,
    -- the relay may (re)publish the row from this time on; the writer publishes it at once
    available_at timestamptz NOT NULL
);

CREATE INDEX sagas_outbox_available ON sagas_outbox (available_at);

CREATE TABLE sagas_timers (
    instance_id uuid        NOT NULL,
    key         text        NOT NULL,
    due_at      timestamptz NOT NULL,
    timer       jsonb       NOT NULL,
    PRIMARY KEY (instance_id, key)
);

CREATE INDEX sagas_timers_due ON sagas_timers (due_at);
