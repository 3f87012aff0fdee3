"""The batch manifest: every file and batch a run made, written atomically beside the output.

Beside a local output it is a file replaced atomically; beside an output in a bucket it is an object
(one PUT is atomic there), so a rerun on another machine resumes the same batches too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from llm_enrich.flows.tables.paths import is_remote, open_store, sibling
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
    overdue: bool = False  # cancelled at the job's batch_deadline: its rest goes online, not into a batch


class Manifest(BaseModel):
    """What a batch run made; a rerun of the same job collects these instead of submitting again."""

    version: int = 1
    entries: list[BatchEntry] = Field(default_factory=list)
    first_submitted: float | None = None  # epoch seconds of the first batch created: batch_deadline counts from it
    path: str = Field("", exclude=True)
    storage: dict[str, str] | None = Field(None, exclude=True)

    @classmethod
    def load(cls, path: str, storage: dict[str, str] | None = None) -> Manifest:
        """The manifest at ``path`` (a fresh one when there is none or it is unreadable)."""
        try:
            text = _read(path, storage)
            found = cls.model_validate(json.loads(text)) if text is not None else cls()
        except (OSError, ValueError, ValidationError):
            found = cls()
        found.path, found.storage = path, storage
        return found

    def save(self) -> None:
        """Write it atomically: a file replaced by rename, or one object PUT."""
        document = self.model_dump(mode="json")
        if is_remote(self.path):
            import obstore

            store, name = _store_of(self.path, self.storage)
            obstore.put(store, name, json.dumps(document).encode())
        else:
            write_json_atomic(document, self.path)

    def remove(self) -> None:
        """Delete it: every batch is collected."""
        if is_remote(self.path):
            import obstore
            from obstore.exceptions import NotFoundError

            store, name = _store_of(self.path, self.storage)
            try:
                obstore.delete(store, name)
            except NotFoundError:
                pass
        else:
            Path(self.path).unlink(missing_ok=True)

    def table(self, outputs: list[str]) -> list[dict[str, object]]:
        """One row per batch file for the run's artifact (``outputs``: the answer column of each lane)."""
        return [
            {"batch": e.batch_id or "(not submitted)", "output": outputs[e.lane] if e.lane < len(outputs) else "?",
             "lines": len(e.custom_ids), "state": e.state, "provider status": e.status or "",
             "resubmitted": e.resubmitted, "cancelled": e.cancelled or e.overdue}
            for e in self.entries
        ]  # fmt: skip

    @property
    def pending(self) -> list[BatchEntry]:
        """Entries not collected yet."""
        return [e for e in self.entries if e.state != "done"]


def manifest_path(destination: str) -> str:
    """``.<output name>.batches.json`` beside the output (a file, or an object in its bucket)."""
    trimmed = destination.rstrip("/")
    return sibling(trimmed, f".{trimmed.rsplit('/', 1)[-1]}.batches.json")


def _store_of(url: str, storage: dict[str, str] | None) -> tuple[Any, str]:
    """The store of the object's bucket prefix, and the object's name in it."""
    prefix, name = url.rsplit("/", 1)
    return open_store(prefix, storage), name


def _read(path: str, storage: dict[str, str] | None) -> str | None:
    """The manifest's text, or None when there is none."""
    if not is_remote(path):
        return Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
    import obstore
    from obstore.exceptions import NotFoundError

    store, name = _store_of(path, storage)
    try:
        return bytes(obstore.get(store, name).bytes()).decode("utf-8")
    except NotFoundError:
        return None
