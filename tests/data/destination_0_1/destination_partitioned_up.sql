-- bemi-asgi destination, partitioned by month (`bemi-asgi sql-migration --partition-by-month`): the same
-- `bemi.changes` columns and indexes as destination_up.sql, as monthly partitions of committed_at (UTC months),
-- so retention drops whole months (`bemi-asgi prune`) instead of deleting rows one by one.
-- Idempotent: safe to run again. It does not convert an existing unpartitioned bemi.changes.
CREATE SCHEMA IF NOT EXISTS bemi;

DO $$
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);  -- PostgreSQL's own functions only
    IF EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'bemi' AND c.relname = 'changes' AND c.relkind <> 'p') THEN
        RAISE EXCEPTION 'bemi.changes already exists and is not partitioned'
            USING HINT = 'Run the migration without --partition-by-month, or move the history over: '
                         'ALTER TABLE bemi.changes RENAME TO changes_old, run this migration, then INSERT INTO '
                         'bemi.changes (columns but id) SELECT ... FROM bemi.changes_old.';
    END IF;
END $$;

-- One row per changed row (one per table for TRUNCATE). Column names follow Bemi's so queries carry over.
CREATE TABLE IF NOT EXISTS bemi.changes (
    id              bigint GENERATED ALWAYS AS IDENTITY,
    -- The row's primary key: its text for a single-column key; for a composite key a JSON array of the key
    -- columns' text values in key order, e.g. ["42","EU"]; NULL for a table without a primary key and TRUNCATE.
    primary_key     text,
    "before"        jsonb NOT NULL DEFAULT '{}',
    "after"         jsonb NOT NULL DEFAULT '{}',
    context         jsonb NOT NULL DEFAULT '{}',
    database        text NOT NULL,
    "schema"        text NOT NULL,
    "table"         text NOT NULL,
    operation       text NOT NULL CHECK (operation IN ('CREATE', 'UPDATE', 'DELETE', 'TRUNCATE')),
    committed_at    timestamptz NOT NULL,
    -- When the worker received the transaction's commit from the source.
    queued_at       timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    transaction_id  bigint NOT NULL,
    -- WAL position (LSN as a number) of the change itself.
    position        bigint NOT NULL,
    -- Exactly-once key: the transaction's commit LSN and the change's ordinal within the transaction.
    commit_lsn      bigint NOT NULL,
    ordinal         integer NOT NULL,
    -- A partitioned table's unique constraints must contain the partition key. committed_at is the commit's own
    -- time, the same for every change of a commit LSN, so these are exactly as unique as (id) and
    -- (commit_lsn, ordinal). (The worker does not rely on them: it skips what bemi.worker_state says is stored.)
    CONSTRAINT changes_pkey PRIMARY KEY (id, committed_at),
    CONSTRAINT changes_commit_lsn_ordinal_key UNIQUE (commit_lsn, ordinal, committed_at)
) PARTITION BY RANGE (committed_at);

-- Changes of months without a partition (the worker never fails for want of one); `bemi-asgi prune` and
-- `bemi-asgi maintain` move them into their month's partition when they create it.
CREATE TABLE IF NOT EXISTS bemi.changes_default PARTITION OF bemi.changes DEFAULT;

-- Create the partitions of the current month and `months_ahead` months after it (UTC) that do not exist yet, named
-- bemi.changes_YYYY_MM; returns their names. Rows of such a month already in the default partition move into it.
CREATE OR REPLACE FUNCTION bemi.create_changes_partitions(months_ahead integer DEFAULT 3) RETURNS SETOF text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    this_month timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
    month_start timestamptz;
    month_end timestamptz;
    partition_name text;
BEGIN
    FOR i IN 0 .. months_ahead LOOP
        month_start := (this_month + make_interval(months => i)) AT TIME ZONE 'UTC';
        month_end := (this_month + make_interval(months => i + 1)) AT TIME ZONE 'UTC';
        partition_name := 'changes_' || to_char(this_month + make_interval(months => i), 'YYYY_MM');
        CONTINUE WHEN to_regclass(format('bemi.%I', partition_name)) IS NOT NULL;
        IF EXISTS (SELECT FROM bemi.changes_default WHERE committed_at >= month_start AND committed_at < month_end) THEN
            EXECUTE format('CREATE TABLE bemi.%I (LIKE bemi.changes INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', partition_name);
            EXECUTE format('WITH moved AS (DELETE FROM bemi.changes_default WHERE committed_at >= $1 AND committed_at < $2'
                           ' RETURNING *) INSERT INTO bemi.%I SELECT * FROM moved', partition_name)
                USING month_start, month_end;
            EXECUTE format('ALTER TABLE bemi.changes ATTACH PARTITION bemi.%I FOR VALUES FROM (%L) TO (%L)',
                           partition_name, month_start, month_end);
        ELSE
            EXECUTE format('CREATE TABLE bemi.%I PARTITION OF bemi.changes FOR VALUES FROM (%L) TO (%L)',
                           partition_name, month_start, month_end);
        END IF;
        RETURN NEXT partition_name;
    END LOOP;
END $$;

SELECT count(*) AS partitions_created FROM bemi.create_changes_partitions(3);

-- The indexes (created on the partitioned table, so on every partition) and bemi.worker_state come from
-- destination_up.sql, which the migration runs right after this script: its CREATE TABLE IF NOT EXISTS
-- bemi.changes is then a no-op, and both layouts get the same indexes from one definition.
