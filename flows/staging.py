"""The staging area of a run: slices to enrich, finished part files, and rejected rows.

It lives next to the output (``.<output name>.staging-<id>/``), or in ``--staging-dir``, so
that partition tasks on other processes or machines (Dask workers) read and write it by path:
no table travels through the task scheduler. It is removed when the run ends, whatever happens.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from flows.storage import is_remote
from schemas.errors import ConfigError, OutputError

__all__ = ["Staging", "open_staging"]


@dataclass(frozen=True)
class Staging:
    """A directory of Parquet part files: ``in/``, ``out/`` and ``rejected/``."""

    root: str

    def path(self, kind: str, number: int) -> str:
        """Where slice ``number`` of ``kind`` ('in', 'out', 'rejected') lives."""
        return f"{self.root}/{kind}/part-{number:06d}.parquet"

    def write(self, frame: pl.DataFrame, path: str) -> None:
        """Write one part file (fast compression: it lives only as long as the run)."""
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(path, compression="lz4", statistics=False)
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise OutputError(
                f"cannot write the staging file '{path}': {exc}. Pass --staging-dir somewhere writable "
                "(on shared storage when Dask workers run on other machines)."
            ) from exc

    def read(self, path: str) -> pl.DataFrame:
        """Read one part file back."""
        try:
            return pl.read_parquet(path)
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise OutputError(
                f"cannot read the staging file '{path}': {exc}. When Dask workers run on other machines "
                "the staging directory must be on storage they share (--staging-dir)."
            ) from exc

    def remove(self) -> None:
        """Delete the staging area and everything in it."""
        shutil.rmtree(self.root, ignore_errors=True)


def open_staging(destination: str, staging_dir: str | None) -> Staging:
    """A fresh staging area for one run: in staging_dir, beside a local output, or in a temp dir."""
    if staging_dir is not None and is_remote(staging_dir):
        raise ConfigError(
            f"--staging-dir '{staging_dir}' is an object-store URI; staging needs a file system path "
            "(a shared mount when Dask workers run on other machines)."
        )
    name = Path(destination.rstrip("/")).name or "output"
    try:
        if staging_dir is not None:
            base = Path(staging_dir)
        elif is_remote(destination):
            base = Path(tempfile.gettempdir())
        else:
            base = Path(destination).parent
        base.mkdir(parents=True, exist_ok=True)
        root = base / f".{name}.staging-{uuid.uuid4().hex[:12]}"
        root.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot create a staging directory for '{destination}': {exc}.") from exc
    return Staging(str(root))
