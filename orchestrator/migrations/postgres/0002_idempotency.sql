-- Idempotent starts: a client-chosen key, unique per definition, and the request it came with
-- (input and relative deadline) so that a retry with another body is told apart (409).
ALTER TABLE sagas_instances ADD COLUMN idempotency_key text;
ALTER TABLE sagas_instances ADD COLUMN request jsonb;
CREATE UNIQUE INDEX sagas_instances_idempotency ON sagas_instances (definition, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
