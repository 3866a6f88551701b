"""The write-ahead log: a circular region of a block device.

Layout of the region ``[log_start, log_start + log_blocks)``:

- blocks ``log_start`` and ``log_start + 1`` are two slots of the log header (magic,
  version, geometry, random log id, epoch, ``start_lsn`` = the oldest LSN recovery needs,
  ``ckpt_lsn`` = the last checkpoint record, a sequence number, and a crc32c). Each
  rewrite (truncation, and recovery's epoch + 1) goes to the other slot with the next
  sequence number, so a torn header write leaves the previous header intact; the valid
  slot with the highest sequence number wins.
- blocks ``log_start + 2 ..`` hold the record stream: LSN ``l`` lives at byte ``l mod C``
  of the data area (C = (log_blocks - 2) * block_size). Records are framed by
  `records.frame`; a record may span blocks and the wrap-around.

The live log is ``[start_lsn, end_lsn)``. It may use at most ``C - block_size`` bytes so
that the block being appended to never shares a physical block with the tail.

Forcing (`force`) is group commit in two stages: one task at a time writes every
buffered block (`written_lsn`: in the device's files, so the records survive the crash
of this process, not a power loss), and one task at a time flushes the device
(`durable_lsn`: forced); tasks that want an LSN covered by a write or a flush just wait
for it, and the next leader takes everything that accumulated meanwhile. The stages run
side by side: `force(sync=False)` (written only) never waits for a flush in progress,
which may take long when the device holds much unflushed data.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import crc32c
import trio

from replfs.crash import crash_point
from replfs.raid.blockdev import BlockDevice

from .errors import LogCorrupt, TxnManagerFailed
from .records import FRAME, FRAME_SIZE, Record, check_frame, decode_body, frame

MAGIC = b"RFSLOG\x00\x01"
VERSION = 2
# magic, version, block_size, log_blocks, log_id, epoch, start_lsn, ckpt_lsn, seq
HEADER = struct.Struct("<8sIIIQIQQQ")
HEADER_SLOTS = 2
MIN_LOG_BLOCKS = 6
SCAN_CHUNK_BLOCKS = 256   # recovery reads the log 1 MiB at a time


@dataclass
class LogHeader:
    block_size: int
    log_blocks: int
    log_id: int
    epoch: int
    start_lsn: int
    ckpt_lsn: int
    seq: int = 0

    def pack(self) -> bytes:
        raw = HEADER.pack(MAGIC, VERSION, self.block_size, self.log_blocks, self.log_id,
                          self.epoch, self.start_lsn, self.ckpt_lsn, self.seq)
        raw += struct.pack("<I", crc32c.crc32c(raw))
        return raw + bytes(self.block_size - len(raw))

    @classmethod
    def unpack(cls, data: bytes) -> "LogHeader":
        raw = data[:HEADER.size]
        (crc,) = struct.unpack_from("<I", data, HEADER.size)
        magic, version, bs, nblocks, log_id, epoch, start, ckpt, seq = HEADER.unpack(raw)
        if magic != MAGIC:
            raise LogCorrupt("no replfs log at this place on the device (bad magic); "
                             "format it first or check --log-start")
        if crc32c.crc32c(raw) != crc:
            raise LogCorrupt("log header checksum mismatch: the log header is damaged")
        if version != VERSION:
            raise LogCorrupt(f"log version {version} not supported (expected {VERSION})")
        return cls(bs, nblocks, log_id, epoch, start, ckpt, seq)


class _Stage:
    """A stage of group commit that one task at a time performs: `lead(work)` runs
    `work()` unless another task is running it, and then waits for that one to end
    instead (the caller looks again whether what it wants is covered)."""

    def __init__(self):
        self.busy = False
        self._done = trio.Event()

    async def lead(self, work) -> None:
        if self.busy:
            await self._done.wait()
            return
        self.busy = True
        self._done = trio.Event()
        try:
            await work()
        finally:
            self.busy = False
            self._done.set()


class Log:
    """Append, force and scan records; see the module docstring for the layout.

    Not safe to use before `load()` (or `format()`) set its position. `append` is
    synchronous so that a caller can log an update and change the page it describes
    without another task running in between.
    """

    def __init__(self, device: BlockDevice, log_start: int, log_blocks: int,
                 group_commit: bool = True):
        if log_blocks < MIN_LOG_BLOCKS:
            raise ValueError(f"log needs at least {MIN_LOG_BLOCKS} blocks")
        if log_start < 0 or log_start + log_blocks > device.nblocks:
            raise ValueError(f"log region {log_start}+{log_blocks} outside the device "
                             f"({device.nblocks} blocks)")
        self.device = device
        self.bs = device.block_size
        self.log_start = log_start
        self.log_blocks = log_blocks
        self.data_start = log_start + HEADER_SLOTS
        self.data_blocks = log_blocks - HEADER_SLOTS
        self.capacity = self.data_blocks * self.bs
        self.usable = self.capacity - self.bs
        self.group_commit = group_commit
        self.header: LogHeader | None = None
        self.start_lsn = 0      # tail: oldest byte still needed
        self.end_lsn = 0        # next append goes here
        self.durable_lsn = 0    # everything below is on stable storage (forced)
        self.written_lsn = 0    # everything below is in the device's files (written)
        self.reserved = 0       # bytes promised to CLRs/ABORTs/COMMITs not yet appended
        self._buf = bytearray()  # log bytes [_buf_lsn, end_lsn), _buf_lsn block aligned
        self._buf_lsn = 0
        self._writes = _Stage()     # one task at a time writes the buffered records
        self._syncs = _Stage()      # and one flushes the device
        self._flush_lock = trio.Lock()  # without group commit: one write + flush at a time
        # holds: no record at or after a held LSN is written until its hold is released
        # (a COMMIT whose transaction's data is still on its way to the device)
        self._holds: dict[int, int] = {}
        self._next_hold = 0
        self._hold_released = trio.Event()
        self.failed: BaseException | None = None
        self.flushes = 0         # device flushes
        self.writes = 0          # passes that wrote for a caller who wanted no flush
        self.bytes_written = 0   # record bytes appended over the manager's lifetime

    # ---- format / open ------------------------------------------------------------

    async def format(self) -> None:
        """Write a fresh header (new random log id, epoch 1) and an empty stream."""
        log_id = int.from_bytes(os.urandom(8), "little")
        slots = {}
        for seq in (1, 2):   # both slots: nothing of an earlier format may outrank them
            self.header = LogHeader(self.bs, self.log_blocks, log_id, 1, 0, 0, seq)
            slots[self.log_start + seq % HEADER_SLOTS] = self.header.pack()
        self.start_lsn = self.end_lsn = self.durable_lsn = self.written_lsn = self._buf_lsn = 0
        self._buf = bytearray()
        await self.device.write_blocks(slots)

    async def read_header(self) -> LogHeader:
        """Read both header slots; the valid one with the highest sequence number wins.

        Raises `LogCorrupt` (saying why) when neither slot holds a valid header."""
        data = await self.device.read_blocks(self.log_start, HEADER_SLOTS)
        valid, errors = [], []
        for i in range(HEADER_SLOTS):
            try:
                valid.append(LogHeader.unpack(data[i * self.bs:(i + 1) * self.bs]))
            except LogCorrupt as exc:
                errors.append(exc)
        if not valid:
            raise errors[0]
        hdr = max(valid, key=lambda h: h.seq)
        if hdr.block_size != self.bs or hdr.log_blocks != self.log_blocks:
            raise LogCorrupt(f"log header says {hdr.log_blocks} blocks of {hdr.block_size} "
                             f"bytes, opened with {self.log_blocks} of {self.bs}")
        self.header = hdr
        return hdr

    async def scan(self) -> list[tuple[int, int, Record]]:
        """Read every valid record from the header's start LSN; set the end of the log.

        Returns ``[(lsn, end_lsn_of_record, record), ...]``. The first record whose
        frame, LSN, epoch or checksum does not check out ends the log (a torn tail).
        """
        hdr = self.header
        cap = self.capacity
        chunk_blocks = min(SCAN_CHUNK_BLOCKS, self.data_blocks)
        chunks: dict[int, bytes] = {}

        async def get(lsn: int, n: int) -> bytes:
            # read the circular data area lazily, a chunk at a time: a big log with a
            # short live part costs only what is live
            out = bytearray()
            while n > 0:
                block = (lsn % cap) // self.bs
                first = block - block % chunk_blocks
                if first not in chunks:
                    count = min(chunk_blocks, self.data_blocks - first)
                    if len(chunks) > 4:
                        chunks.clear()
                    chunks[first] = await self.device.read_blocks(self.data_start + first, count)
                data = chunks[first]
                off = lsn % cap - first * self.bs
                piece = data[off:off + n]
                out += piece
                lsn += len(piece)
                n -= len(piece)
            return bytes(out)

        out = []
        lsn = hdr.start_lsn
        prev_epoch = 0
        while lsn + FRAME_SIZE - hdr.start_lsn <= self.usable:
            head = await get(lsn, FRAME_SIZE)
            _, length, rlsn, epoch = FRAME.unpack(head)
            end = lsn + FRAME_SIZE + length
            if (rlsn != lsn or length == 0 or end - hdr.start_lsn > self.usable
                    or not prev_epoch <= epoch <= hdr.epoch):
                break
            body = await get(lsn + FRAME_SIZE, length)
            if not check_frame(head, body, hdr.log_id):
                break
            try:
                rec = decode_body(body)
            except Exception:  # a valid checksum over an undecodable body: stop here too
                break
            out.append((lsn, end, rec))
            prev_epoch = epoch
            lsn = end
        self.start_lsn = hdr.start_lsn
        self.end_lsn = self.durable_lsn = self.written_lsn = lsn
        self._buf_lsn = lsn - lsn % self.bs
        self._buf = bytearray(await get(self._buf_lsn, lsn - self._buf_lsn))
        return out

    async def write_header(self, *, start_lsn: int | None = None, ckpt_lsn: int | None = None,
                           epoch: int | None = None) -> None:
        """Rewrite and flush the header. Space below a new `start_lsn` is reused only after."""
        hdr = self.header
        if start_lsn is not None:
            hdr.start_lsn = start_lsn
        if ckpt_lsn is not None:
            hdr.ckpt_lsn = ckpt_lsn
        if epoch is not None:
            hdr.epoch = epoch
        hdr.seq += 1
        await self.device.write_blocks({self.log_start + hdr.seq % HEADER_SLOTS: hdr.pack()})
        crash_point("txn.log.header_written")
        await self.device.flush()
        self.start_lsn = hdr.start_lsn

    # ---- space --------------------------------------------------------------------

    @property
    def used(self) -> int:
        return self.end_lsn - self.start_lsn

    def free(self) -> int:
        """Bytes that may still be appended or reserved."""
        return self.usable - self.used - self.reserved

    # ---- append / force -----------------------------------------------------------

    def append(self, rec: Record, *, reserved: int = 0) -> tuple[int, int]:
        """Append `rec` to the in-memory tail; return (lsn, end lsn). Not yet durable.

        `reserved` bytes previously added to `self.reserved` are consumed by this record.
        Raises `TxnManagerFailed` after a failed flush, `RuntimeError` if the record
        does not fit (callers reserve space first).
        """
        if self.failed is not None:
            raise TxnManagerFailed(f"log write failed earlier: {self.failed!r}")
        raw = frame(rec, self.end_lsn, self.header.epoch, self.header.log_id)
        self.reserved -= reserved
        if self.used + len(raw) > self.usable or self.reserved < 0:
            self.reserved += reserved
            raise RuntimeError(f"log overflow appending {len(raw)} bytes "
                               f"(used {self.used}, reserved {self.reserved}, usable {self.usable})")
        lsn = self.end_lsn
        self._buf += raw
        self.end_lsn += len(raw)
        self.bytes_written += len(raw)
        return lsn, self.end_lsn

    def hold(self) -> int:
        """Write nothing from the current end of the log on until `release(token)`;
        returns the token. Appending goes on; the records wait in memory."""
        self._next_hold += 1
        self._holds[self._next_hold] = self.end_lsn
        return self._next_hold

    def release(self, token: int) -> None:
        del self._holds[token]
        self._hold_released.set()
        self._hold_released = trio.Event()

    def _writable_end(self) -> int:
        """Where a write may end now: the end of the log, or the oldest hold."""
        if not self._holds:
            return self.end_lsn
        return min(self.end_lsn, min(self._holds.values()))

    async def _wait_unheld(self, target: int) -> bool:
        """Wait for a hold's release if one keeps `target` from being written; returns
        whether it waited."""
        if self.written_lsn < target and self._writable_end() <= self.written_lsn:
            await self._hold_released.wait()
            return True
        return False

    async def force(self, lsn: int | None = None, *, sync: bool = True) -> None:
        """Return once every record below `lsn` (default: everything appended) is durable
        -- or, with `sync=False`, written (in the device's files, not flushed).

        Group commit, in two stages that run side by side: one task at a time writes
        everything appended so far (callers that want an LSN it covers wait for it), and
        one task at a time flushes the device (covering what was written before the
        flush began). A caller that only wants its records written never waits for a
        flush in progress. Raises `TxnManagerFailed` if the device failed (then, and
        forever after).
        """
        target = self.end_lsn if lsn is None else lsn
        if not self.group_commit:
            async with self._flush_lock:
                while True:
                    self._check_failed()
                    await self._write_once(sync)
                    if not await self._wait_unheld(target):
                        break
                if sync:
                    await self._sync_once()
            return
        while self.written_lsn < target:
            self._check_failed()
            if not await self._wait_unheld(target):
                await self._writes.lead(lambda: self._gather_and_write(sync))
        while sync and self.durable_lsn < target:
            self._check_failed()
            await self._syncs.lead(self._sync_once)
        self._check_failed()

    async def _gather_and_write(self, sync: bool) -> None:
        # two scheduling rounds before taking the batch: every task that is already
        # runnable (woken by the previous write) runs its next transaction up to its
        # COMMIT first -- trio orders a round randomly, so one round could still find
        # this leader ahead of them. With no other task runnable nobody can join: write
        # at once.
        if trio.lowlevel.current_statistics().tasks_runnable:
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
        await self._write_once(sync)

    def _check_failed(self) -> None:
        if self.failed is not None:
            raise TxnManagerFailed(f"log write failed: {self.failed!r}")

    async def _write_once(self, sync: bool) -> None:
        """Write the buffered records into the device (no flush), up to the oldest hold;
        `sync`: for a caller who goes on to flush (not counted in `writes`)."""
        end = self._writable_end()
        if end <= self.written_lsn:
            return
        data = bytes(self._buf[:end - self._buf_lsn])
        blocks = {}
        for i in range(0, len(data), self.bs):
            chunk = data[i:i + self.bs]
            lblock = (self._buf_lsn + i) // self.bs
            blocks[self.data_start + lblock % self.data_blocks] = chunk + bytes(self.bs - len(chunk))
        try:
            await self.device.write_blocks(blocks)
            crash_point("txn.log.written")
        except Exception as exc:
            self.failed = exc
            raise TxnManagerFailed(f"log write failed: {exc!r}") from exc
        self.written_lsn = max(self.written_lsn, end)
        if not sync:
            self.writes += 1
        self._trim(end)

    async def _sync_once(self) -> None:
        """Flush the device: what was written before is durable after."""
        end = self.written_lsn
        try:
            await self.device.flush()
            crash_point("txn.log.flushed")
        except Exception as exc:
            self.failed = exc
            raise TxnManagerFailed(f"log flush failed: {exc!r}") from exc
        self.flushes += 1
        self.durable_lsn = max(self.durable_lsn, end)

    def _trim(self, end: int) -> None:
        """Drop the buffered bytes that are in the device now (all but `end`'s block)."""
        keep_from = end - end % self.bs
        if keep_from > self._buf_lsn:
            del self._buf[:keep_from - self._buf_lsn]
            self._buf_lsn = keep_from
