"""The batch manifest: every file and batch a run made, written atomically beside the output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from llm_enrich.flows.tables.writing import write_json_atomic

__all__ = ["BatchEntry", "Manifest", "manifest_path"]

EntryState = Literal["new", "uploaded", "submitted", "done"]


class BatchEntry(BaseModel):
    """One batch file: its lane, its custom_ids (answer keys), and how far it got."""

    lane: int
    custom_ids: list[str]
    state: EntryState = "new"
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the provider's last batch status
    resubmitted: bool = False  # lines left over by an expired or cancelled batch, sent once more
    refusals: int = 0  # times the enqueued-token limit refused it
    cancelled: bool = False  # `enrich batch cancel` asked the provider to stop it: its rest is not resubmitted


class Manifest(BaseModel):
    """What a batch run made; a rerun of the same job collects these instead of submitting again."""

    version: int = 1
    entries: list[BatchEntry] = Field(default_factory=list)
    path: str | None = Field(None, exclude=True)

    @classmethod
    def load(cls, path: str | None) -> Manifest:
        """The manifest at ``path`` (a fresh one when there is none or it is unreadable)."""
        if path is not None and Path(path).is_file():
            try:
                found = cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
                found.path = path
                return found
            except (OSError, ValueError, ValidationError):
                pass
        return cls(path=path)

    def save(self) -> None:
        """Write it atomically (in-memory only for an output in a bucket)."""
        if self.path is not None:
            write_json_atomic(self.model_dump(mode="json"), self.path)

    def remove(self) -> None:
        """Delete it: every batch is collected."""
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)

    def table(self, outputs: list[str]) -> list[dict[str, object]]:
        """One row per batch file for the run's artifact (``outputs``: the answer column of each lane)."""
        return [
            {"batch": e.batch_id or "(not submitted)", "output": outputs[e.lane] if e.lane < len(outputs) else "?",
             "lines": len(e.custom_ids), "state": e.state, "provider status": e.status or "",
             "resubmitted": e.resubmitted, "cancelled": e.cancelled}
            for e in self.entries
        ]  # fmt: skip

    @property
    def pending(self) -> list[BatchEntry]:
        """Entries not collected yet."""
        return [e for e in self.entries if e.state != "done"]


def manifest_path(destination: str, remote: bool) -> str | None:
    """``.<output name>.batches.json`` beside a local output; None for a bucket (not kept)."""
    if remote:
        return None
    dest = Path(destination.rstrip("/"))
    return str(dest.parent / f".{dest.name}.batches.json")
