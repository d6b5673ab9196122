-- bemi-asgi backfill rollback: the backfill's progress (the baselines go with bemi.changes). Idempotent.
DROP TABLE IF EXISTS bemi.backfill_state;
