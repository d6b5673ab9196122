-- bemi-asgi source: what change capture needs on the database the application writes to.
-- Idempotent: safe to run again; a second run changes nothing. Run it as the owner of the tables (and as a
-- superuser if you want tables created later to be tracked automatically: see the event trigger at the end).
--
-- A publication lists the tracked tables explicitly (this works on PostgreSQL 14+, where FOR TABLES IN SCHEMA
-- does not exist and FOR ALL TABLES would include bemi's own tables). Tracked tables get REPLICA IDENTITY FULL:
-- the change stream then carries the whole old row of an UPDATE or DELETE, and a table without a primary key keeps
-- accepting UPDATE and DELETE once it is published. The schema `bemi` is never tracked.
--
-- Who owns what: run it as a superuser (everything it creates is then that superuser's, and the event trigger
-- runs only code no other role can change), or as the tables' owner without the event trigger. It refuses to work
-- over objects another role owns: see source_guard.sql, checked first and again before each step that runs code.
DO $$
BEGIN
    {{guard}}
END $$;

CREATE SCHEMA IF NOT EXISTS bemi;

-- The publications this migration manages, and the schemas whose new tables join them.
CREATE TABLE IF NOT EXISTS bemi.source_publications (
    publication  name PRIMARY KEY,
    schemas      name[] NOT NULL DEFAULT '{}'
);

-- Tables never tracked by a publication (--exclude-table), as '"schema"."table"' (quoted like --table's names):
-- schema tracking and the event trigger skip them, even when they are created later. --table takes one back.
ALTER TABLE bemi.source_publications ADD COLUMN IF NOT EXISTS excluded_tables text[] NOT NULL DEFAULT '{}';

-- A table's name in the form excluded_tables holds.
CREATE OR REPLACE FUNCTION bemi.table_key(schema_name name, table_name name) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT '"' || replace(schema_name, '"', '""') || '"."' || replace(table_name, '"', '""') || '"'
$$;

-- Each table's replica identity from before this migration set it to FULL, so the rollback can restore it.
CREATE TABLE IF NOT EXISTS bemi.source_replica_identities (
    relid        oid PRIMARY KEY,
    identity     "char" NOT NULL,
    -- The index of REPLICA IDENTITY USING INDEX.
    index_relid  oid
);

-- Give one table REPLICA IDENTITY FULL, remembering the setting it replaces.
CREATE OR REPLACE FUNCTION bemi.set_replica_identity_full(rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    previous "char";
BEGIN
    SELECT relreplident INTO previous FROM pg_class WHERE oid = rel;
    IF previous = 'f' THEN
        RETURN;
    END IF;
    INSERT INTO bemi.source_replica_identities (relid, identity, index_relid)
    VALUES (rel, previous, (SELECT indexrelid FROM pg_index WHERE indrelid = rel AND indisreplident))
    ON CONFLICT (relid) DO UPDATE SET identity = excluded.identity, index_relid = excluded.index_relid;
    EXECUTE format('ALTER TABLE %I.%I REPLICA IDENTITY FULL',
                   (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel),
                   (SELECT relname FROM pg_class WHERE oid = rel));
END $$;

-- Track one table: add it to the publication (a partition is published through its root) and give it, and each
-- of its partitions, REPLICA IDENTITY FULL.
CREATE OR REPLACE FUNCTION bemi.track_table(pub name, rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tbl record;
    part regclass;
BEGIN
    SELECT c.relkind, c.relpersistence, c.relispartition, c.relname, n.nspname INTO tbl
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
    IF tbl.nspname = 'bemi' THEN
        RAISE EXCEPTION 'bemi-asgi never tracks its own schema "bemi" (asked to track %)', rel
            USING HINT = 'Track application tables only.';
    END IF;
    IF tbl.relkind NOT IN ('r', 'p') OR tbl.relpersistence <> 'p' THEN
        RAISE EXCEPTION '% cannot be tracked: only ordinary, logged tables can be published', rel
            USING HINT = 'Remove it from the tracked tables (views, foreign, temporary and unlogged tables have no change stream).';
    END IF;
    IF NOT tbl.relispartition AND NOT EXISTS (
        SELECT FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
        WHERE p.pubname = pub AND pr.prrelid = rel
    ) THEN
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I.%I', pub, tbl.nspname, tbl.relname);
    END IF;
    -- Each partition checks its own replica identity on UPDATE and DELETE.
    FOR part IN SELECT rel UNION SELECT relid FROM pg_partition_tree(rel) LOOP
        PERFORM bemi.set_replica_identity_full(part);
    END LOOP;
END $$;

-- Create the publication unless it exists, and remember it with its tracked schemas.
CREATE OR REPLACE FUNCTION bemi.create_publication(pub name, tracked_schemas name[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    all_tables boolean;
    via_root boolean;
BEGIN
    SELECT puballtables, pubviaroot INTO all_tables, via_root FROM pg_publication WHERE pubname = pub;
    IF all_tables IS NULL THEN
        -- Changes to partitions arrive under the partitioned table's name, the table the application queries.
        EXECUTE format('CREATE PUBLICATION %I WITH (publish_via_partition_root = true)', pub);
    ELSIF all_tables THEN
        RAISE EXCEPTION 'publication "%" is FOR ALL TABLES, which includes bemi''s own tables', pub
            USING HINT = 'Choose another publication name (--publication) or drop this publication.';
    ELSIF NOT via_root THEN
        -- A publication created before (or by hand) gets the same setting.
        EXECUTE format('ALTER PUBLICATION %I SET (publish_via_partition_root = true)', pub);
    END IF;
    INSERT INTO bemi.source_publications (publication, schemas) VALUES (pub, '{}')
    ON CONFLICT (publication) DO NOTHING;
    -- Running the migration again with more schemas adds them; it never stops tracking one.
    UPDATE bemi.source_publications
    SET schemas = schemas || ARRAY(SELECT s FROM unnest(tracked_schemas) AS s WHERE s <> ALL (schemas))
    WHERE publication = pub AND NOT tracked_schemas <@ schemas;
END $$;

-- Track every table of one schema.
CREATE OR REPLACE FUNCTION bemi.track_schema(pub name, schema_name name) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass;
BEGIN
    IF schema_name = 'bemi' THEN
        RAISE EXCEPTION 'bemi-asgi never tracks its own schema "bemi"' USING HINT = 'Track application schemas only.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = schema_name) THEN
        RAISE EXCEPTION 'schema "%" does not exist', schema_name
            USING HINT = 'Create it first, or check the spelling: names are case-sensitive.';
    END IF;
    FOR rel IN
        SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = schema_name AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND NOT c.relispartition
          AND bemi.table_key(n.nspname, c.relname) <> ALL (
              SELECT unnest(excluded_tables) FROM bemi.source_publications WHERE publication = pub)
        ORDER BY c.relname
    LOOP
        PERFORM bemi.track_table(pub, rel);
    END LOOP;
END $$;

-- Event trigger: a table created in (or moved into) a tracked schema joins the publications tracking that schema.
-- It runs as its owner (the superuser who ran the migration), so any role's CREATE TABLE can add to the
-- publication, and it never makes that CREATE TABLE fail: a table it cannot track gets a WARNING instead.
CREATE OR REPLACE FUNCTION bemi.track_new_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    pub name;
BEGIN
    FOR cmd IN
        SELECT DISTINCT c.oid AS relid, c.relispartition, n.nspname, c.relname, e.command_tag
        FROM pg_event_trigger_ddl_commands() e
        JOIN pg_class c ON c.oid = e.objid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE e.classid = 'pg_class'::regclass AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
          AND n.nspname <> 'bemi'
    LOOP
        FOR pub IN
            SELECT sp.publication FROM bemi.source_publications sp JOIN pg_publication p ON p.pubname = sp.publication
            WHERE cmd.nspname = ANY (sp.schemas) AND bemi.table_key(cmd.nspname, cmd.relname) <> ALL (sp.excluded_tables)
        LOOP
            -- ALTER TABLE only matters when it moved a table into the schema (SET SCHEMA): leave the replica
            -- identity of tables already tracked as their owner set it.
            CONTINUE WHEN cmd.command_tag = 'ALTER TABLE' AND (cmd.relispartition OR EXISTS (
                SELECT FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                WHERE p.pubname = pub AND pr.prrelid = cmd.relid));
            BEGIN
                -- Exact argument types: an overload of another role cannot be a better match.
                PERFORM bemi.track_table(pub, cmd.relid::regclass);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'bemi-asgi could not track table %: %', cmd.relid::regclass, SQLERRM
                    USING HINT = 'Run bemi-asgi sql-migration again as a superuser to track it.';
            END;
        END LOOP;
    END LOOP;
END $$;

-- Stop tracking one table: drop it from the publication, and give it back the replica identity it had before
-- unless another publication still publishes it (or its partitioned root).
CREATE OR REPLACE FUNCTION bemi.untrack_table(pub name, rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    saved record;
BEGIN
    IF EXISTS (SELECT FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
               WHERE p.pubname = pub AND pr.prrelid = rel) THEN
        EXECUTE format('ALTER PUBLICATION %I DROP TABLE %s', pub, rel);
    END IF;
    FOR saved IN
        SELECT s.relid, s.identity, i.relname AS index_name, n.nspname, c.relname
        FROM bemi.source_replica_identities s
        JOIN pg_class c ON c.oid = s.relid AND c.relreplident = 'f'
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_class i ON i.oid = s.index_relid
        WHERE s.relid IN (SELECT rel UNION SELECT relid FROM pg_partition_tree(rel))
          AND NOT EXISTS (
            SELECT FROM pg_publication_tables pt
            JOIN pg_namespace pn ON pn.nspname = pt.schemaname
            JOIN pg_class pc ON pc.relnamespace = pn.oid AND pc.relname = pt.tablename
            WHERE pc.oid = s.relid OR pc.oid IN (SELECT relid FROM pg_partition_ancestors(s.relid)))
    LOOP
        EXECUTE format('ALTER TABLE %I.%I REPLICA IDENTITY %s', saved.nspname, saved.relname,
                       CASE saved.identity
                           WHEN 'n' THEN 'NOTHING'
                           WHEN 'i' THEN format('USING INDEX %I', saved.index_name)
                           ELSE 'DEFAULT'
                       END);
        DELETE FROM bemi.source_replica_identities WHERE relid = saved.relid;
    END LOOP;
    -- An untracked table's schema changes are no longer recorded.
    IF to_regclass('bemi.source_table_definitions') IS NOT NULL THEN
        DELETE FROM bemi.source_table_definitions d WHERE d.relid = rel;
    END IF;
END $$;

-- Remember the exclusions of this run (--exclude-table, --exclude-schema) and forget those --table / --schema
-- take back, then stop tracking what is excluded. Tracking (track_schema, the event trigger) skips excluded tables.
CREATE OR REPLACE FUNCTION bemi.exclude(pub name, tables text[], schemas name[], included_tables text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass;
    old_excluded text[];
    old_schemas name[];
    new_excluded text[];
    new_schemas name[];
BEGIN
    SELECT sp.excluded_tables, sp.schemas INTO old_excluded, old_schemas
    FROM bemi.source_publications sp WHERE sp.publication = pub;
    new_excluded := ARRAY(SELECT DISTINCT t FROM unnest(old_excluded || tables) AS t
                          WHERE t <> ALL (included_tables) ORDER BY t);
    new_schemas := ARRAY(SELECT s FROM unnest(old_schemas) AS s WHERE s <> ALL (exclude.schemas));
    -- Only when something changes: a second run of the same migration must leave every row as it was.
    IF new_excluded IS DISTINCT FROM old_excluded OR new_schemas IS DISTINCT FROM old_schemas THEN
        UPDATE bemi.source_publications sp SET excluded_tables = new_excluded, schemas = new_schemas
        WHERE sp.publication = pub;
    END IF;
    FOR rel IN
        SELECT c.oid FROM bemi.source_publications sp, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE sp.publication = pub AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND (bemi.table_key(n.nspname, c.relname) = ANY (sp.excluded_tables)
               OR (n.nspname = ANY (exclude.schemas) AND bemi.table_key(n.nspname, c.relname) <> ALL (included_tables)))
    LOOP
        PERFORM bemi.untrack_table(pub, rel);
    END LOOP;
END $$;

-- Schema changes: the definition of each tracked table (columns, indexes, constraints) as the last recorded schema
-- change or the migration saw it, keyed by the table's oid. A recorded change says what the table looked like
-- before (this) and after (the catalog now), and replaces it, all in the transaction of the DDL.
CREATE TABLE IF NOT EXISTS bemi.source_table_definitions (
    relid       oid PRIMARY KEY,
    definition  jsonb NOT NULL
);

-- A table's definition as the history stores it: its name, its columns (type, NOT NULL, default, and the column
-- number, which tells a RENAME from a DROP and an ADD), its indexes and its constraints.
CREATE OR REPLACE FUNCTION bemi.table_definition(rel oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_build_object(
        'schema', n.nspname,
        'table', c.relname,
        'columns', COALESCE((
            SELECT jsonb_object_agg(a.attname, jsonb_strip_nulls(jsonb_build_object(
                'type', format_type(a.atttypid, a.atttypmod), 'not_null', a.attnotnull, 'number', a.attnum,
                'default', pg_get_expr(d.adbin, d.adrelid))))
            FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}'),
        'indexes', COALESCE((
            SELECT jsonb_object_agg(i.relname, pg_get_indexdef(x.indexrelid))
            FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = c.oid), '{}'),
        'constraints', COALESCE((
            SELECT jsonb_object_agg(k.conname, pg_get_constraintdef(k.oid))
            FROM pg_constraint k WHERE k.conrelid = c.oid), '{}'))
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = rel
$$;

-- Whether schema changes of a table are recorded: a table (not a partition: its rows arrive under its root) that
-- a managed publication publishes, or that one will on its creation (its schema is tracked and it is not excluded).
CREATE OR REPLACE FUNCTION bemi.records_schema_of(rel oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (
        SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, bemi.source_publications sp
        WHERE c.oid = rel AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND NOT c.relispartition
          AND n.nspname <> 'bemi'
          AND (EXISTS (SELECT FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                       WHERE p.pubname = sp.publication AND pr.prrelid = rel)
               OR (n.nspname = ANY (sp.schemas)
                   AND bemi.table_key(n.nspname, c.relname) <> ALL (sp.excluded_tables))))
$$;

-- Record one table's schema change when its definition differs from the remembered one: a transactional logical
-- message (prefix {{schema_change_prefix}}) the worker stores as a change with operation DDL, in order with the
-- row changes and with the transaction's context. `definition` is NULL when the table was dropped.
CREATE OR REPLACE FUNCTION bemi.record_schema_change(rel oid, definition jsonb, command_tag text, object_type text,
                                                     object_identity text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    previous jsonb;
    named jsonb;
BEGIN
    SELECT d.definition INTO previous FROM bemi.source_table_definitions d WHERE d.relid = rel;
    IF previous IS NOT DISTINCT FROM definition THEN
        RETURN;
    END IF;
    named := COALESCE(definition, previous);
    PERFORM pg_logical_emit_message(true, {{schema_change_prefix}}, jsonb_build_object(
        'schema', named->'schema', 'table', named->'table',
        'before', COALESCE(previous, '{}'),
        'after', COALESCE(definition, '{}') || jsonb_build_object(
            'command_tag', command_tag, 'object_type', object_type, 'object_identity', object_identity))::text);
    IF definition IS NULL THEN
        DELETE FROM bemi.source_table_definitions d WHERE d.relid = rel;
    ELSE
        INSERT INTO bemi.source_table_definitions AS d (relid, definition) VALUES (rel, definition)
        ON CONFLICT (relid) DO UPDATE SET definition = excluded.definition;
    END IF;
END $$;

-- Event trigger (ddl_command_end): CREATE/ALTER of a tracked table, its columns, indexes and constraints.
-- It runs before bemi_track_new_tables (event triggers fire in name order), so a table's CREATE is recorded before
-- the ALTER TABLE ... REPLICA IDENTITY FULL that tracking it runs. It never makes the DDL fail: a change it cannot
-- record gets a WARNING.
CREATE OR REPLACE FUNCTION bemi.record_schema_changes() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
BEGIN
    FOR cmd IN
        -- One record per table and statement, named by the statement's first command on it.
        SELECT DISTINCT ON (t.relid) t.relid, e.command_tag, e.object_type, e.object_identity
        FROM pg_event_trigger_ddl_commands() WITH ORDINALITY AS e
        CROSS JOIN LATERAL (SELECT CASE e.classid
            WHEN 'pg_class'::regclass THEN (
                SELECT CASE WHEN c.relkind IN ('i', 'I') THEN (SELECT x.indrelid FROM pg_index x WHERE x.indexrelid = c.oid)
                            ELSE c.oid END
                FROM pg_class c WHERE c.oid = e.objid)
            WHEN 'pg_constraint'::regclass THEN (SELECT NULLIF(k.conrelid, 0) FROM pg_constraint k WHERE k.oid = e.objid)
        END AS relid) AS t
        WHERE t.relid IS NOT NULL AND NOT e.in_extension
        ORDER BY t.relid, e.ordinality
    LOOP
        BEGIN
            CONTINUE WHEN NOT (bemi.records_schema_of(cmd.relid)
                               OR EXISTS (SELECT FROM bemi.source_table_definitions d WHERE d.relid = cmd.relid));
            PERFORM bemi.record_schema_change(cmd.relid, bemi.table_definition(cmd.relid), cmd.command_tag,
                                              cmd.object_type, cmd.object_identity);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'bemi-asgi could not record the schema change of %: %', cmd.object_identity, SQLERRM;
        END;
    END LOOP;
END $$;

-- Event trigger (sql_drop): a dropped tracked table, and a dropped index of one (whose table the catalog no longer
-- names: the remembered definitions do, index names being unique in a schema).
CREATE OR REPLACE FUNCTION bemi.record_dropped_objects() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    obj record;
    rel oid;
BEGIN
    FOR obj IN
        SELECT o.objid, o.object_type, o.object_identity, o.schema_name, o.object_name
        FROM pg_event_trigger_dropped_objects() o
        WHERE o.object_type IN ('table', 'index')
    LOOP
        BEGIN
            IF obj.object_type = 'table' THEN
                CONTINUE WHEN NOT EXISTS (SELECT FROM bemi.source_table_definitions d WHERE d.relid = obj.objid);
                PERFORM bemi.record_schema_change(obj.objid, NULL, tg_tag, obj.object_type, obj.object_identity);
            ELSE
                FOR rel IN
                    SELECT d.relid FROM bemi.source_table_definitions d
                    WHERE d.definition->>'schema' = obj.schema_name AND d.definition->'indexes' ? obj.object_name
                      AND EXISTS (SELECT FROM pg_class c WHERE c.oid = d.relid)
                LOOP
                    PERFORM bemi.record_schema_change(rel, bemi.table_definition(rel), tg_tag, obj.object_type,
                                                      obj.object_identity);
                END LOOP;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'bemi-asgi could not record the drop of %: %', obj.object_identity, SQLERRM;
        END;
    END LOOP;
END $$;

-- Remember the definition of every table the publication tracks that has none yet (tables tracked before the
-- schema changes were recorded, or while the event triggers were missing), so their next change has its before.
CREATE OR REPLACE FUNCTION bemi.remember_table_definitions(pub name) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO bemi.source_table_definitions (relid, definition)
    SELECT pr.prrelid, bemi.table_definition(pr.prrelid)
    FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
    WHERE p.pubname = pub
    ON CONFLICT (relid) DO NOTHING
$$;

-- Creating an event trigger needs a superuser, which managed services often do not grant: then say how to track
-- new tables instead of failing the whole migration.
DO $$
BEGIN
    {{guard}}
    IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'bemi_track_new_tables') THEN
        CREATE EVENT TRIGGER bemi_track_new_tables ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
            EXECUTE FUNCTION bemi.track_new_tables();
    END IF;
    IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'bemi_record_schema_changes') THEN
        CREATE EVENT TRIGGER bemi_record_schema_changes ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE', 'CREATE INDEX',
                         'ALTER INDEX')
            EXECUTE FUNCTION bemi.record_schema_changes();
    END IF;
    IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'bemi_record_dropped_objects') THEN
        CREATE EVENT TRIGGER bemi_record_dropped_objects ON sql_drop
            EXECUTE FUNCTION bemi.record_dropped_objects();
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'bemi-asgi: this role may not create event triggers (that needs a superuser), so tables created from now on are not tracked automatically and schema changes are not recorded'
        USING HINT = 'Run bemi-asgi sql-migration again after creating tables; bemi-asgi doctor lists untracked ones.';
END $$;

-- The tracked tables. (Values spliced in here never contain a dollar sign: they cannot end the $$ body.)
-- Every argument has its function's exact type, so no overload can be a better match.
DO $$
BEGIN
    {{guard}}
    PERFORM bemi.create_publication({{publication}}::name, {{schemas}});
    PERFORM bemi.exclude({{publication}}::name, {{excluded_tables}}, {{excluded_schemas}}, {{tables}});
    PERFORM bemi.track_schema({{publication}}::name, s) FROM unnest({{schemas}}) AS s;
    PERFORM bemi.track_table({{publication}}::name, t::regclass) FROM unnest({{tables}}) AS t;
    PERFORM bemi.remember_table_definitions({{publication}}::name);
END $$;
