-- bemi-asgi destination upgrade, step 1: source streams. Runs after destination_up.sql and
-- destination_backfill_up.sql (which create the current tables); later steps follow it as destination_upgrade_2_...
-- Idempotent, and a no-op on a destination created with streams.
--
-- A destination written before streams were recorded keyed its changes by (commit_lsn, ordinal) and its progress
-- by slot name, for its one source. This keeps every row: each recorded progress becomes a stream carried over
-- (no system identifier yet: the first worker that streams that slot name from that database claims it), and the
-- stored changes and backfill progress join the stream whose progress moved last. The stream column is added with
-- a constant default (no table rewrite); only the new primary key is built over the stored changes.
DO $$
DECLARE
    carried integer;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);  -- PostgreSQL's own functions only
    IF EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'bemi.worker_state'::regclass AND attname = 'slot_name'
                                          AND NOT attisdropped) THEN
        INSERT INTO bemi.streams (database, slot_name)
            SELECT (SELECT database FROM bemi.changes LIMIT 1), slot_name FROM bemi.worker_state ORDER BY updated_at;
        ALTER TABLE bemi.worker_state ADD COLUMN stream integer REFERENCES bemi.streams (id);
        UPDATE bemi.worker_state w SET stream = s.id
          FROM bemi.streams s WHERE s.system_identifier IS NULL AND s.slot_name = w.slot_name;
        ALTER TABLE bemi.worker_state DROP CONSTRAINT worker_state_pkey;
        ALTER TABLE bemi.worker_state DROP COLUMN slot_name;
        ALTER TABLE bemi.worker_state ADD CONSTRAINT worker_state_pkey PRIMARY KEY (stream);
    END IF;

    IF EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'bemi.changes'::regclass AND attname = 'stream'
                                          AND NOT attisdropped) THEN
        RETURN;
    END IF;
    SELECT w.stream INTO carried FROM bemi.worker_state w ORDER BY w.updated_at DESC LIMIT 1;
    IF carried IS NULL AND (EXISTS (SELECT FROM bemi.changes) OR EXISTS (SELECT FROM bemi.backfill_state)) THEN
        -- Stored changes without any progress (baselines only): the default slot's stream.
        INSERT INTO bemi.streams (database, slot_name)
            VALUES ((SELECT database FROM bemi.changes LIMIT 1), 'bemi') RETURNING id INTO carried;
    END IF;
    EXECUTE format('ALTER TABLE bemi.changes ADD COLUMN stream integer NOT NULL DEFAULT %s', coalesce(carried, 0));
    ALTER TABLE bemi.changes ALTER COLUMN stream DROP DEFAULT;
    -- The exactly-once key gains the stream and becomes the primary key: 0.1's primary key was the id (the
    -- partitioned layout's (id, committed_at)) beside a unique (commit_lsn, ordinal), one index more on every row.
    ALTER TABLE bemi.changes DROP CONSTRAINT changes_pkey;
    ALTER TABLE bemi.changes DROP CONSTRAINT changes_commit_lsn_ordinal_key;
    IF (SELECT relkind FROM pg_class WHERE oid = 'bemi.changes'::regclass) = 'p' THEN
        ALTER TABLE bemi.changes ADD CONSTRAINT changes_pkey PRIMARY KEY (commit_lsn, ordinal, stream, committed_at);
    ELSE
        ALTER TABLE bemi.changes ADD CONSTRAINT changes_pkey PRIMARY KEY (commit_lsn, ordinal, stream);
    END IF;

    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'bemi.backfill_state'::regclass AND attname = 'stream'
                                              AND NOT attisdropped) THEN
        EXECUTE format('ALTER TABLE bemi.backfill_state ADD COLUMN stream integer NOT NULL DEFAULT %s',
                       coalesce(carried, 0));
        ALTER TABLE bemi.backfill_state ALTER COLUMN stream DROP DEFAULT;
        ALTER TABLE bemi.backfill_state ADD FOREIGN KEY (stream) REFERENCES bemi.streams (id);
        ALTER TABLE bemi.backfill_state DROP CONSTRAINT backfill_state_pkey;
        ALTER TABLE bemi.backfill_state ADD CONSTRAINT backfill_state_pkey PRIMARY KEY (stream, "schema", "table");
    END IF;
END $$;
