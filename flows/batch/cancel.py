"""`enrich batch cancel`: stop paying for a job's batches; what they finished is kept by the collect that follows."""

from __future__ import annotations

from dataclasses import dataclass

from llm_enrich.flows.batch.client import BatchClient
from llm_enrich.flows.batch.manifest import Manifest, manifest_path
from llm_enrich.flows.job import EnrichJob
from llm_enrich.flows.llm.endpoint import resolve_endpoint
from llm_enrich.schemas.errors import ConfigError

__all__ = ["Cancelled", "cancel_batches"]


@dataclass(frozen=True)
class Cancelled:
    """What the cancel did: batches asked to stop, batches that had already ended, files never submitted."""

    cancelled: int
    already_ended: int
    unsubmitted: int

    def describe(self) -> str:
        """One line for the terminal."""
        return (
            f"cancelled {self.cancelled} batches ({self.already_ended} had already ended, {self.unsubmitted} files "
            "were never submitted)"
        )


def cancel_batches(job: EnrichJob) -> Cancelled:
    """Cancel every submitted batch in the job's manifest and mark it so that its rest is not resubmitted."""
    path = manifest_path(job.destination)
    manifest = Manifest.load(path, job.storage())
    if not manifest.pending:
        raise ConfigError(
            f"there are no batches to cancel for {job.destination} (no manifest at {path}); give the same input, "
            "output and job file as the batch run."
        )
    endpoint = resolve_endpoint(job)
    secret = endpoint.secret
    client = BatchClient(endpoint.base_url, secret, timeout=job.reply_timeout, secret=secret)
    cancelled = ended = 0
    try:
        for entry in manifest.pending:
            if entry.state != "submitted" or entry.batch_id is None:
                continue
            if client.cancel(entry.batch_id):
                cancelled += 1
            else:
                ended += 1
            entry.cancelled = True
            manifest.save()  # each step recorded: a cancel killed halfway is run again safely
    finally:
        client.close()
    unsubmitted = sum(1 for e in manifest.pending if e.state != "submitted")
    return Cancelled(cancelled, ended, unsubmitted)
