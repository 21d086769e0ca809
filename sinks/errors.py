"""Exception root of the sinks: every error a sink raises derives from SinkError."""

from __future__ import annotations

from sardis_ledger.streams.errors import LedgerError


class SinkError(LedgerError):
    """A sink could not read, write or verify. `retriable` says whether retrying can help."""


class SinkUnavailable(SinkError):
    """A server (Kafka, PostgreSQL, immudb) is unreachable or restarting; retry with backoff."""

    retriable = True


class VerificationError(SinkError):
    """A proof did not check or stored data differs from what was written: never retried."""

    def __init__(self, message: str, *, entry_id: str | None = None) -> None:
        super().__init__(message, retriable=False)
        self.entry_id = entry_id
