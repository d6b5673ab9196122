"""History: reading the `changes` table. The `Bemi` client, the store every helper reads through, the filters,
models, replay, revert and waiting for the worker to catch up."""
