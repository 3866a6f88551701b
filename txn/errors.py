"""Exceptions of the transaction layer.

`TxnAborted` and its subclasses mean "this transaction is (being) rolled back": the
caller must `abort()` it (``TxnManager.run`` does so and retries the retryable ones).
`LogCorrupt` is a user-facing error: the log region cannot be trusted.
"""

from __future__ import annotations

from replfs.errors import ReplfsError


class TxnAborted(Exception):
    """The transaction cannot go on; abort it. Raised by operations on a doomed txn."""


class Retryable(TxnAborted):
    """An abort caused by contention, not by the work itself: retrying may succeed."""


class Deadlock(Retryable):
    """This transaction was chosen as the victim of a wait-for cycle.

    `cycle` lists the ids of the transactions on the cycle (victim included)."""

    def __init__(self, message: str, cycle: list[int] | None = None):
        super().__init__(message)
        self.cycle = cycle or []


class LockTimeout(Retryable):
    """A lock wait exceeded the manager's lock timeout."""


class LogFull(Retryable):
    """The log has no room even after a checkpoint (a transaction pins its tail)."""


class TxnTooLarge(TxnAborted):
    """The transaction needs more log than the log can ever hold (`max_txn_bytes`).

    Not retryable: split the work into smaller transactions or make the log larger."""


class LogCorrupt(ReplfsError):
    """The log header is missing or damaged, or belongs to another layout."""


class TxnManagerFailed(ReplfsError):
    """A log write or flush failed; the manager refuses further work (reopen to recover)."""
