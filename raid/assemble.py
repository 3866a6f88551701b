"""Making and assembling arrays: `create_array`, `open_array`, `inspect_array`.

Assembly reads every configured member's superblocks and checks its identity (array uuid,
index, event counter against the freshest superblock's member table). A member that is
missing, damaged, foreign, misplaced or stale is excluded and named; with more than one
excluded the array does not start. After an unclean stop the write-intent bitmap's rows
are resynchronised before the array is handed out (see array.py and bitmap.py).
"""

from __future__ import annotations

import os
import stat
import uuid as uuidlib

import crc32c
import numpy as np

from . import superblock as sbmod
from .array import DEFAULT_CHECKSUM_CACHE, Array
from .dirfiles import CONFIG_NAME, load_config, lock_dir, read_state, resolve, write_json
from .errors import RaidError, WriteHole
from .layout import BLOCK_SIZE, make_geometry
from .member import Disk, DiskGone, disk_size


def create_array(dirpath: str | os.PathLike, ndisks: int, disk_size: int,
                 chunk: int = 64 * 1024, disks: list[str] | None = None,
                 checksum_cache: int = DEFAULT_CHECKSUM_CACHE) -> Array:
    """Create a new array in `dirpath`: N image files `disk<i>.img` of `disk_size` bytes
    (or the given `disks` paths, e.g. block devices), superblocks, bitmaps and checksum
    areas. Returns the open Array, keeping at most `checksum_cache` bytes of checksums in
    memory. Raises RaidError if it cannot (and leaves no config)."""
    dirpath = os.fspath(dirpath)
    if ndisks < 3:
        raise RaidError(f"RAID-5 needs at least 3 disks, not {ndisks}")
    if disks is not None and len(disks) != ndisks:
        raise RaidError(f"{len(disks)} disk paths given for {ndisks} disks")
    try:
        geo = make_geometry(ndisks, chunk, disk_size // BLOCK_SIZE)
    except ValueError as exc:
        raise RaidError(str(exc)) from None
    os.makedirs(dirpath, exist_ok=True)
    if os.path.exists(os.path.join(dirpath, CONFIG_NAME)):
        raise RaidError(f"{dirpath} already holds an array ({CONFIG_NAME}); choose an empty "
                        f"directory or remove the old array first")
    paths = list(disks) if disks else [f"disk{i}.img" for i in range(ndisks)]
    lockfd = lock_dir(dirpath)
    uid = str(uuidlib.uuid4())
    cfg = {"format": 1, "uuid": uid, "ndisks": ndisks, "chunk": chunk,
           "disk_size": geo.disk_blocks * BLOCK_SIZE, "disks": paths}
    members = []
    try:
        for i, p in enumerate(paths):
            full = resolve(dirpath, p)
            if disks is None and os.path.exists(full):
                raise RaidError(f"{full} already exists; refusing to overwrite it")
            d = Disk(i, full)
            try:
                d.fd = os.open(full, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RaidError(f"cannot create {full}: {exc.strerror}") from None
            st = os.fstat(d.fd)
            if stat.S_ISREG(st.st_mode):
                os.ftruncate(d.fd, 0)
                os.ftruncate(d.fd, geo.disk_blocks * BLOCK_SIZE)
            else:
                size = disk_size(d.fd)
                if size < geo.disk_blocks * BLOCK_SIZE:
                    raise RaidError(f"{full} has {size} bytes, less than --size "
                                    f"{geo.disk_blocks * BLOCK_SIZE}")
                zero = bytes(1 << 20)
                off = geo.data_start * BLOCK_SIZE
                end = (geo.data_start + geo.entries) * BLOCK_SIZE
                while off < end:
                    off += os.pwrite(d.fd, zero[:end - off], off)
            d.state = "active"
            members.append(d)
        arr = Array(dirpath, cfg, geo, members, events=0, lockfd=lockfd,
                    checksum_cache=checksum_cache)
        zero_crc = crc32c.crc32c(bytes(BLOCK_SIZE))
        for d in members:
            d.cs = arr._new_store(d)
            if not d.cs.format(zero_crc):
                raise RaidError(f"cannot write the checksum area of {d.path}: {d.problem}")
        arr._write_bitmap(sync=False)
        arr._write_superblocks(state="dirty", sync=True)
        write_json(os.path.join(dirpath, CONFIG_NAME), cfg)
        return arr
    except BaseException:
        for d in members:
            d.close()
        os.close(lockfd)
        raise


class _Member:
    """What assembling found about one configured disk."""

    def __init__(self, index: int, path: str):
        self.index = index
        self.path = path
        self.fd: int | None = None
        self.sb: dict | None = None
        self.problem = ""
        self.damaged_copies: list[str] = []


def _examine(dirpath: str, cfg: dict, writable: bool) -> tuple[list[_Member], dict | None]:
    members = []
    for i, p in enumerate(cfg["disks"]):
        m = _Member(i, resolve(dirpath, p))
        members.append(m)
        try:
            m.fd = os.open(m.path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            m.problem = "image not found"
            continue
        except OSError as exc:
            m.problem = f"cannot open: {exc.strerror}"
            continue
        try:
            got = sbmod.read_both(m.fd)
        except OSError as exc:
            m.problem = f"cannot read superblock: {exc.strerror}"
            continue
        if got.sb is None:
            m.problem = f"no valid superblock: {got.problem}"
            continue
        sb = got.sb
        if sb.get("uuid") != cfg["uuid"]:
            m.problem = (f"belongs to another array (uuid {sb.get('uuid')}, this array is "
                         f"{cfg['uuid']})")
            continue
        if sb.get("index") != i:
            m.problem = (f"is disk {sb.get('index')} of this array but is listed as disk {i} "
                         f"in {CONFIG_NAME}: disks are in the wrong order")
            continue
        size = disk_size(m.fd)
        if size < sb["disk_blocks"] * BLOCK_SIZE:
            m.problem = (f"image is {size} bytes, a member needs {sb['disk_blocks'] * BLOCK_SIZE}"
                         f" (truncated?); rebuild it")
            continue
        m.sb = sb
        m.damaged_copies = got.damaged
    good = [m for m in members if m.sb]
    fresh = max((m.sb for m in good), key=lambda s: s["events"], default=None)
    if fresh is not None:
        table = fresh["members"]
        for m in good:
            entry = table[m.index]
            if entry["state"] in ("failed", "missing"):
                m.problem = (f"stale: the array went on without it (its events "
                             f"{m.sb['events']}, array's {fresh['events']}); rebuild it")
                m.sb = None
            elif entry["state"] == "active" and m.sb["events"] < fresh["events"] - 1:
                m.problem = (f"stale: event counter {m.sb['events']} < array's "
                             f"{fresh['events']} (an old copy?); rebuild it")
                m.sb = None
    return members, fresh


def open_array(dirpath: str | os.PathLike, *, force: bool = False, zero_lost: bool = False,
               checksum_cache: int = DEFAULT_CHECKSUM_CACHE) -> Array:
    """Assemble the array in `dirpath` for reading and writing. Missing, damaged, foreign,
    misplaced or stale members are named in `status()["notices"]`; with one of them the
    array runs degraded; with more, RaidError says which and why. After an unclean stop
    the write-intent bitmap's rows are resynchronised before this returns; while
    degraded that is the write hole (WriteHole), unless `force` (those rows' blocks of
    the missing disk are then unreadable) or `zero_lost` (they are zeroed, and their
    rows made whole: `zeroed` counts them). At most `checksum_cache` bytes of checksums
    are kept in memory (checksums.py)."""
    dirpath = os.fspath(dirpath)
    cfg = load_config(dirpath)
    lockfd = lock_dir(dirpath)
    members: list[_Member] = []
    try:
        members, fresh = _examine(dirpath, cfg, writable=True)
        bad = [m for m in members if m.sb is None]
        if fresh is None or len(bad) > 1:
            raise RaidError(
                f"array {dirpath} cannot start: {len(bad)} of {len(members)} disks are "
                f"unusable and RAID-5 survives the loss of only one:\n" +
                "\n".join(f"  disk {m.index} ({m.path}): {m.problem}" for m in bad) +
                "\nRestore the missing images (or fix the order in "
                f"{os.path.join(dirpath, CONFIG_NAME)}) and try again.", exit_code=3)
        try:
            geo = make_geometry(fresh["ndisks"], fresh["chunk"], fresh["disk_blocks"])
        except ValueError as exc:
            raise RaidError(f"array {dirpath}: superblock geometry is invalid: {exc}") from None
        table = fresh["members"]
        disks = []
        for m in members:
            d = Disk(m.index, m.path)
            entry = table[m.index]
            for key in ("read_errors", "write_errors", "cksum_errors", "unrecoverable"):
                setattr(d, key, int(entry.get(key, 0)))
            if m.sb is not None:
                d.fd = m.fd
                m.fd = None
                if entry["state"] == "rebuilding":
                    d.state = "rebuilding"
                    d.rebuild_pos = d.durable_pos = int(entry.get("rebuild_pos", 0))
                    d.problem = "rebuild interrupted; run `replfs raid rebuild` again"
                else:
                    d.state = "active"
            else:
                d.state = "failed" if m.fd is not None else "missing"
                d.problem = m.problem
                if m.fd is not None:
                    os.close(m.fd)
                    m.fd = None
            disks.append(d)
        arr = Array(dirpath, cfg, geo, disks, events=fresh["events"], lockfd=lockfd,
                    checksum_cache=checksum_cache)
        lockfd = -1
    except BaseException:
        for m in members:
            if m.fd is not None:
                os.close(m.fd)
        if lockfd >= 0:
            os.close(lockfd)
        raise
    try:
        _assemble(arr, members, fresh, force, zero_lost)
    except BaseException:
        arr._closed = True
        for d in arr.disks:
            d.close()
        arr._pool.shutdown(wait=False)
        arr._fan.close()
        os.close(arr._lockfd)
        arr._bitmap.close()
        raise
    return arr


def _assemble(arr: Array, members: list[_Member], fresh: dict, force: bool,
              zero_lost: bool = False) -> None:
    g = arr.geo
    for m in members:
        if m.damaged_copies:
            arr.notices.append(f"disk {m.index}: superblock copy {', '.join(m.damaged_copies)} "
                               f"was damaged; the other copy was used and both are rewritten")
        if m.problem:
            arr.notices.append(f"disk {m.index} ({m.path}): {m.problem}")
    a_rebuilding = [d for d in arr.disks if d.state == "rebuilding"]
    if a_rebuilding and any(d.state not in ("active", "rebuilding") for d in arr.disks):
        raise RaidError(f"array {arr.dir} cannot start: disk {a_rebuilding[0].index} was being "
                        f"rebuilt and another disk is unusable", exit_code=3)
    dirty = fresh.get("state") != "clean"
    # the bitmap file is the durable copy; the members' copies may add bits (harmless)
    bits = arr._bitmap.read_file() if dirty else np.zeros(g.nregions, dtype=bool)
    damaged: dict[int, list[int]] = {}   # disk -> its damaged checksum blocks
    for d in arr.disks:
        if d.fd is None:
            continue
        try:
            if dirty and d.state == "active":
                bits |= arr._read_bitmap(d)
            damaged[d.index] = arr._load_checksums(d)
        except DiskGone:
            continue
        if damaged[d.index]:
            arr.notices.append(f"disk {d.index}: {len(damaged[d.index])} checksum blocks were "
                               f"damaged; their blocks are verified against parity and "
                               f"rewritten")
    rows = [r for reg in np.nonzero(bits)[0].tolist()
            for r in range(reg * g.region_rows, min(g.rows, (reg + 1) * g.region_rows))]
    degraded = any(d.state != "active" for d in arr.disks)
    lost_rows: list[int] = []
    if rows and degraded:
        missing = [d for d in arr.disks if d.state != "active"][0]
        # below a rebuilding disk's recorded position every member holds its rows (and
        # writes since went to all of them): those resynchronise as if not degraded
        below = missing.durable_pos if missing.state == "rebuilding" else 0
        lost_rows = [r for r in rows if r >= below and g.parity_disk(r) != missing.index]
        rows = [r for r in rows if r < below or g.parity_disk(r) == missing.index]
    if lost_rows and not zero_lost:
        if not force:
            raise WriteHole(
                f"array {arr.dir} was not shut down cleanly and disk {missing.index} "
                f"({missing.path}) is {missing.state}: {len(lost_rows)} chunk rows may have "
                f"been mid-write (the RAID-5 write hole), so blocks of disk {missing.index} cannot "
                f"be rebuilt safely there. Bring disk {missing.index} back and open again, or "
                f"open with force (`--force`) to serve everything else and report those "
                f"blocks as unreadable.", exit_code=3)
        arr._untrusted_rows = set(lost_rows)
        arr._bitmap.bits = bits
        # checksums of the present disks must match whatever data landed
        for row in lost_rows:
            for d in arr.disks:
                if d.state == "active":
                    e0 = row * g.cb
                    buf = arr._pread(d, g.data_start + e0, g.cb)
                    d.cs.set_from(e0, buf, g.cb)
        arr.notices.append(f"unclean stop while degraded: {len(lost_rows)} rows untrusted")
    with arr._lock:
        arr._write_superblocks(state="dirty", sync=True)
        if lost_rows and zero_lost:
            _resync(arr, lost_rows, zeros=missing.index)
            arr.zeroed = len(lost_rows) * g.cb
            arr.notices.append(f"unclean stop while degraded: {len(lost_rows)} rows may "
                               f"have been mid-write; the {arr.zeroed} blocks of disk "
                               f"{missing.index} there are lost and now read as zeros")
        if rows:
            arr.stats["resynced_rows"] = _resync(arr, rows)
            arr.notices.append(f"unclean stop: resynchronised {len(rows)} chunk rows "
                               f"named by the write-intent bitmap")
        _repair_unknown_checksums(arr, damaged)
        arr._write_checksums()
        arr._fsync_disks()
        if not arr._untrusted_rows:
            arr._bitmap.bits[:] = False
            arr._write_bitmap(sync=True)
        else:
            arr._write_bitmap(sync=True)


def _resync(arr: Array, rows: list[int], zeros: int | None = None) -> int:
    """Make the given rows consistent after an unclean stop: checksums from the data
    found, parity from the data. Needs every member -- but member `zeros`, whose data
    chunks in these rows are taken (and written, if it is being rebuilt) as zeros."""
    g = arr.geo
    for row in rows:
        e0 = row * g.cb
        pd = g.parity_disk(row)
        acc = np.zeros(g.chunk, dtype=np.uint8)
        for d in range(g.ndisks):
            if d == pd:
                continue
            disk = arr.disks[d]
            if d == zeros:
                arr._write_seg(d, e0, bytes(g.chunk))
                continue
            buf = arr._pread(disk, g.data_start + e0, g.cb)
            acc ^= np.frombuffer(buf, dtype=np.uint8)
            disk.cs.set_from(e0, buf, g.cb)
        arr._write_seg(pd, e0, acc.data)
    return len(rows)


def _repair_unknown_checksums(arr: Array, damaged: dict[int, list[int]]) -> int:
    """Entries whose checksum block was damaged (`damaged`: disk -> checksum blocks):
    check each block against the stripe, repair it if needed, and recompute the
    checksum."""
    g = arr.geo
    fixed = 0
    for disk in arr.disks:
        if disk.cs is None or disk.state != "active" or not damaged.get(disk.index):
            continue
        rows: set[int] = set()
        for j in damaged[disk.index]:
            a, b = disk.cs.page_entries(j)
            rows.update(range(a // g.cb, (b - 1) // g.cb + 1))
        # by runs of whole chunks
        for row in sorted(rows):
            e0 = row * g.cb
            cache: dict = {}
            _, lost = arr._get(cache, disk.index, e0, e0 + g.cb)
            fixed += 1
            if lost:
                arr.notices.append(
                    f"disk {disk.index}: checksums of row {row} were damaged and "
                    f"{len(lost)} blocks cannot be verified (degraded stripe)")
    return fixed


def inspect_array(dirpath: str | os.PathLike) -> dict:
    """Status of an array read from its superblocks and state file without opening it
    (no lock taken, nothing written): for `replfs raid status` while another process
    holds the array."""
    dirpath = os.fspath(dirpath)
    cfg = load_config(dirpath)
    members, fresh = _examine(dirpath, cfg, writable=False)
    for m in members:
        if m.fd is not None:
            os.close(m.fd)
    if fresh is None:
        raise RaidError(f"array {dirpath}: no disk has a valid superblock:\n" + "\n".join(
            f"  disk {m.index} ({m.path}): {m.problem}" for m in members), exit_code=3)
    geo = make_geometry(fresh["ndisks"], fresh["chunk"], fresh["disk_blocks"])
    table = fresh["members"]
    disks = []
    for m in members:
        entry = table[m.index]
        state = entry["state"] if m.sb is not None else (
            "missing" if m.problem == "image not found" else "failed")
        info = {"index": m.index, "path": m.path, "state": state, "problem": m.problem,
                **{k: int(entry.get(k, 0)) for k in
                   ("read_errors", "write_errors", "cksum_errors", "unrecoverable")}}
        if state == "rebuilding":
            info["rebuild_progress"] = round(entry.get("rebuild_pos", 0) / geo.rows, 4)
        disks.append(info)
    nbad = sum(1 for d in disks if d["state"] != "active")
    health = "healthy" if nbad == 0 else "failed" if nbad > 1 else (
        "rebuilding" if any(d["state"] == "rebuilding" for d in disks) else "degraded")
    notices = [f"disk {m.index}: superblock copy {', '.join(m.damaged_copies)} is damaged"
               for m in members if m.damaged_copies]
    return {"dir": dirpath, "uuid": cfg["uuid"], "health": health, "ndisks": geo.ndisks,
            "chunk": geo.chunk, "block_size": BLOCK_SIZE, "nblocks": geo.nblocks,
            "size_bytes": geo.nblocks * BLOCK_SIZE, "events": fresh["events"],
            "clean": fresh.get("state") == "clean", "disks": disks,
            "scrub": read_state(dirpath).get("scrub"), "notices": notices}
