-- Idempotent starts: see migrations/orchestrator/0002_idempotency.sql.
ALTER TABLE sagas_instances ADD COLUMN idempotency_key TEXT;
ALTER TABLE sagas_instances ADD COLUMN request TEXT;
CREATE UNIQUE INDEX sagas_instances_idempotency ON sagas_instances (definition, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
