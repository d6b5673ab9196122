"""The worker's options, as its stages read them: one frozen record, built once by `Worker`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Options"]


@dataclass(frozen=True, slots=True)
class Options:
    """See `Worker` for what each means."""

    slot: str = "bemi"
    publication: str = "bemi"
    batch_rows: int = 10_000
    batch_seconds: float = 0.1
    spill_threshold: int = 20_000
    status_interval: float = 5.0
    honor_skip: bool = True  # drop transactions under skip_tracking()

    @property
    def max_queued(self) -> int:
        """How many changes (in memory) the reader may queue ahead of the writer before it waits."""
        return max(4 * self.batch_rows, self.spill_threshold)
