-- bemi-asgi destination, for `bemi-asgi backfill`: baselines in bemi.changes and the backfill's progress.
-- Idempotent: safe to run again. Runs after destination_up.sql (and the partitioned layout).

-- A baseline is stored with operation SNAPSHOT. The constraint is widened NOT VALID: every stored row already
-- satisfies the narrower one, so nothing is scanned (a full scan under an exclusive lock would stop the worker).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint
                    WHERE conrelid = 'bemi.changes'::regclass AND conname = 'changes_operation_check'
                      AND pg_get_constraintdef(oid) LIKE '%''SNAPSHOT''%') THEN
        ALTER TABLE bemi.changes DROP CONSTRAINT IF EXISTS changes_operation_check;
        ALTER TABLE bemi.changes ADD CONSTRAINT changes_operation_check
            CHECK (operation IN ('CREATE', 'UPDATE', 'DELETE', 'TRUNCATE', 'SNAPSHOT')) NOT VALID;
    END IF;
END $$;

-- The backfill's progress, one row per table: the last primary key stored (a JSON array of the key columns'
-- texts; NULL when the key is hashed, so its clear text never lands here) and the WAL position of the snapshot
-- it was read in. Written in the same transaction as the baselines it covers, so a killed run resumes after
-- exactly what is stored.
CREATE TABLE IF NOT EXISTS bemi.backfill_state (
    "schema"      text NOT NULL,
    "table"       text NOT NULL,
    snapshot_lsn  bigint NOT NULL,
    last_key      jsonb,
    rows_stored   bigint NOT NULL DEFAULT 0,
    done          boolean NOT NULL DEFAULT false,
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ("schema", "table")
);
