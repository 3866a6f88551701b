"""mount(8) and /etc/fstab for replfs: `mount -t fuse.replfs SOURCE MNT [-o OPTIONS]`.

mount(8) hands a `fuse.TYPE` mount to `mount.fuse3` (Debian's fuse3), which drops the
options meant for mount itself (`_netdev`, `nofail`, `x-*`, ...) and runs, through
`/bin/sh -c` with PATH `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,

    TYPE SOURCE MOUNTPOINT -o OPTIONS          e.g.  replfs /srv/c /mnt -o rw,allow_other,dev,suid

and waits for it to exit. So `replfs` (linked into /usr/local/bin by tools/bootstrap.sh)
takes that form -- a first argument that is a directory and no subcommand -- and turns
it into `replfs mount [--local] SOURCE MOUNTPOINT --daemon -o OPTIONS`: it returns once
the filesystem is mounted, the mount served by a detached process that `umount MNT`
ends. SOURCE is a cluster directory (`replfs init`: the replicated client) or an array
directory (`replfs mkfs`: a local mount). An /etc/fstab line:

    /srv/replfs-cluster  /mnt/replfs  fuse.replfs  allow_other,_netdev  0  0
"""

from __future__ import annotations

import os

from replfs.errors import ReplfsError

# Passed on to libfuse (and so to the kernel): the generic mount flags.
FUSE_OPTIONS = frozenset({
    "ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
    "relatime", "strictatime", "nodiratime", "sync", "async", "dirsync",
    "default_permissions",
})
# Meant for mount(8) or fstab's readers, not for the filesystem: dropped.
MOUNT_ONLY = frozenset({"defaults", "auto", "noauto", "user", "nouser", "users", "owner",
                        "group", "_netdev", "nofail"})


def parse_mount_options(text: str | None) -> tuple[bool, frozenset[str]]:
    """`-o` OPTIONS, comma-separated as mount(8) gives them: (allow_other, the options
    to pass to libfuse). ReplfsError naming an option replfs does not take."""
    allow_other, fuse = False, set()
    for opt in (text or "").split(","):
        opt = opt.strip()
        if not opt or opt in MOUNT_ONLY or opt.startswith(("x-", "comment=")):
            continue
        if opt == "allow_other":
            allow_other = True
        elif opt in FUSE_OPTIONS:
            fuse.add(opt)
        else:
            raise ReplfsError(f"unknown mount option {opt!r}: replfs takes allow_other, ro "
                              f"and the generic ones ({', '.join(sorted(FUSE_OPTIONS - {'ro'}))})")
    if {"ro", "rw"} <= fuse:
        fuse.discard("rw")          # mount(8)'s rule: the last wins; ro is the safe reading
    return allow_other, frozenset(fuse)


def helper_argv(args: list[str]) -> list[str]:
    """`SOURCE MOUNTPOINT [-o OPTIONS]... [-n] [-s] [-v]` (mount.fuse3's call) as the
    argument list of `replfs mount ... --daemon`. ReplfsError if it is not that form or
    SOURCE is neither a cluster nor an array."""
    from replfs.replication.config import CONFIG
    from replfs.raid.dirfiles import CONFIG_NAME as ARRAY_CONFIG

    positional, options = [], []
    it = iter(args)
    for a in it:
        if a == "-o":
            options.append(next(it, ""))
        elif a.startswith("-o"):
            options.append(a[2:])
        elif a in ("-n", "-s", "-v"):        # no mtab, sloppy, verbose: nothing to do
            continue
        elif a.startswith("-"):
            raise ReplfsError(f"unknown flag {a} for the mount form `replfs SOURCE "
                              f"MOUNTPOINT -o OPTIONS`; see `replfs --help` for the commands")
        else:
            positional.append(a)
    if len(positional) != 2:
        raise ReplfsError(f"{args[0]} is no replfs command; the mount form (as mount(8) runs "
                          f"it) is `replfs SOURCE MOUNTPOINT -o OPTIONS`; see `replfs --help`")
    source, mnt = positional
    opts = ",".join(o for o in options if o)
    parse_mount_options(opts)                # refuse a bad option before anything starts
    if os.path.exists(os.path.join(source, CONFIG)):
        local = []
    elif os.path.exists(os.path.join(source, ARRAY_CONFIG)):
        local = ["--local"]
    else:
        raise ReplfsError(f"{source} holds neither a replfs cluster nor an array; make one "
                          f"with `replfs init {source}` (or `replfs mkfs {source}`)")
    return ["mount", *local, source, mnt, "--daemon", *(["-o", opts] if opts else [])]
