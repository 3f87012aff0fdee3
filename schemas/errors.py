"""Every error llm-enrich raises on purpose, in one place.

It sits in ``schemas/``, the bottom layer, so that every layer can raise these without
importing upwards. Library errors (polars, pandera, openai, langchain) are translated into
these at one seam each, always ``raise ... from exc``.

Hierarchy::

    * EnrichError                 anything we raise on purpose; the message is for people
      x UserError                 bad input or configuration: exit code 2, no traceback
        - ConfigError             an option, job file, schema reference or credential is wrong
          - TemplateError         the prompt template is malformed or names a missing column
        - InputError              the input file is missing, empty, unreadable or of unknown format
        - ValidationFailed        rows fail the input schema (carries the report)
        - DestinationError        the output, staging or cache location is unusable or would
                                  overwrite the input (checked before the first request)
        - DestinationBusy         another run holds the output's lock (``--no-wait``)
        - EndpointRejected        the LLM endpoint refused the whole job (401/403/404, exhausted quota)
        - RunAborted              the run stopped early on purpose (too many failures, a budget)
      x RuntimeFailure            the environment failed us: exit code 1
        - LocalModelError         the bundled local model server did not start
        - OutputError             the output could not be written
          - DiskFull              the file system holding staging, cache or output is full
      x RunInterrupted            stopped on request (Ctrl-C, SIGTERM, a cancel): exit 130 / 143
      x ReplyError                a reply we cannot use: retried, then the row's ``enrich_error``
        - EmptyReply              the model answered with no text
        - InvalidStructuredReply  a structured reply did not parse or match its schema

Per-row failures (a 500, a malformed or empty reply, a 400 for one prompt) are not raised
past the transform: they become the row's ``enrich_error`` value.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DestinationBusy",
    "DestinationError",
    "DiskFull",
    "EndpointRejected",
    "EmptyReply",
    "EnrichError",
    "InputError",
    "InvalidStructuredReply",
    "LocalModelError",
    "OutputError",
    "ReplyError",
    "RunAborted",
    "RunInterrupted",
    "RuntimeFailure",
    "TemplateError",
    "UserError",
    "ValidationFailed",
]


class EnrichError(Exception):
    """Base class: the message says what went wrong and what to do."""

    exit_code = 1

    @property
    def message(self) -> str:
        """The user-facing message."""
        return str(self.args[0]) if self.args else self.__class__.__name__


class UserError(EnrichError):
    """Bad input or configuration; the run stops before any output is touched."""

    exit_code = 2


class ConfigError(UserError):
    """An option, job file, schema reference or credential is wrong."""


class TemplateError(ConfigError):
    """The prompt template is malformed or names a column the table does not have."""


class InputError(UserError):
    """The input file is missing, empty, unreadable or of an unknown format."""


class ValidationFailed(UserError):
    """Rows of the input fail the schema; ``report`` lists them."""

    def __init__(self, message: str, *, failing_rows: int = 0) -> None:
        super().__init__(message)
        self.failing_rows = failing_rows


class EndpointRejected(UserError):
    """The endpoint refused the job as a whole (bad key, no access, unknown model)."""


class DestinationError(ConfigError):
    """The output, staging or cache location cannot be used, or would overwrite the input."""


class DestinationBusy(UserError):
    """Another run is writing the same output and the caller chose not to wait."""


class RunAborted(UserError):
    """The run stopped sending on purpose (error rate, budget); answers so far are kept."""


class RunInterrupted(EnrichError):
    """The run was asked to stop (a signal or a cancel); answers so far are kept."""

    def __init__(self, message: str, *, signal_number: int | None = None) -> None:
        super().__init__(message)
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        """128 + the signal's number, as shells report a process ended by it (130 for Ctrl-C)."""
        return 128 + (self.signal_number or 2)


class RuntimeFailure(EnrichError):
    """The environment failed us; retrying later may help."""


class LocalModelError(RuntimeFailure):
    """The bundled local model server could not be started."""


class OutputError(RuntimeFailure):
    """The output file could not be written."""


class DiskFull(OutputError):
    """No space left where staging, cache or output are written."""


class ReplyError(EnrichError):
    """A reply we cannot use: retried, then recorded as the row's error; never raised past the transform."""


class EmptyReply(ReplyError):
    """The model answered with no text; retried, then recorded as the row's error."""


class InvalidStructuredReply(ReplyError):
    """A structured reply did not parse or did not match the schema; asked again once, with the error."""
