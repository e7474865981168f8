-- The `started` event names its plan too, instead of carrying it (see 0004_plans.sql).
--
-- The log stays self-contained: the event row names the plan (`plan_id`, set on `started`
-- events only) and its `body` is the event without the plan. Rows written before keep
-- `plan_id` NULL and the plan inside `body`. The view `sagas_event_bodies` gives every event
-- whole, whichever shape: the store's log reads and `sagactl reconcile` use it.
ALTER TABLE sagas_events ADD COLUMN IF NOT EXISTS plan_id uuid;

CREATE OR REPLACE VIEW sagas_event_bodies AS
SELECT e.instance_id, e.seq, e.kind, e.step, e.operation, e.attempt, e.at,
       CASE WHEN e.plan_id IS NULL THEN e.body
            ELSE e.body || jsonb_build_object('plan', p.plan) END AS body
FROM sagas_events e
LEFT JOIN sagas_plans p ON p.id = e.plan_id;
