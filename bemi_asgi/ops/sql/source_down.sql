-- bemi-asgi source rollback: undo what source_up.sql did for one publication. Idempotent.
-- Tables get back the replica identity they had before, unless another publication still publishes them. When no
-- publication managed by bemi-asgi remains, the event trigger, functions and bookkeeping tables go too.
-- Replication slots are left alone: drop the worker's slot yourself once the worker is stopped for good, with
-- SELECT pg_drop_replication_slot('<slot name>'), or it keeps WAL on disk forever.
DROP PUBLICATION IF EXISTS {{publication_identifier}};

DO $$
DECLARE
    saved record;
BEGIN
    -- Only PostgreSQL's own functions: one in a schema the session searches could be a better match for a call
    -- below and run with the rights of the role rolling back.
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF to_regclass('bemi.source_publications') IS NULL THEN
        RETURN;
    END IF;
    DELETE FROM bemi.source_publications WHERE publication = {{publication}};
    FOR saved IN
        SELECT s.relid, s.identity, i.relname AS index_name, n.nspname, c.relname
        FROM bemi.source_replica_identities s
        JOIN pg_class c ON c.oid = s.relid AND c.relreplident = 'f'
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_class i ON i.oid = s.index_relid
        WHERE NOT EXISTS (
            SELECT FROM pg_publication_tables pt
            JOIN pg_namespace pn ON pn.nspname = pt.schemaname
            JOIN pg_class pc ON pc.relnamespace = pn.oid AND pc.relname = pt.tablename
            -- (pg_partition_ancestors lists nothing for a table that is not a partition)
            WHERE pc.oid = s.relid OR pc.oid IN (SELECT relid FROM pg_partition_ancestors(s.relid))
        )
    LOOP
        EXECUTE format('ALTER TABLE %I.%I REPLICA IDENTITY %s', saved.nspname, saved.relname,
                       CASE saved.identity
                           WHEN 'n' THEN 'NOTHING'
                           WHEN 'i' THEN format('USING INDEX %I', saved.index_name)
                           ELSE 'DEFAULT'
                       END);
        DELETE FROM bemi.source_replica_identities WHERE relid = saved.relid;
    END LOOP;
    IF NOT EXISTS (SELECT FROM bemi.source_publications) THEN
        DROP EVENT TRIGGER IF EXISTS bemi_track_new_tables;
        DROP EVENT TRIGGER IF EXISTS bemi_record_schema_changes;
        DROP EVENT TRIGGER IF EXISTS bemi_record_dropped_objects;
        DROP FUNCTION IF EXISTS bemi.track_new_tables();
        DROP FUNCTION IF EXISTS bemi.record_schema_changes();
        DROP FUNCTION IF EXISTS bemi.record_dropped_objects();
        DROP FUNCTION IF EXISTS bemi.remember_table_definitions(name);
        DROP FUNCTION IF EXISTS bemi.record_schema_change(oid, jsonb, text, text, text);
        DROP FUNCTION IF EXISTS bemi.records_schema_of(oid);
        DROP FUNCTION IF EXISTS bemi.table_definition(oid);
        DROP FUNCTION IF EXISTS bemi.create_publication(name, name[]);
        DROP FUNCTION IF EXISTS bemi.exclude(name, text[], name[], text[]);
        DROP FUNCTION IF EXISTS bemi.untrack_table(name, regclass);
        DROP FUNCTION IF EXISTS bemi.track_schema(name, name);
        DROP FUNCTION IF EXISTS bemi.track_table(name, regclass);
        DROP FUNCTION IF EXISTS bemi.set_replica_identity_full(regclass);
        DROP FUNCTION IF EXISTS bemi.table_key(name, name);
        DROP TABLE IF EXISTS bemi.source_table_definitions;
        DROP TABLE bemi.source_replica_identities;
        DROP TABLE bemi.source_publications;
    END IF;
END $$;

-- The schema goes when nothing else (the destination tables, say) lives in it.
DO $$
BEGIN
    DROP SCHEMA IF EXISTS bemi;
EXCEPTION WHEN dependent_objects_still_exist THEN
    NULL;
END $$;
