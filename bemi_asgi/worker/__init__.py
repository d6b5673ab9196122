"""The worker: from the WAL to the `changes` table. The replication stream, the pgoutput decoder, values and the
fast path, stitching contexts onto changes, tracking rules, spilling large transactions, the destination, and the
pipeline that runs them."""
