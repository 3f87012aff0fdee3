"""What calls produce: one prompt's ``Outcome``, and the counters every call of a run adds to."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["CallStats", "Outcome", "StatsCounts"]


@dataclass
class Outcome:
    """What one prompt produced: text or an error, with the tokens it cost."""

    text: str | None = None
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0  # of input_tokens, those the provider read from its prompt cache
    attempts: int = 0
    truncated: bool = False  # cut at max_tokens (finish_reason "length") and kept as an answer


@dataclass
class CallStats:
    """Counters shared by every call of a run; safe to read from other threads."""

    requests: int = 0
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    rate_limited: int = 0
    timeouts: int = 0
    cached_input_tokens: int = 0  # input tokens the provider served from its prompt cache
    truncated: int = 0
    filtered: int = 0
    rows_deduplicated: int = 0
    in_flight: int = 0
    answered: int = 0
    aborted: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, requests: int = 0, retries: int = 0, tokens: tuple[int, int] = (0, 0)) -> None:
        """Add to the counters."""
        self.bump(requests=requests, retries=retries, input_tokens=tokens[0], output_tokens=tokens[1])

    def bump(self, **deltas: int) -> None:
        """Add each of ``deltas`` to the counter of that name, under the lock."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> StatsCounts:
        """The counters a partition reports, read together under the lock."""
        with self._lock:
            return StatsCounts(**{name: getattr(self, name) for name in StatsCounts.__dataclass_fields__})

    def merge(self, counts: StatsCounts) -> None:
        """Add counts measured elsewhere (a Dask worker's share of this run)."""
        self.bump(**{name: getattr(counts, name) for name in StatsCounts.__dataclass_fields__})


@dataclass(frozen=True)
class StatsCounts:
    """A picklable copy of the counters a partition task reports back to the flow."""

    requests: int = 0
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    rate_limited: int = 0
    timeouts: int = 0
    rows_deduplicated: int = 0
    cached_input_tokens: int = 0

    def minus(self, before: StatsCounts) -> StatsCounts:
        """What was counted since ``before``."""
        return StatsCounts(**{n: getattr(self, n) - getattr(before, n) for n in self.__dataclass_fields__})
