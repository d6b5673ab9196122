-- bemi-asgi destination rollback: drops the stored change history and the worker's progress. Idempotent.
DROP TABLE IF EXISTS bemi.changes;
DROP TABLE IF EXISTS bemi.worker_state;
DROP TABLE IF EXISTS bemi.tracking_rules;
DROP TABLE IF EXISTS bemi.streams;
DROP TABLE IF EXISTS bemi.chain;
DROP TABLE IF EXISTS bemi.chain_anchors;
DROP FUNCTION IF EXISTS bemi.create_changes_partitions(integer);

-- The schema goes when nothing else (the source's event trigger functions, say) lives in it.
DO $$
BEGIN
    DROP SCHEMA IF EXISTS bemi;
EXCEPTION WHEN dependent_objects_still_exist THEN
    NULL;
END $$;
