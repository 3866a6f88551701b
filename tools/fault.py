"""`replfs fault ...`: the fault-injection toolbox.

Each fault is a subcommand registered by its own `_register_<name>(fsub)` function below;
later layers add theirs (`kill`, `partition`, `heal`) the same way, to `FAULTS`.

- `corrupt IMAGE`: flip bits or zero byte ranges in chosen areas of one disk image,
  reproducibly from `--seed`, and print every block it hit.
- `fail-disk DIR --disk K [--remove]`: mark a member failed (and delete its image); with
  a cluster (or its mount) and `--server S`, or DIR/S of a running server, S does it
  while it serves (tools/raid_online.py).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np

from replfs.errors import ReplfsError
from replfs.raid import open_array
from replfs.raid import superblock as sbmod
from replfs.raid.layout import BLOCK_SIZE, Geometry, make_geometry

AREAS = ("data", "parity", "checksum", "superblock", "bitmap", "any")


@dataclass
class Hit:
    pblock: int
    area: str
    what: str  # e.g. "flipped 3 bits at bytes 17, 900, 3000"
    changed: bool

    def __str__(self) -> str:
        return f"block {self.pblock} [{self.area}]: {self.what}"


def _geometry_of(fd: int) -> tuple[Geometry | None, int]:
    got = sbmod.read_both(fd)
    if got.sb is None:
        return None, -1
    sb = got.sb
    return make_geometry(sb["ndisks"], sb["chunk"], sb["disk_blocks"]), sb["index"]


def _candidates(geo: Geometry, index: int, area: str) -> np.ndarray:
    if area == "superblock":
        return np.array([0, geo.disk_blocks - 1])
    if area == "bitmap":
        return np.arange(geo.bitmap_start, geo.bitmap_start + geo.bitmap_blocks)
    if area == "checksum":
        return np.arange(geo.cs_start, geo.cs_start + geo.cs_blocks)
    entries = np.arange(geo.entries)
    rows = entries // geo.cb
    parity = ((geo.ndisks - 1) - rows % geo.ndisks) == index
    if area == "parity":
        return geo.data_start + entries[parity]
    if area == "data":
        return geo.data_start + entries[~parity]
    return np.concatenate([_candidates(geo, index, a)
                           for a in ("superblock", "bitmap", "checksum", "data", "parity")])


def corrupt(image: str, count: int = 1, seed: int = 0, area: str = "any",
            mode: str = "mixed") -> list[Hit]:
    """Damage `count` distinct blocks of `image` in `area`; deterministic for a seed.
    Every hit changes the block (a zeroing that would change nothing flips bits instead).
    Raises ReplfsError on bad input; the image is untouched then."""
    if area not in AREAS:
        raise ReplfsError(f"unknown area {area!r}: choose one of {', '.join(AREAS)}")
    if mode not in ("flip", "zero", "mixed"):
        raise ReplfsError(f"unknown mode {mode!r}: choose flip, zero or mixed")
    if count < 1:
        raise ReplfsError(f"--count must be at least 1, not {count}")
    try:
        fd = os.open(image, os.O_RDWR)
    except OSError as exc:
        raise ReplfsError(f"cannot open {image}: {exc.strerror}") from None
    try:
        geo, index = _geometry_of(fd)
        if geo is None:
            if area != "any":
                raise ReplfsError(f"{image} has no readable replfs superblock, so its areas are "
                                  f"unknown; use --area any")
            nblocks = os.fstat(fd).st_size // BLOCK_SIZE
            cands = np.arange(nblocks)
        else:
            cands = _candidates(geo, index, area)
        if len(cands) == 0:
            raise ReplfsError(f"{image} has no blocks in area {area}")
        rng = random.Random(seed)
        picks = sorted(rng.sample(range(len(cands)), min(count, len(cands))))
        hits = []
        for i in picks:
            pb = int(cands[i])
            buf = bytearray(os.pread(fd, BLOCK_SIZE, pb * BLOCK_SIZE))
            if len(buf) < BLOCK_SIZE:
                continue
            label = geo.area_of(index, pb) if geo else "unknown"
            how = mode if mode != "mixed" else rng.choice(("flip", "zero"))
            what = ""
            if how == "zero":
                start = rng.randrange(BLOCK_SIZE)
                length = rng.randint(1, BLOCK_SIZE - start)
                if any(buf[start:start + length]):
                    buf[start:start + length] = bytes(length)
                    what = f"zeroed bytes {start}..{start + length - 1}"
            if not what:
                nbits = rng.randint(1, 8)
                positions = sorted(rng.sample(range(BLOCK_SIZE * 8), nbits))
                for p in positions:
                    buf[p // 8] ^= 1 << (p % 8)
                what = (f"flipped {nbits} bit{'s' if nbits > 1 else ''} at byte"
                        f"{'s' if nbits > 1 else ''} " + ", ".join(str(p // 8) for p in positions))
            os.pwrite(fd, buf, pb * BLOCK_SIZE)
            hits.append(Hit(pb, label, what, True))
        os.fsync(fd)
        return hits
    finally:
        os.close(fd)


def _run_corrupt(args) -> int:
    hits = corrupt(args.image, args.count, args.seed, args.area, args.mode)
    for h in hits:
        print(f"{args.image}: {h}")
    print(f"{args.image}: {len(hits)} blocks damaged (seed {args.seed}, area {args.area})")
    return 0


def _register_corrupt(fsub) -> None:
    p = fsub.add_parser("corrupt", help="flip bits / zero ranges of a disk image (seeded)")
    p.add_argument("image", help="disk image file")
    p.add_argument("--count", type=int, default=1, help="number of blocks to damage")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same damage)")
    p.add_argument("--area", choices=AREAS, default="any", help="where to damage")
    p.add_argument("--mode", choices=("flip", "zero", "mixed"), default="mixed",
                   help="flip bits, zero byte ranges, or both")
    p.set_defaults(func=_run_corrupt)


def _run_fail_disk(args) -> int:
    from replfs.tools import raid_online
    where = raid_online.target(args)
    if where is not None:
        cfg, server = where
        info = raid_online.ask(cfg, server, "fail-disk", disk=args.disk)
        path = info["array"]["disks"][args.disk]["path"]
        print(f"{server}: disk {args.disk} ({path}) marked failed; the array runs degraded "
              f"and the server goes on serving")
        _remove(args, path)
        return 0
    arr = open_array(args.dir)
    try:
        disk = arr.member(args.disk)
        path = disk.path
        arr.fail_disk(args.disk)
    finally:
        arr.close()
    print(f"disk {args.disk} ({path}) marked failed; the array runs degraded")
    _remove(args, path)
    return 0


def _remove(args, path: str) -> None:
    if args.remove:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        print(f"removed {path}")


def _register_fail_disk(fsub) -> None:
    p = fsub.add_parser("fail-disk", help="mark an array member failed")
    p.add_argument("dir", help="array directory (or a cluster directory with --server)")
    p.add_argument("--disk", type=int, required=True, help="member index")
    p.add_argument("--remove", action="store_true", help="also delete its image")
    p.add_argument("--server", help="fail the disk in this running server of the cluster DIR "
                                    "(while it serves); also implied by DIR/S of a running "
                                    "server")
    p.set_defaults(func=_run_fail_disk)


FAULTS = [_register_corrupt, _register_fail_disk]

# --- replication faults (issue 5): kill, partition, loss, heal -- see tools/fault_net.py
from replfs.tools.fault_net import FAULTS as _NET_FAULTS  # noqa: E402

FAULTS += _NET_FAULTS
# --- end of replication faults


def register(sub) -> None:
    p = sub.add_parser("fault", help="inject faults (corrupt images, fail disks, ...)")
    fsub = p.add_subparsers(dest="fault", metavar="FAULT")
    fsub.required = True
    for reg in FAULTS:
        reg(fsub)
