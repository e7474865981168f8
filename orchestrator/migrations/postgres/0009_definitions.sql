-- Definitions registered under a name and version: immutable once stored.
--
-- Every process records the plan of each definition it registers (its code's, or a document's
-- registered through the API); a process whose plan differs from the one stored under the same
-- name and version refuses to start, so that a changed definition gets a new version and
-- running instances keep the plan they started with. A definition registered as a document
-- keeps the document too (`document`, NULL for one defined in code): every process can load
-- and run it. The plan itself is in `sagas_plans` (its id is its fingerprint). Rows are never
-- updated nor deleted.
CREATE TABLE IF NOT EXISTS sagas_definitions (
    name          text        NOT NULL,
    version       bigint      NOT NULL,
    plan_id       uuid        NOT NULL,
    document      jsonb,
    registered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
