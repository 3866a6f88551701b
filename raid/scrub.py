"""Scrubbing: read every stripe, verify every checksum and the parity, repair.

Like a zpool scrub or md's "check"/"repair": each batch of rows is read from every
member under the array's lock (so the array stays in use), each block verified against
its checksum (a damaged one is rebuilt from parity and rewritten, reconstruct.py), and
the XOR of the stripe checked; a stripe whose parity disagrees with its verified data
gets its parity rewritten. A block that neither its checksum nor parity can restore
(damage on two members of one stripe) is counted (`unrecoverable`) and, if it holds
data, its logical block number listed (`lost_blocks`, at most `LOST_LISTED`): an array
in a replicated server has those fetched from the other replica (raid/jobs.py `heal`).
Progress and the last result go to the array's state file,
for `replfs raid status` in other processes. `scrub_steps` is the same work one batch per
step, for a caller that paces it (raid/jobs.py).
"""

from __future__ import annotations

import time
from typing import Callable, Generator

import numpy as np

from .dirfiles import update_state
from .layout import BLOCK_SIZE
from .rebuild import REBUILD_BATCH, run_steps

LOST_LISTED = 4096      # lost logical blocks a scrub's result lists (all are counted)


class ScrubMixin:
    """Part of `Array` (array.py): `scrub`. Uses the array's `geo`, `disks`, `dir`,
    `scrub_progress`, `_lock`, `_ensure_bits`, `_write_seg`, `flush_sync` and the
    reconstruction methods (reconstruct.py)."""

    def scrub(self, progress: Callable[[int, int], None] | None = None,
              repair: bool = True, batch_rows: int | None = None) -> dict:
        """Read every stripe, verify every checksum and the parity, repair what can be.
        Returns what was found. Runs online (per batch of rows under the lock)."""
        return run_steps(self.scrub_steps(repair, batch_rows), progress)

    def scrub_steps(self, repair: bool = True, batch_rows: int | None = None
                    ) -> Generator[tuple[int, int], None, dict]:
        """`scrub` one batch of rows per step: yields (rows done, rows) after each batch
        and returns what was found. Closed early, the scrub is recorded as stopped."""
        g = self.geo
        batch = batch_rows or max(1, REBUILD_BATCH // g.chunk)
        before = [d.cksum_errors for d in self.disks]
        found = {"rows": g.rows, "blocks_checked": 0, "parity_mismatches": 0,
                 "parity_repaired": 0, "unrecoverable": 0, "lost_blocks": [],
                 "cksum_repaired": {},
                 "started": time.time()}
        self.scrub_progress = {"state": "running", "row": 0, "rows": g.rows,
                               "started": found["started"]}
        update_state(self.dir, scrub=self.scrub_progress)
        last = time.monotonic()
        row = 0
        try:
            while row < g.rows:
                r1 = min(g.rows, row + batch)
                with self._lock:
                    self._scrub_rows(row, r1, batch, repair, found)
                row = r1
                self.scrub_progress["row"] = row
                if time.monotonic() - last > 1.0:
                    update_state(self.dir, scrub=self.scrub_progress)
                    last = time.monotonic()
                yield row, g.rows
        finally:
            if row < g.rows:
                self.scrub_progress["state"] = "stopped"
                update_state(self.dir, scrub=self.scrub_progress)
        self.flush_sync()
        found["cksum_repaired"] = {d.index: d.cksum_errors - b
                                   for d, b in zip(self.disks, before) if d.cksum_errors - b}
        found["finished"] = time.time()
        found["skipped_disks"] = [d.index for d in self.disks if d.state != "active"]
        self.scrub_progress = {"state": "done", "row": g.rows, "rows": g.rows,
                               "started": found["started"], "finished": found["finished"],
                               "found": {k: v for k, v in found.items()
                                         if k not in ("started", "finished")}}
        update_state(self.dir, scrub=self.scrub_progress)
        return found

    def _list_lost(self, d: int, e0: int, lost: list[int], out: list[int]) -> None:
        """Add the logical blocks of member d's lost entries (e0 + i) to `out`; a lost
        parity entry names no block of its own (healing the stripe's data rewrites it)."""
        g = self.geo
        for i in lost:
            e = e0 + i
            if len(out) < LOST_LISTED and g.role(e // g.cb, d) >= 0:
                out.append(g.lblock_of_entry(d, e))

    def _scrub_rows(self, row: int, r1: int, batch: int, repair: bool, found: dict) -> None:
        """Verify rows [row, r1), repair what can be, count it in `found` (under the
        lock)."""
        g = self.geo
        self._check_open()
        e0, e1 = row * g.cb, r1 * g.cb
        cache: dict = {}
        self._prefetch(cache, [(d, e0, e1) for d in range(g.ndisks)])
        self._readahead(range(g.ndisks), e1, min(g.rows, r1 + batch) * g.cb)
        bufs = {}
        lost: set[int] = set()
        for d in range(g.ndisks):
            if self.disks[d].readable(e0, e1, g.cb):
                buf, dl = self._get(cache, d, e0, e1)
                bufs[d] = buf
                lost.update(dl)
                self._list_lost(d, e0, dl, found["lost_blocks"])
                found["blocks_checked"] += e1 - e0
        found["unrecoverable"] += len(lost)
        if len(bufs) < g.ndisks:
            return
        acc = np.zeros((e1 - e0) * BLOCK_SIZE, dtype=np.uint8)
        for buf in bufs.values():
            acc ^= buf
        per = acc.reshape(e1 - e0, BLOCK_SIZE).any(axis=1)
        bad = [i for i in np.nonzero(per)[0].tolist() if i not in lost]
        found["parity_mismatches"] += len(bad)
        if bad and repair:
            self._ensure_bits(range(row, r1))
            for i in bad:
                e = e0 + i
                pd = g.parity_disk(e // g.cb)
                blk = acc[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] ^ \
                    bufs[pd][i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                self._write_seg(pd, e, blk.tobytes())
                found["parity_repaired"] += 1
