"""The worker: from the WAL to the `changes` table, read top-down along the data's path.

`pipeline.Worker` runs sessions; in each, `reader.Reader` turns the replication stream's frames (`stream`, decoded
by `pgoutput`) into committed transactions, each row change made into its stored form once by
`relations.Relations` (the generated fast path of `fastpath`, or the general path, both from the type rules of
`values`; the tracking configuration's `rules`), held per transaction by `spill` with the contexts `stitching`
assigns; `writer.Writer` stores them through `destination`; `progress.Progress` tracks what the source may forget.
Every stage reads the same frozen `options.Options`.
"""
