"""The staging area of a run: slices to enrich, finished part files, and rejected rows.

It lives next to the output (``.<output name>.staging-<id>/``), in ``--staging-dir`` (a path
or an object-store prefix), so that partition tasks on other processes or machines (Dask
workers) read and write it by path: no table travels through the task scheduler. It is
removed when the run ends, whatever happens.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from llm_enrich.flows.tables.lock import staging_tag
from llm_enrich.flows.tables.paths import is_remote, literal_path, open_store, sibling
from llm_enrich.flows.tables.writing import write_failure
from llm_enrich.schemas.errors import OutputError

__all__ = ["Staging", "open_staging"]

# object_store client settings (not credentials or endpoints), which obstore takes apart.


@dataclass(frozen=True)
class Staging:
    """A directory (or object prefix) of Parquet part files: ``in/``, ``out/`` and ``rejected/``."""

    root: str
    storage: dict[str, str] | None = field(default=None, repr=False)

    def path(self, kind: str, number: int) -> str:
        """Where slice ``number`` of ``kind`` ('in', 'out', 'rejected') lives."""
        return f"{self.root}/{kind}/part-{number:06d}.parquet"

    def write(self, frame: pl.DataFrame, path: str) -> None:
        """Write one part file (fast compression: it lives only as long as the run)."""
        try:
            if not is_remote(path):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(path, compression="lz4", statistics=False, storage_options=self.storage)
        except (OSError, pl.exceptions.PolarsError) as exc:
            if not is_remote(path):
                with suppress(OSError):  # the write's own error says what went wrong; a half file must not stay
                    Path(path).unlink(missing_ok=True)
            raise write_failure(
                exc, "staging file", path, "point `staging_dir` somewhere with space (shared storage for Dask workers)"
            ) from exc

    def read(self, path: str) -> pl.DataFrame:
        """Read one part file back."""
        try:
            return pl.read_parquet(literal_path(path), storage_options=self.storage)
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise OutputError(
                f"cannot read the staging file '{path}': {exc}. When Dask workers run on other machines "
                "the staging directory must be on storage they share (`staging_dir`)."
            ) from exc

    def scan(self, paths: list[str]) -> pl.LazyFrame:
        """The given part files as one lazy table, in the order given."""
        return pl.scan_parquet([literal_path(p) for p in paths], storage_options=self.storage)

    def remove(self) -> None:
        """Delete the staging area and everything in it."""
        if not is_remote(self.root):
            shutil.rmtree(self.root, ignore_errors=True)
            return
        import obstore

        try:
            store = open_store(self.root, self.storage)
            for batch in obstore.list(store, chunk_size=1_000):
                obstore.delete(store, [meta["path"] for meta in batch])
        except Exception:  # noqa: BLE001 - cleanup must never mask the run's own outcome
            pass


def open_staging(destination: str, staging_dir: str | None, *, shared: bool, storage: dict[str, str] | None) -> Staging:
    """A fresh staging area for one run: in staging_dir, beside the output, or in a temp dir."""
    name = Path(destination.rstrip("/")).name or "output"
    # The tag tells outputs of the same name apart in a shared --staging-dir (see flows.lock.sweep_debris).
    leaf = f".{name}.staging-{staging_tag(destination)}-{uuid.uuid4().hex[:12]}"
    if staging_dir is not None and is_remote(staging_dir):
        return Staging(f"{staging_dir.rstrip('/')}/{leaf}", storage)
    if staging_dir is None and is_remote(destination):
        if shared:  # workers on other machines see the bucket, not this machine's disk
            return Staging(sibling(destination, leaf), storage)
        staging_dir = tempfile.gettempdir()
    try:
        base = Path(staging_dir) if staging_dir is not None else Path(destination).parent
        base.mkdir(parents=True, exist_ok=True)
        root = base / leaf
        root.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot create a staging directory for '{destination}': {exc}.") from exc
    return Staging(str(root))
