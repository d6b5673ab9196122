"""The changes of one transaction between its Begin and its Commit, in bounded memory.

pgoutput (protocol 1) sends a transaction whole, after it committed, and the context usually arrives last (the
pool emits it at COMMIT): a million-row transaction's rows must all be held until their context is known. The
buffer keeps them in memory up to `spill_threshold` changes, then moves them to an anonymous temporary file
(pickled chunks), keeping the segments the `_bemi` messages cut so the stitching rule can give each its context.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator
from typing import IO

from .stitching import segment_contexts

__all__ = ["PendingChange", "TransactionBuffer"]

#: A decoded change before its transaction commits:
#: (primary_key, before JSON, after JSON, schema, table, operation, position, ordinal).
PendingChange = tuple[str | None, str, str, str, str, str, int, int]

# A segment is a list of parts: a chunk of changes still in memory, or the offset of a chunk pickled to the file.
_Part = list[PendingChange] | int


class TransactionBuffer:
    """Append changes and `_bemi` contexts in WAL order; after Commit, read the segments with their contexts."""

    def __init__(self, spill_threshold: int) -> None:
        self.spill_threshold = spill_threshold
        self.count = 0
        self._segments: list[list[_Part]] = [[]]
        self._current: list[PendingChange] = []
        self._contexts: list[str] = []
        self._in_memory = 0
        self._file: IO[bytes] | None = None

    @property
    def spilled(self) -> bool:
        """Whether some changes live in the temporary file."""
        return self._file is not None

    def append(self, change: PendingChange) -> None:
        self._current.append(change)
        self.count += 1
        self._in_memory += 1
        if self._in_memory >= self.spill_threshold:
            self._spill()

    def add_context(self, context: str) -> None:
        """A `_bemi` message: it ends the current segment."""
        self._close_segment()
        self._segments.append([])
        self._contexts.append(context)

    def segments(self) -> Iterator[tuple[str, Iterator[list[PendingChange]]]]:
        """Each segment's context (by the stitching rule) and its changes, chunk by chunk, in WAL order."""
        self._close_segment()
        for context, parts in zip(segment_contexts(self._contexts), self._segments, strict=True):
            yield context, self._chunks(parts)

    def close(self) -> None:
        """Free the temporary file (the buffer is done or abandoned)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _close_segment(self) -> None:
        if self._current:
            self._segments[-1].append(self._current)
            self._current = []

    def _chunks(self, parts: list[_Part]) -> Iterator[list[PendingChange]]:
        for part in parts:
            if isinstance(part, int):
                assert self._file is not None
                self._file.seek(part)
                chunk: list[PendingChange] = pickle.load(self._file)
                yield chunk
            else:
                yield part

    def _spill(self) -> None:
        self._close_segment()
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="bemi-asgi-transaction-")  # noqa: SIM115 - closed by close()
        file = self._file
        file.seek(0, 2)
        for parts in self._segments:
            for index, part in enumerate(parts):
                if not isinstance(part, int):
                    parts[index] = file.tell()
                    pickle.dump(part, file, protocol=pickle.HIGHEST_PROTOCOL)
        self._in_memory = 0
