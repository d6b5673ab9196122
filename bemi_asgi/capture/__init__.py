"""Capture: from an HTTP request or a job to the WAL. The context, the ASGI middleware, the trace a write runs in,
and the pool whose COMMITs carry the context as a `_bemi` logical message."""
