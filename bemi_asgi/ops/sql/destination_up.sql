-- bemi-asgi destination: the `bemi.changes` table the worker fills and the query helpers read.
-- Idempotent: safe to run again. The `bemi` schema is never part of a tracked publication.
CREATE SCHEMA IF NOT EXISTS bemi;

-- The source streams whose changes this destination holds: one per replication slot of one database of one
-- PostgreSQL cluster. Each stored change names its stream by this small number (cheaper per row than the names).
-- system_identifier is the source cluster's (pg_control_system()); it is NULL only for a stream carried over from
-- a destination written before streams were recorded, until its worker starts and fills it in.
CREATE TABLE IF NOT EXISTS bemi.streams (
    id                 integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    system_identifier  bigint,
    database           text,
    slot_name          text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT streams_source_key UNIQUE (system_identifier, database, slot_name)
);

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
    -- DDL: a schema change of the table (before/after: its definition), recorded by the source's event triggers.
    operation       text NOT NULL CHECK (operation IN ('CREATE', 'UPDATE', 'DELETE', 'TRUNCATE', 'DDL')),
    committed_at    timestamptz NOT NULL,
    -- When the worker received the transaction's commit from the source.
    queued_at       timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    transaction_id  bigint NOT NULL,
    -- WAL position (LSN as a number) of the change itself.
    position        bigint NOT NULL,
    -- Exactly-once key: the transaction's commit LSN on its source stream, the change's ordinal within the
    -- transaction, and the stream (bemi.streams). (No foreign key to bemi.streams: its check per row would slow
    -- the worker's COPY, and the worker registers its stream first.)
    commit_lsn      bigint NOT NULL,
    ordinal         integer NOT NULL,
    stream          integer NOT NULL,
    -- The primary key, in commit order first: the timeline, every cursor, one change's look-up (revert) and
    -- prune's batches read it, and rows arrive near its right end, so it is cheap to fill. The stream comes last:
    -- it only tells apart the changes of two sources at the same position.
    CONSTRAINT changes_pkey PRIMARY KEY (commit_lsn, ordinal, stream)
);

-- Tables created before schema changes were recorded: allow operation DDL. Widened NOT VALID: every stored row
-- satisfies the narrower check, so nothing is scanned under the exclusive lock.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_constraint
                WHERE conrelid = 'bemi.changes'::regclass AND conname = 'changes_operation_check'
                  AND pg_get_constraintdef(oid) NOT LIKE '%''DDL''%') THEN
        ALTER TABLE bemi.changes DROP CONSTRAINT changes_operation_check;
        ALTER TABLE bemi.changes ADD CONSTRAINT changes_operation_check
            CHECK (operation IN ('CREATE', 'UPDATE', 'DELETE', 'TRUNCATE', 'DDL', 'SNAPSHOT')) NOT VALID;
    END IF;
END $$;

-- Upgrade of a destination created before commit times had a BRIN (0.1): its B-tree on committed_at becomes the
-- BRIN below (same name). (The primary key's upgrade needs the stream column: destination_upgrade_1_streams.sql.)
DO $$
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);  -- PostgreSQL's own functions only
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

-- The newest changes matching a context filter (find(context=...), the browser's scopes): the GIN index above finds
-- them in no order, so find reads windows of the newest commit positions first (bemi_asgi/history/store.py), and
-- this BRIN turns a window into the few page ranges that hold it, which the executor intersects with the GIN's
-- matches. Commit positions grow with the table (the worker appends in commit order): next to nothing per row.
CREATE INDEX IF NOT EXISTS changes_commit_lsn_idx ON bemi.changes USING brin (commit_lsn)
    WITH (autosummarize = on);

-- The worker's progress, one row per source stream: the last commit fully stored. Written in the same
-- transaction as the changes it covers, so a restart skips exactly what is already stored.
CREATE TABLE IF NOT EXISTS bemi.worker_state (
    stream           integer PRIMARY KEY REFERENCES bemi.streams (id),
    last_commit_lsn  bigint NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Query helpers (find, history, as_of, table_as_of, revert).
-- A table's changes in commit order: find(table=...) pages and table_as_of.
CREATE INDEX IF NOT EXISTS changes_table_order_idx ON bemi.changes ("schema", "table", commit_lsn, ordinal);
-- The few table-wide events of a table, which every row's history and time travel read: TRUNCATEs (they end every
-- row's existence) and schema changes (they rename, drop and add columns). 0.1's index held the TRUNCATEs only.
DROP INDEX IF EXISTS bemi.changes_truncate_idx;
CREATE INDEX IF NOT EXISTS changes_table_events_idx ON bemi.changes ("schema", "table", commit_lsn, ordinal)
    WHERE operation IN ('TRUNCATE', 'DDL');
-- find(transaction_id=...) and revert(transaction=...).
CREATE INDEX IF NOT EXISTS changes_transaction_idx ON bemi.changes (transaction_id);

-- Tamper evidence (bemi_asgi/worker/chain.py): a hash chain over the stored changes, one row (a link) per
-- destination transaction, written in that transaction: the keys of the changes it stored, in chain order, and each
-- change's chain hash (32 bytes each, HMAC-SHA256 when the worker has BEMI_CHAIN_KEY), after the hash `previous`.
-- `bemi-asgi verify` recomputes them from the stored changes. Two chains per source stream (bemi.streams): the
-- worker's changes in commit order, and the backfill's baselines in the order it stored them; the first
-- `removals` entries of a link are baselines it removed (replaced).
CREATE TABLE IF NOT EXISTS bemi.chain (
    stream       integer NOT NULL,  -- bemi.streams (id)
    kind         text NOT NULL CHECK (kind IN ('changes', 'baselines')),
    seq          bigint NOT NULL,
    previous     bytea NOT NULL,
    commit_lsns  bigint[] NOT NULL,
    ordinals     integer[] NOT NULL,
    removals     integer NOT NULL DEFAULT 0,
    hashes       bytea NOT NULL,
    -- What the link records of its HMAC key (empty without one): a wrong key is told from an edited change.
    key_id       bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- How its hashes were computed (bemi_asgi/worker/chain.py): 1 for links written before format 2.
    format       smallint NOT NULL DEFAULT 1,
    PRIMARY KEY (stream, kind, seq)
);
ALTER TABLE bemi.chain ADD COLUMN IF NOT EXISTS format smallint NOT NULL DEFAULT 1;

-- Where `bemi-asgi prune` cut a chain: the entries of link `seq` before `entry` (0-based) and the links before it
-- are gone with the changes they covered, and the chain goes on after `hash`. The latest anchor of a chain counts.
CREATE TABLE IF NOT EXISTS bemi.chain_anchors (
    stream     integer NOT NULL,
    kind       text NOT NULL,
    seq        bigint NOT NULL,
    entry      integer NOT NULL,
    hash       bytea NOT NULL,
    pruned_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, kind, seq, entry)
);

-- The column rules of each worker run that had any (ignore, mask, hash), with the mask marker, as the worker
-- records them before it stores anything. Revert reads them to refuse writing a masked, hashed or ignored value
-- back into live data (the stored change holds only the marker or the hash, or nothing).
CREATE TABLE IF NOT EXISTS bemi.tracking_rules (
    database     text NOT NULL,
    rules        jsonb NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
