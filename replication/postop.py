"""Post-operation attributes, as NFSv3's wcc data (its "after" half): the reply to an
update carries the attributes of the inodes it changed, so that the client need not ask
for them again.

The server side is `attrs_after`: once an update has committed and its backup holds
it, read the committed attributes of the inodes it changed (a getattr of committed
state, normally answered from the filesystem's cache of recently committed inodes).

The client side holds two small caches, both bounded in time by `ttl` -- no longer than
the kernel's own attribute timeout (fs/fuse_ops.py ATTR_TIMEOUT), so that a mount sees
another mount's changes no later than the kernel's cache already allows:

- `PostOpAttrs`: ino -> (attributes, when the reply arrived), each entry answered at
  most once (to the kernel's getattr right after the operation: it drops a directory's
  attributes after every change in it) and only while younger than `ttl`. An update
  whose reply overlapped another update of the same inode leaves nothing behind (which
  of the two replies is newer is not known).
- `NoXattrs`: inodes known to have no extended attributes (just created; a listxattr
  that came back empty) or not one of a given name (a getxattr that answered ENODATA),
  so that the kernel's `security.capability` probe before the first write to a file
  costs no round trip. The client's own setxattr or removexattr forgets the inode.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from replfs.fs.core import Attr
from replfs.fs.errors import FsError
from replfs.fs.layout import ino_group

log = logging.getLogger("replfs.postop")

# methods whose value is a new inode's Attr: it has no extended attributes yet
CREATES = frozenset({"create", "mknod", "mkdir", "symlink"})
CAP = 4096          # entries kept at most by each cache


def changed_inodes(method: str, args) -> list[int]:
    """The inodes (other than a new one, whose attributes are the reply's value) whose
    attributes the update `method(*args)` changes, by its arguments; [] for anything
    that is not such an update (reads, forget, fsync, 2PC messages)."""
    try:
        if method in CREATES or method in ("unlink", "rmdir"):
            inos = [args[0]]                    # the parent directory
        elif method == "rename":                # both directories
            inos = [args[0], args[2]]
        elif method == "link":                  # the inode and the new parent
            inos = [args[0], args[1]]
        elif method in ("setattr", "write", "setxattr", "removexattr", "fallocate"):
            inos = [args[0]]
        else:
            return []
    except (IndexError, TypeError):
        return []
    return [ino for ino in dict.fromkeys(inos) if type(ino) is int]


async def attrs_after(fs, group: int, method: str, args) -> list[Attr]:
    """The committed attributes of the inodes of `group` that the update `method(*args)`
    changed (call it after the update committed and was acknowledged). An inode that
    cannot be read now (gone meanwhile, an I/O error) is left out: the client asks
    for it when it needs it."""
    out = []
    for ino in changed_inodes(method, args):
        if ino_group(ino) != group:
            continue                # another group's: the client asks that group
        try:
            out.append(await fs.getattr(ino))
        except FsError as exc:
            log.debug("post-op attributes of %#x after %s: %s", ino, method, exc)
        except OSError as exc:
            log.warning("post-op attributes of %#x after %s: %s", ino, method, exc)
    return out


class PostOpAttrs:
    """The attributes that replies to this client's updates carried: each answered at
    most once, within `ttl` seconds of the reply (times are the caller's clock)."""

    def __init__(self, ttl: float, cap: int = CAP):
        self.ttl = ttl
        self.cap = cap
        self._attrs: dict[int, tuple[Attr, float]] = {}
        # ino -> [updates in flight, updates started since none was in flight]
        self._inflight: dict[int, list[int]] = {}

    def begin(self, inos: list[int]) -> dict[int, int | None]:
        """An update changing `inos` is about to be sent: what is held for them is
        stale from now on. Returns the marks to give `settle` when it ends."""
        marks: dict[int, int | None] = {}
        for ino in inos:
            self._attrs.pop(ino, None)
            st = self._inflight.setdefault(ino, [0, 0])
            st[0] += 1
            st[1] += 1
            marks[ino] = st[1] if st[0] == 1 else None   # None: overlaps an earlier one
        return marks

    def settle(self, marks: dict[int, int | None], attrs, now: float) -> None:
        """The update begun with `marks` ended; `attrs` are its reply's post-operation
        attributes ([] when it failed). Kept: those of the inodes no other update of
        this client touched meanwhile."""
        alone = set()
        for ino, mark in marks.items():
            st = self._inflight[ino]
            if mark is not None and st[1] == mark:
                alone.add(ino)
            st[0] -= 1
            if st[0] == 0:
                del self._inflight[ino]
        for attr in attrs if isinstance(attrs, list) else ():
            if isinstance(attr, Attr) and attr.ino in alone:
                self._attrs.pop(attr.ino, None)
                self._attrs[attr.ino] = (attr, now)
        while len(self._attrs) > self.cap:
            del self._attrs[next(iter(self._attrs))]        # the oldest

    def take(self, ino: int, now: float) -> tuple[Attr, float] | None:
        """(attributes, their age) if a reply left some for `ino` less than `ttl`
        seconds ago; they are answered only this once."""
        held = self._attrs.pop(ino, None)
        if held is None or now - held[1] >= self.ttl:
            return None
        return held[0], now - held[1]

    def drop(self, ino: int) -> None:
        self._attrs.pop(ino, None)


class NoXattrs:
    """Inodes known, for `ttl` seconds, to have no extended attributes at all or none
    of a given name."""

    def __init__(self, ttl: float, cap: int = CAP):
        self.ttl = ttl
        self.cap = cap
        self._known: dict[int, dict[bytes | None, float]] = {}   # name None: none at all
        self.changes = 0        # counts the starts and ends of this client's changes

    @contextmanager
    def changing(self, ino: int):
        """Around this client's own change of `ino`'s extended attributes: what was
        known of it is forgotten when the change starts and again when it ends, and
        an answer to a request that overlapped the change teaches nothing."""
        self.forget(ino)
        self.changes += 1
        try:
            yield
        finally:
            self.forget(ino)
            self.changes += 1

    def learn(self, ino: int, now: float, name: bytes | None = None, *,
              since: int | None = None) -> None:
        """`ino` has no extended attribute `name` (none at all: name None), as an
        answer to a request sent when `changes` was `since` said."""
        if self.ttl <= 0 or (since is not None and since != self.changes):
            return
        self._known.setdefault(ino, {})[name] = now
        if len(self._known) > self.cap:
            for old in list(self._known)[:self.cap // 4]:
                del self._known[old]

    def absent(self, ino: int, now: float, name: bytes | None = None) -> bool:
        """Is `ino` known to lack `name` (any attribute: name None)?"""
        known = self._known.get(ino)
        if not known:
            return False
        for key in (None, name) if name is not None else (None,):
            t = known.get(key)
            if t is not None and now - t < self.ttl:
                return True
        return False

    def forget(self, ino: int) -> None:
        self._known.pop(ino, None)
