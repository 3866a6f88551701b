"""`replfs mkfs`, `replfs mount --local`, `replfs umount`: a local (unreplicated)
filesystem on one RAID-5 array, mounted with pyfuse3."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
from functools import partial

import trio

from replfs.errors import ReplfsError
from replfs.raid import parse_size
from replfs.tools.mount_helper import parse_mount_options
from replfs.tools.mountpoints import is_mounted, ready_failer, spawn_ready

log = logging.getLogger("replfs.mount")

# Seconds within which an operation that returned is on stable storage even without
# fsync (like ext4's commit interval, which is 5 s).
FLUSH_BEHIND = 1.0

# The kernel's read-ahead window on a replfs mount, in KiB: a sequential read then
# reaches the filesystem as requests of 1 MiB (libfuse's largest, 256 pages) instead of
# 128 KiB (the kernel's default window), a quarter of the round trips to a primary.
# FUSE's max_readahead option can only lower the default; the window is the mount's
# backing-device setting in sysfs, which only root may change.
READAHEAD_KIB = 1024


def register(sub) -> None:
    p = sub.add_parser("mkfs", help="make a RAID-5 array and a filesystem on it in DIR")
    p.add_argument("dir")
    p.add_argument("--disks", type=int, default=4, help="disks in the array (default 4)")
    p.add_argument("--size", default="256M", help="size of each disk image (default 256M)")
    p.add_argument("--chunk", default="64K", help="RAID chunk size (default 64K)")
    p.add_argument("--force", action="store_true", help="overwrite an existing filesystem")
    p.set_defaults(func=cmd_mkfs)

    p = sub.add_parser("mount", help="mount a cluster's filesystem (or, --local, one array's)")
    p.add_argument("--local", action="store_true",
                   help="serve the filesystem in this process from the array in DIR "
                        "(without it, DIR is a cluster and this is its replicated client)")
    p.add_argument("dir")
    p.add_argument("mountpoint")
    p.add_argument("--daemon", action="store_true", help="return once mounted")
    p.add_argument("--allow-other", action="store_true", help="let other users in (FUSE allow_other)")
    p.add_argument("-o", dest="options", metavar="OPTIONS", default=None,
                   help="mount options, comma-separated as for mount(8): allow_other, ro, "
                        "noatime, nodev, nosuid, noexec, ...")
    add_checksum_cache(p, "with --local: ")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="unmount a replfs mount")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)


def cmd_mkfs(args) -> int:
    from replfs.fs.mkfs import mkfs
    from replfs.raid import create_array, open_array

    from replfs.replication.config import CONFIG as CLUSTER_CONFIG

    has_array = os.path.exists(os.path.join(args.dir, "array.json"))
    if os.path.exists(os.path.join(args.dir, CLUSTER_CONFIG)):
        raise ReplfsError(f"{args.dir} is a replfs cluster, whose servers' arrays `replfs "
                          f"init` made; give mkfs an empty or new directory")
    if has_array and not args.force:
        raise ReplfsError(f"{args.dir} already holds an array; add --force to destroy it "
                          "and make a new filesystem")
    if not has_array and _holds_files(args.dir):
        raise ReplfsError(f"{args.dir} is not empty; give mkfs an empty or new directory")
    disk_size, chunk = parse_size(args.size), parse_size(args.chunk)
    before = set(os.listdir(args.dir)) if os.path.isdir(args.dir) else None

    async def go():
        if has_array:
            array = open_array(args.dir)
        else:
            array = create_array(args.dir, args.disks, disk_size, chunk)
        try:
            sb = await mkfs(array)
        finally:
            array.close()
        print(f"replfs: made a filesystem on {args.dir}: {sb.nblocks} blocks of 4 KiB "
              f"({sb.nblocks * 4096 // 2**20} MiB), {sb.ninodes} inodes, "
              f"{sb.log_blocks * 4 // 1024} MiB of log")
    try:
        trio.run(go)
    except BaseException:
        if not has_array:
            remove_new_files(args.dir, before)
        raise
    return 0


def _holds_files(dirpath: str) -> bool:
    """Whether `dirpath` exists and holds anything (a filesystem's own lost+found aside)."""
    try:
        return bool(set(os.listdir(dirpath)) - {"lost+found"})
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise ReplfsError(f"{dirpath} is a file, not a directory; give a new or empty "
                          f"directory") from None


def remove_new_files(dirpath: str, before: set[str] | None) -> None:
    """Undo a command that failed after it began writing in `dirpath`: remove what it
    made there -- everything but the names in `before`, or `dirpath` itself if `before`
    is None (it did not exist)."""
    import shutil
    if before is None:
        shutil.rmtree(dirpath, ignore_errors=True)
        return
    for name in set(os.listdir(dirpath)) - before:
        p = os.path.join(dirpath, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _check_mountpoint(mnt: str) -> None:
    """ReplfsError unless `mnt` is an existing directory on which nothing is mounted."""
    if not os.path.lexists(mnt):
        raise ReplfsError(f"mount point {mnt} does not exist; create it with `mkdir -p {mnt}`")
    if not os.path.isdir(mnt):
        raise ReplfsError(f"mount point {mnt} is not a directory; give a directory")
    if is_mounted(mnt):
        raise ReplfsError(f"{mnt} is already mounted; unmount it first (replfs umount {mnt})")


def cmd_mount(args) -> int:
    allow_other, options = parse_mount_options(args.options)
    args.allow_other = args.allow_other or allow_other
    cache = checksum_cache(args)
    if not args.local:
        if args.checksum_cache:
            raise ReplfsError("--checksum-cache is for `replfs mount --local` (the servers of "
                              "a cluster hold its arrays: `replfs server --checksum-cache`)")
        from replfs.tools.cluster_cmd import cmd_mount as cmd_mount_cluster
        return cmd_mount_cluster(args)
    _check_mountpoint(args.mountpoint)
    if not os.path.exists(os.path.join(args.dir, "array.json")):
        raise ReplfsError(f"{args.dir} holds no replfs array; make one with `replfs mkfs {args.dir}`")
    if args.daemon:
        return _daemonize(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(partial(serve_local, args.dir, args.mountpoint, args.allow_other, args.ready_fd,
                     options=options, checksum_cache=cache))
    return 0


def mount_argv(args) -> list[str]:
    """The flags of `replfs mount` that a detached child of `args` must get again."""
    return ((["--allow-other"] if args.allow_other else [])
            + (["-o", args.options] if args.options else [])
            + (["--checksum-cache", args.checksum_cache]
               if getattr(args, "checksum_cache", None) else []))


def add_checksum_cache(p, scope: str = "") -> None:
    """The `--checksum-cache SIZE` option of the commands that hold an array open."""
    p.add_argument("--checksum-cache", metavar="SIZE", default=None,
                   help=f"{scope}memory for the array's checksums (default 16M: all of them "
                        f"for 16 GiB of disks; beyond that the least recently used are read "
                        f"again from the disks)")


def checksum_cache(args) -> int:
    """The bytes `--checksum-cache` asks for (the default if not given)."""
    from replfs.raid import DEFAULT_CHECKSUM_CACHE
    if not getattr(args, "checksum_cache", None):
        return DEFAULT_CHECKSUM_CACHE
    return parse_size(args.checksum_cache)


def _daemonize(args) -> int:
    argv = ["mount", "--local", os.path.abspath(args.dir), os.path.abspath(args.mountpoint),
            *mount_argv(args)]
    logpath = os.path.join(args.dir, "mount.log")
    pid = spawn_ready(argv, logpath)
    print(f"replfs: mounted {args.dir} on {args.mountpoint} (pid {pid}, log {logpath})")
    return 0


async def serve_local(dirpath: str, mnt: str, allow_other: bool = False,
                      ready_fd: int | None = None, options=frozenset(),
                      checksum_cache: int | None = None) -> None:
    """Open the array in `dirpath`, mount its filesystem on `mnt`, serve until
    unmounted or signalled; always closes the filesystem and the array."""
    from replfs.fs.fuse_ops import Operations
    from replfs.fs.mkfs import open_fs
    from replfs.raid import DEFAULT_CHECKSUM_CACHE, open_array

    fail = ready_failer(ready_fd)
    try:
        array = open_array(dirpath, checksum_cache=checksum_cache or DEFAULT_CHECKSUM_CACHE)
    except ReplfsError as exc:
        fail(str(exc))
    history = None
    if os.environ.get("REPLFS_HISTORY"):
        # tests: record every transaction's reads and writes, dumped at unmount
        from replfs.txn import HistoryRecorder
        history = HistoryRecorder()
    try:
        try:
            fs = await open_fs(array, history=history)
        except ReplfsError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"cannot open the filesystem in {dirpath}: {exc}. The array cannot repair "
                 f"this; see `replfs raid status {dirpath}`, then `replfs raid scrub` or "
                 f"`replfs fsck --repair`")
        try:
            await serve_fuse(Operations(fs), mnt, allow_other=allow_other, ready_fd=ready_fd,
                             fail=fail, options=options, source=os.path.abspath(dirpath),
                             background=[partial(fs.mgr.flush_behind, FLUSH_BEHIND)])
        finally:
            await fs.close()
            if history is not None:
                history.dump(os.environ["REPLFS_HISTORY"])
    finally:
        array.close()
        log.info("unmounted %s", mnt)


async def serve_fuse(ops, mnt: str, *, allow_other: bool, ready_fd: int | None, fail,
                     background=(), options=frozenset(), source: str = "replfs") -> None:
    """Mount `ops` (a pyfuse3 Operations) on `mnt` with the replfs options (and
    `options`, libfuse's generic mount flags: see mount_helper.FUSE_OPTIONS), named
    `source` in the mount table (the directory mounted: so `mount -a` knows an fstab
    line as mounted, and `df` shows what is), write "ready"
    to `ready_fd`, and serve until unmounted or signalled (SIGINT, SIGTERM, SIGHUP),
    running each of `background` beside it; always unmounts. `fail(msg)` reports a mount
    that cannot be made (it raises)."""
    import pyfuse3

    fsname = source.replace("\\", "\\\\").replace(",", "\\,")    # libfuse's escapes
    options = (set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=replfs"}
               | set(options))
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, mnt, options)
    except RuntimeError as exc:
        fail(f"cannot mount on {mnt}: {exc}")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_on_signal, nursery)
            nursery.start_soon(set_readahead, mnt)
            for fn in background:
                nursery.start_soon(fn)
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            log.info("mounted on %s", mnt)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


async def set_readahead(mnt: str, kib: int = READAHEAD_KIB) -> bool:
    """Set the kernel's read-ahead window of the FUSE mount on `mnt`, served by this
    process, to `kib` KiB; whether it could (it takes root). Run it beside
    `pyfuse3.main()`: the stat of `mnt` that finds the mount's device returns once the
    kernel's INIT exchange is done, whose reply would otherwise set the window back."""
    def set_it() -> bool:
        try:
            st = os.stat(mnt)
            with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/"
                      f"read_ahead_kb", "w") as f:
                f.write(f"{kib}\n")
        except OSError as exc:
            log.info("read-ahead of %s left as the kernel set it: %s", mnt, exc)
            return False
        return True
    return await trio.to_thread.run_sync(set_it, abandon_on_cancel=True)


async def _on_signal(nursery) -> None:
    import pyfuse3
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
        async for _ in sigs:
            pyfuse3.terminate()
            return


def cmd_umount(args) -> int:
    mnt = args.mountpoint
    if not os.path.isdir(mnt) and not is_mounted(mnt):
        raise ReplfsError(f"{mnt} is not a directory")
    if not is_mounted(mnt):
        raise ReplfsError(f"{mnt} is not mounted")
    r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        raise ReplfsError(f"cannot unmount {mnt}: {r.stderr.strip()} (files still open? "
                          f"close them, or use `fusermount3 -u -z {mnt}`)")
    return 0
