"""Which rows a trial run (``limit`` / ``sample``) enriches.

Rows are picked by their ordinal among the *valid* rows, which both passes over the input see in
the same order: ``limit`` keeps the first N, ``sample`` the N whose seeded hash of that ordinal is
smallest (a uniform sample without replacement). The sample's cut-off is found by the first pass,
the full-table estimate, so the trial itself reads each slice once and stages only its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from llm_enrich.flows.job import TrialFields

__all__ = ["TrialPick"]


@dataclass
class TrialPick:
    """A trial's row choice; a sample learns its cut-off in the first pass (``observe``, ``settle``)."""

    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    cutoff: int | None = None
    _smallest: pl.Series = field(default_factory=lambda: pl.Series([], dtype=pl.UInt64))

    @classmethod
    def of(cls, job: TrialFields) -> TrialPick | None:
        """The job's pick, or None for a full run."""
        if job.limit is None and job.sample is None:
            return None
        return cls(limit=job.limit, sample=job.sample, seed=job.seed)

    @property
    def ready(self) -> bool:
        """Whether rows can be picked now (a sample needs the first pass's cut-off)."""
        return self.sample is None or self.cutoff is not None

    def _priorities(self, start: int, count: int) -> pl.Series:
        return pl.int_range(start, start + count, eager=True, dtype=pl.Int64).hash(seed=self.seed)

    def observe(self, start: int, count: int) -> None:
        """First pass: valid rows ``start`` .. ``start + count`` exist; keep the sample's smallest hashes."""
        if self.sample is None or not count:
            return
        both = pl.concat([self._smallest, self._priorities(start, count)])
        self._smallest = both.bottom_k(self.sample) if both.len() > self.sample else both

    def settle(self) -> None:
        """First pass done: the sample's cut-off is the largest hash kept."""
        if self.sample is not None:
            self.cutoff = int(self._smallest.max()) if self._smallest.len() else -1  # type: ignore[arg-type]

    def keep(self, start: int, count: int) -> pl.Series:
        """Second pass: which of valid rows ``start`` .. ``start + count`` the trial enriches."""
        if self.limit is not None:
            return pl.int_range(start, start + count, eager=True) < self.limit
        return self._priorities(start, count) <= (self.cutoff if self.cutoff is not None else -1)

    def done(self, valid_seen: int) -> bool:
        """A limit needs no more slices once it has seen N valid rows."""
        return self.limit is not None and valid_seen >= self.limit
