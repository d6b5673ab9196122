-- (A PL/pgSQL block, spliced by migration.py at the start of each DO block of source_up.sql that runs the
-- migration's functions or installs the event trigger; not a script of its own.)
--
-- The event trigger runs bemi.track_new_tables() with its owner's rights (a superuser) on every CREATE TABLE, and
-- that function calls the others. Whoever owns one of them, the schema bemi (its owner may drop and recreate
-- anything in it), the bookkeeping tables they write (their owner may add triggers) or an overload of their names
-- can run code as that superuser. So these must be owned by a superuser once a superuser runs the migration or
-- the event trigger exists; otherwise by the role running it or a superuser (never a third role, whose code the
-- migration would run). Refuse before running anything, naming the objects and the statements that fix them.
-- search_path is pinned first: a function in a schema the session searches could otherwise be a better match than
-- PostgreSQL's own for a call below and run as the role running the migration.
DECLARE
    strictly boolean;
    foreign_objects text;
    fixes text;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    strictly := (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
              OR EXISTS (SELECT FROM pg_event_trigger
                         WHERE evtname IN ('bemi_track_new_tables', 'bemi_record_schema_changes',
                                           'bemi_record_dropped_objects'));
    WITH owned (object, owner, fix) AS (
        SELECT 'schema bemi', n.nspowner, 'ALTER SCHEMA bemi OWNER TO CURRENT_USER'
        FROM pg_namespace n WHERE n.nspname = 'bemi'
        UNION ALL
        SELECT 'function ' || p.oid::regprocedure::text, p.proowner,
               'ALTER FUNCTION ' || p.oid::regprocedure::text || ' OWNER TO CURRENT_USER'
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'bemi' AND p.proname IN ('table_key', 'set_replica_identity_full', 'track_table',
            'create_publication', 'track_schema', 'track_new_tables', 'untrack_table', 'exclude',
            'table_definition', 'records_schema_of', 'record_schema_change', 'record_schema_changes',
            'record_dropped_objects', 'remember_table_definitions')
        UNION ALL
        SELECT 'table ' || c.oid::regclass::text, c.relowner,
               'ALTER TABLE ' || c.oid::regclass::text || ' OWNER TO CURRENT_USER'
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'bemi' AND c.relname IN ('source_publications', 'source_replica_identities',
                                                    'source_table_definitions')
    ), found (object, fix) AS (
        SELECT format('%s is owned by role "%s", not a superuser', o.object, r.rolname), o.fix
        FROM owned o JOIN pg_roles r ON r.oid = o.owner
        WHERE NOT r.rolsuper AND (strictly OR r.rolname <> current_user)
        UNION ALL
        -- The migration creates no trigger on its tables: one there runs as whoever writes them.
        SELECT format('trigger %s on %s', quote_ident(t.tgname), t.tgrelid::regclass::text),
               format('DROP TRIGGER %s ON %s', quote_ident(t.tgname), t.tgrelid::regclass::text)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'bemi' AND c.relname IN ('source_publications', 'source_replica_identities',
                                                    'source_table_definitions')
          AND NOT t.tgisinternal
    )
    SELECT string_agg(object, '; ' ORDER BY object), string_agg(fix, '; ' ORDER BY fix DESC)
    INTO foreign_objects, fixes FROM found;
    IF foreign_objects IS NOT NULL THEN
        RAISE EXCEPTION 'bemi-asgi refuses to run its functions or install its event trigger over objects another role controls (their code would run with this role''s rights, a superuser''s for the event trigger): %', foreign_objects
            USING HINT = 'Check what these objects do, then, as a superuser: ' || fixes || '. Then run the migration again.';
    END IF;
END;
