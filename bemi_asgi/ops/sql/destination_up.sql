-- bemi-asgi destination: the `bemi.changes` table the worker fills and the query helpers read.
-- Idempotent: safe to run again. The `bemi` schema is never part of a tracked publication.
CREATE SCHEMA IF NOT EXISTS bemi;

-- One row per changed row (one per table for TRUNCATE). Column names follow Bemi's so queries carry over.
-- Every index below is paid on each stored row (the worker's COPY), so each one is there for a query that needs it;
-- the README's "The changes table" section gives each index's query and cost.
CREATE TABLE IF NOT EXISTS bemi.changes (
    -- A number for people and Bemi's queries; nothing looks a change up by it, so it has no index.
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
    -- The exactly-once key is the primary key, and the commit order: the timeline, every cursor, one change's
    -- look-up (revert) and prune's batches read it. Always appended at its right end, so it is cheap to fill.
    CONSTRAINT changes_pkey PRIMARY KEY (commit_lsn, ordinal)
);

-- Upgrade of a destination created before the exactly-once key became the primary key (0.1): its primary key was
-- the id (the partitioned layout's (id, committed_at)) beside a unique (commit_lsn, ordinal), one index more on
-- every row. Every row is kept; the new primary key is built once, under a lock that pauses the worker meanwhile.
DO $$
DECLARE
    partitioned boolean;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);  -- PostgreSQL's own functions only
    IF EXISTS (SELECT FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
                WHERE c.conrelid = 'bemi.changes'::regclass AND c.conname = 'changes_pkey' AND a.attname = 'id') THEN
        SELECT c.relkind = 'p' INTO partitioned FROM pg_class c WHERE c.oid = 'bemi.changes'::regclass;
        ALTER TABLE bemi.changes DROP CONSTRAINT changes_pkey;
        ALTER TABLE bemi.changes DROP CONSTRAINT IF EXISTS changes_commit_lsn_ordinal_key;
        IF partitioned THEN
            ALTER TABLE bemi.changes ADD CONSTRAINT changes_pkey PRIMARY KEY (commit_lsn, ordinal, committed_at);
        ELSE
            ALTER TABLE bemi.changes ADD CONSTRAINT changes_pkey PRIMARY KEY (commit_lsn, ordinal);
        END IF;
    END IF;
    -- 0.1's B-tree on committed_at becomes the BRIN below (same name).
    IF EXISTS (SELECT FROM pg_class i JOIN pg_am am ON am.oid = i.relam
                WHERE i.oid = to_regclass('bemi.changes_committed_at_idx') AND am.amname = 'btree') THEN
        DROP INDEX bemi.changes_committed_at_idx;
    END IF;
END $$;

-- A row's history and time travel: the row's changes (a few, sorted in memory), by time for as_of(at=time).
CREATE INDEX IF NOT EXISTS changes_row_idx ON bemi.changes ("schema", "table", primary_key, committed_at);
-- Context containment filters (context @> '{"user_id": 42}'); jsonb_path_ops: one hashed entry per path and value,
-- smaller and cheaper to fill than the default operator class, and containment is the only operator queried.
CREATE INDEX IF NOT EXISTS changes_context_idx ON bemi.changes USING gin (context jsonb_path_ops);
-- since/until filters and retention. Commit times grow with the table, so a BRIN (a few bytes per 128 pages,
-- next to nothing per row) finds a time range; nothing reads commit times in index order.
CREATE INDEX IF NOT EXISTS changes_committed_at_idx ON bemi.changes USING brin (committed_at)
    WITH (autosummarize = on);

-- The worker's progress, one row per replication slot: the last commit fully stored. Written in the same
-- transaction as the changes it covers, so a restart skips exactly what is already stored.
CREATE TABLE IF NOT EXISTS bemi.worker_state (
    slot_name        text PRIMARY KEY,
    last_commit_lsn  bigint NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Query helpers (find, history, as_of, table_as_of, revert).
-- A table's changes in commit order: find(table=...) pages and table_as_of.
CREATE INDEX IF NOT EXISTS changes_table_order_idx ON bemi.changes ("schema", "table", commit_lsn, ordinal);
-- The few TRUNCATEs of a table, which end every row's existence in time travel.
CREATE INDEX IF NOT EXISTS changes_truncate_idx ON bemi.changes ("schema", "table", commit_lsn, ordinal)
    WHERE operation = 'TRUNCATE';
-- find(transaction_id=...) and revert(transaction=...).
CREATE INDEX IF NOT EXISTS changes_transaction_idx ON bemi.changes (transaction_id);

-- The column rules of each worker run that had any (ignore, mask, hash), with the mask marker, as the worker
-- records them before it stores anything. Revert reads them to refuse writing a masked, hashed or ignored value
-- back into live data (the stored change holds only the marker or the hash, or nothing).
CREATE TABLE IF NOT EXISTS bemi.tracking_rules (
    database     text NOT NULL,
    rules        jsonb NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
