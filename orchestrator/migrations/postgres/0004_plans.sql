-- Plans stored once, not in every projection row.
--
-- An instance's state carries the plan it started with (its definition's steps, participants,
-- retry policies): about half of the state's JSON, the same for every instance of a version,
-- and rewritten, parsed and compressed with every transition. Plans now live in `sagas_plans`,
-- keyed by a name-based UUID (version 5) of their JSON, and an instance names its plan in
-- `plan_id`; its `state` is then the instance without the plan.
--
-- Rows written before this migration keep `plan_id` NULL and the plan inside `state`; the
-- orchestrator reads both shapes, and the next transition of such an instance rewrites it in
-- the new one. There is no foreign key: a plan row is written in the same statement as the
-- first instance that names it, and rows are never deleted.
CREATE TABLE IF NOT EXISTS sagas_plans (
    id   uuid  PRIMARY KEY,
    plan jsonb NOT NULL
);

ALTER TABLE sagas_instances ADD COLUMN IF NOT EXISTS plan_id uuid;

-- Every instance with its whole state (plan included), whichever shape its row has: what the
-- API, `sagactl reconcile` and ad-hoc queries read.
CREATE OR REPLACE VIEW sagas_instance_states AS
SELECT i.id, i.definition, i.version, i.mode, i.status, i.seq, i.failure,
       i.created_at, i.updated_at, i.idempotency_key, i.request,
       CASE WHEN i.plan_id IS NULL THEN i.state
            ELSE i.state || jsonb_build_object('plan', p.plan) END AS state
FROM sagas_instances i
LEFT JOIN sagas_plans p ON p.id = i.plan_id;
