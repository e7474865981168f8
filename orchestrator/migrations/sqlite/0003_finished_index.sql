-- Finished instances, oldest first, for retention (as migrations/orchestrator/0008).
CREATE INDEX sagas_instances_finished ON sagas_instances (updated_at)
    WHERE status IN ('completed', 'compensated', 'resolved');
