"""replfs.txn: write-ahead log, recovery, checkpoints, strict 2PL with deadlock detection,
and a history recorder + conflict-serializability checker.

Depends only on `replfs.raid.blockdev` (the BlockDevice interface), `replfs.errors` and
`replfs.crash`. See `manager` for the transaction API (and a map of the modules it
inherits from: `transaction`, `recovery` for the recovery algorithm, `checkpoint`,
`twophase`, `ordered`, `publish`), `log` and `records` for the on-disk format, `locks`
for the lock table and victim choice.
"""

from .errors import (Deadlock, LockTimeout, LogCorrupt, LogFull, Retryable, TxnAborted,
                     TxnManagerFailed, TxnTooLarge)
from .history import BlockRange, HistoryRecorder, SerializabilityResult, check_serializable
from .locks import LockManager, LockStatistics
from .manager import Change, CommitRecord, Txn, TxnManager

__all__ = [
    "TxnManager", "Txn", "CommitRecord", "Change",
    "Deadlock", "LockTimeout", "TxnAborted", "Retryable", "LogFull", "LogCorrupt",
    "TxnManagerFailed", "TxnTooLarge",
    "HistoryRecorder", "check_serializable", "SerializabilityResult", "BlockRange",
    "LockManager", "LockStatistics",
]
