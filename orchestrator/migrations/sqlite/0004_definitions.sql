-- Definitions registered under a name and version, immutable once stored (as
-- migrations/orchestrator/0009): the plan as JSON, and the document of a definition registered
-- as one (NULL for one defined in code). `registered_at` is microseconds since the epoch.
CREATE TABLE sagas_definitions (
    name          TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    plan          TEXT    NOT NULL,
    document      TEXT,
    registered_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) STRICT;
