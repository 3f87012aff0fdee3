"""enrich cache verify: read every record of a cache, report the damage, and with --repair keep only the good.

A file is rewritten through a temporary file and ``os.replace``; an object is written anew before the damaged one
is deleted. Repair while no run writes to the cache (a writer would keep appending to the replaced file).
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_enrich.flows.cache.files import ResponseCache, default_cache_dir
from llm_enrich.flows.cache.objects import ObjectStoreCache
from llm_enrich.flows.cache.reading import SegmentHealth, line_numbers, read_segment
from llm_enrich.flows.tables.paths import is_remote
from llm_enrich.schemas.errors import ConfigError

__all__ = ["CacheReport", "cache_location", "render_report", "verify_cache"]


@dataclass(frozen=True)
class CacheReport:
    """What checking one cache found, segment by segment, and which segments a repair rewrote."""

    location: str
    segments: tuple[SegmentHealth, ...]
    repaired: frozenset[str] = frozenset()

    @property
    def records_ok(self) -> int:
        """Records that load."""
        return sum(s.ok for s in self.segments)

    @property
    def records_damaged(self) -> int:
        """Records lost inside readable segments."""
        return sum(s.damaged for s in self.segments)

    @property
    def files_unreadable(self) -> int:
        """Segments lost as a whole (zero-length, not Parquet, cannot be fetched)."""
        return sum(s.unreadable is not None for s in self.segments)

    @property
    def clean(self) -> bool:
        """True when nothing was damaged."""
        return all(s.clean for s in self.segments)


def cache_location(*, output: str | None, cache_dir: str | None) -> str:
    """The cache to check: --cache-dir, or the default one beside OUTPUT."""
    if (output is None) == (cache_dir is None):
        raise ConfigError(
            "name the cache to check: either --cache-dir DIR, or the run's OUTPUT (its cache is the "
            ".enrich-cache beside it)."
        )
    return cache_dir if cache_dir is not None else default_cache_dir(output or "")


def verify_cache(location: str, storage: dict[str, str] | None = None, *, repair: bool = False) -> CacheReport:
    """Read every segment of the cache record by record; with ``repair``, rewrite the damaged ones."""
    if is_remote(location):
        return _verify_objects(location, storage, repair=repair)
    cache = ResponseCache(location)
    if not cache.directory.is_dir():
        raise ConfigError(
            f"there is no response cache at '{location}' (no v1/ directory in it). "
            "Pass the --cache-dir the runs used, or the run's OUTPUT."
        )
    found: list[SegmentHealth] = []
    repaired: set[str] = set()
    for path in cache.segments():
        _, health = read_segment(path, exact=True)
        found.append(health)
        if repair and not health.clean:
            cache.replace_segment(path)
            repaired.add(health.location)
    return CacheReport(location, tuple(found), frozenset(repaired))


def render_report(report: CacheReport) -> list[str]:
    """The report as lines for people: one per segment, then the totals."""
    lines = []
    for health in report.segments:
        line = f"  {health.location.rsplit('/', 1)[-1]}: {health.ok} ok, {health.damaged} damaged"
        if health.unreadable is not None:
            line = f"  {health.location.rsplit('/', 1)[-1]}: unreadable ({health.unreadable})"
        elif health.damaged_lines:
            line += f" (line {line_numbers(health.damaged_lines, 10)})"
        if health.location in report.repaired:
            line += ": removed" if health.ok == 0 else ": repaired"
        lines.append(line)
    verdict = "clean" if report.clean else ("repaired" if report.repaired else "damaged")
    lines.append(
        f"cache {report.location}: {verdict}; segments {len(report.segments)}, records ok {report.records_ok}, "
        f"records damaged {report.records_damaged}, files unreadable {report.files_unreadable}."
    )
    if not report.clean and not report.repaired:
        lines.append("Run again with --repair (while no run writes to this cache) to keep only the good records.")
    return lines


def _verify_objects(location: str, storage: dict[str, str] | None, *, repair: bool) -> CacheReport:
    cache = ObjectStoreCache(location, storage)
    found: list[SegmentHealth] = []
    repaired: set[str] = set()
    for name, _ in cache.segments():
        frame, health = cache.read_segment(name)
        found.append(health)
        if repair and not health.clean:
            cache.replace_segment(name, frame)
            repaired.add(health.location)
    return CacheReport(location, tuple(found), frozenset(repaired))
