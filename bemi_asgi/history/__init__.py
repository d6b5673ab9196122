"""History: reading the `changes` table. The `Bemi` client, its filters, models, replay, revert and waiting for the
worker to catch up."""
