-- The orchestrator's schema on SQLite (the embedded store): the same four tables as
-- migrations/orchestrator/0001_init.sql, in SQLite's types. UUIDs are lowercase hyphenated text
-- (its order is the UUID's byte order), times are microseconds since the Unix epoch in UTC (an
-- integer orders correctly and keeps PostgreSQL's precision), JSON documents are text.

CREATE TABLE sagas_instances (
    id          TEXT    NOT NULL PRIMARY KEY,
    definition  TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    mode        TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    -- number of events in the log; the projection is the fold of exactly these events
    seq         INTEGER NOT NULL,
    -- the state machine's instance state (machine::Instance) as JSON
    state       TEXT    NOT NULL,
    failure     TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;

CREATE INDEX sagas_instances_created ON sagas_instances (created_at, id);
CREATE INDEX sagas_instances_open ON sagas_instances (status, updated_at)
    WHERE status NOT IN ('completed', 'compensated');

CREATE TABLE sagas_events (
    instance_id TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    step        INTEGER,
    operation   TEXT,
    attempt     INTEGER,
    body        TEXT    NOT NULL,
    at          INTEGER NOT NULL,
    PRIMARY KEY (instance_id, seq)
) STRICT, WITHOUT ROWID;

CREATE TABLE sagas_outbox (
    -- AUTOINCREMENT: an id is never reused, so a late delete of a published row can never
    -- remove a newer, unpublished one
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id  TEXT    NOT NULL,
    participant  TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    -- the relay may (re)publish the row from this time on; the writer publishes it at once
    available_at INTEGER NOT NULL
) STRICT;

CREATE INDEX sagas_outbox_available ON sagas_outbox (available_at);

CREATE TABLE sagas_timers (
    instance_id TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    due_at      INTEGER NOT NULL,
    timer       TEXT    NOT NULL,
    PRIMARY KEY (instance_id, key)
) STRICT;

CREATE INDEX sagas_timers_due ON sagas_timers (due_at);
