-- bemi-asgi destination: the `bemi.changes` table the worker fills and the query helpers read.
-- Idempotent: safe to run again. The `bemi` schema is never part of a tracked publication.
CREATE SCHEMA IF NOT EXISTS bemi;

-- One row per changed row (one per table for TRUNCATE). Column names follow Bemi's so queries carry over.
CREATE TABLE IF NOT EXISTS bemi.changes (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
    CONSTRAINT changes_commit_lsn_ordinal_key UNIQUE (commit_lsn, ordinal)
);

-- A row's history and time travel: the row's changes in commit order.
CREATE INDEX IF NOT EXISTS changes_row_idx ON bemi.changes ("schema", "table", primary_key, committed_at);
-- Context containment filters (context @> '{"user_id": 42}').
CREATE INDEX IF NOT EXISTS changes_context_idx ON bemi.changes USING gin (context jsonb_path_ops);
-- Timelines and retention.
CREATE INDEX IF NOT EXISTS changes_committed_at_idx ON bemi.changes (committed_at);

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
