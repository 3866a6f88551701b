"""`RemoteFS`: the filesystem interface of `FileSystem` (fs/core.py), served by the
replicated cluster. The FUSE adapter (fs/fuse_ops.py) takes it in place of a local
`FileSystem` and does not know the difference.

Groups: the namespace is spread over the replica groups, and an inode number carries its
group (`ino >> 48`). Each operation goes to the primary of the group of its first inode
argument (the parent directory for lookup, create, mkdir, unlink, rename...; the new
parent for link); statfs asks every group (sums, but the smallest group's available);
fsync without an inode flushes every group. A group answers EXDEV with an inode number when the operation needs an inode of
another group (`ForeignInode`): lookup then reads that inode's attributes from its own
group, and readdir does so for each entry that lives elsewhere. Operations that change
two groups are the servers' business (two-phase commit between primaries, which use a
`RemoteFS` named after themselves and `call_group` to reach each other).

Routing and failover: the client caches one view per group; it asks the view server only
when a primary fails to answer within the request timeout, refuses the connection,
answers `NotPrimary`, or is unknown; then it retries -- a hung primary costs about
DeadPings x PingInterval (until the view server gives up on it) plus one retry.

At most once: requests go out on *lanes*; a lane has one request outstanding at a time,
and every request carries (client id, lane, seq) with seq increasing per lane. A retry
reuses the same triple, so the primary recognises it (its at-most-once table is
replicated and survives failover) and answers with the recorded reply instead of
executing it again. A reply is matched to its request by (lane, seq), whichever
transmission it answers. Lanes are shared by all groups: a lane's seq increases across
the whole client, so each group sees it increase with gaps, which its table allows.

Fewer round trips: the reply to an update carries the post-operation attributes of the
inodes it changed (replication/postop.py); the FUSE adapter's getattr takes them, once
and within `cache_ttl` seconds, through `getattr_cached` (the kernel asks for a
directory's attributes after every change in it), while `getattr` always asks the
server (open's close-to-open check). Inodes known to have no extended attributes (just
created, or so answered) answer getxattr and listxattr without a round trip for
`cache_ttl` seconds. `forget` runs in the background: nothing waits for its answer;
`release_number` too, gathered into one request per group every RELEASE_DELAY.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections import Counter

import trio

from replfs.fs.core import Attr
from replfs.fs.errors import FsError, ForeignInode
from replfs.fs.layout import ino_group
from replfs.replication import wire
from replfs.replication.config import CLIENT, ClusterConfig
from replfs.replication.postop import NoXattrs, PostOpAttrs, changed_inodes
from replfs.replication.viewserver import View
from replfs.replication.vsdial import ViewServers

log = logging.getLogger("replfs.client")

REQUEST_TIMEOUT = 0.4       # largest wait for one transmission; a retry is always safe
MIN_RTO = 0.05
RTO_BYTES_PER_S = 8e6       # a request's size adds to its timeout: 1 MiB, 0.13 s
CONNECT_TIMEOUT = 0.4
# How long what a reply told is answered from memory: no longer than the kernel's own
# attribute timeout (fs/fuse_ops.py ATTR_TIMEOUT), so that caching here lets a change
# by another mount go unseen no longer than the kernel's cache already does.
CACHE_TTL = 5.0
FORGET_LANES = 2            # lanes that background forgets may hold at once
FORGET_DRAIN = 10.0         # seconds aclose waits for forgets still going out
RELEASE_DELAY = 0.02        # inode numbers released within this go in one request
RELEASE_BATCH = 512         # inode numbers per request at most


class Unavailable(FsError):
    """No primary answered for `deadline` seconds (EIO to the caller)."""

    def __init__(self, what: str):
        super().__init__(5, what)


class _Conn:
    """One authenticated connection to a server, with a reader task that hands replies
    to the waiting requests."""

    def __init__(self, ch: wire.Channel, server: str):
        self.ch = ch
        self.server = server
        self.broken = False

    async def reader(self, client: "RemoteFS") -> None:
        try:
            while True:
                msg = await self.ch.receive()
                if isinstance(msg, (wire.OpReply, wire.NotPrimary)):
                    client._deliver(msg)
        except wire.CONN_ERRORS:
            pass
        finally:
            self.broken = True
            await self.ch.aclose()
            client._conn_broken(self)


class _Waiter:
    """A pending request: any transmission's reply (by rid) completes it."""

    def __init__(self):
        self.event = trio.Event()
        self.reply = None
        self.rids: list[int] = []
        self.conn: _Conn | None = None


class RemoteFS:
    """The cluster's filesystem, for the FUSE client (`name` "client") or for a server
    that talks to other groups' primaries (`name` = the server's own name, so that the
    network faults between it and them apply: wire.NetFaults)."""

    def __init__(self, cfg: ClusterConfig, *, lanes: int = 16,
                 request_timeout: float = REQUEST_TIMEOUT, deadline: float = 60.0,
                 name: str = CLIENT, cache_ttl: float = CACHE_TTL):
        self.cfg = cfg
        self.secret = cfg.secret()
        self.name = name
        self.viewservers = ViewServers(cfg, name, self.secret)
        self.client_id = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.request_timeout = request_timeout
        self.deadline = deadline
        self.views: dict[int, View] = {g: View() for g in cfg.groups}
        self._conns: dict[str, _Conn] = {}
        self._connecting: dict[str, trio.Lock] = {}
        self._lanes = list(range(lanes))
        self._lane_seq = [0] * lanes
        self._lane_free = trio.Semaphore(lanes)
        self._by_rid: dict[int, _Waiter] = {}     # every transmission of a pending request
        self._rid = 0
        self._nursery: trio.Nursery | None = None
        self._view_lock = trio.Lock()
        # attrs_from_replies, xattrs_known_absent: requests saved (module docstring)
        self.stats = dict(requests=0, retries=0, view_fetches=0, failovers=0,
                          attrs_from_replies=0, xattrs_known_absent=0)
        self.methods: Counter[str] = Counter()     # requests per method (logged at unmount)
        self._vs: wire.Channel | None = None
        self._srtt = 0.01
        self.post_op = PostOpAttrs(cache_ttl)
        self.no_xattrs = NoXattrs(cache_ttl)
        self._forget_lanes = trio.CapacityLimiter(FORGET_LANES)
        self._releases: dict[int, list[int]] = {}   # group -> inode numbers to release
        self._releasing: set[int] = set()           # groups whose sender is running
        self._forgets = 0                           # background forgets not yet answered
        self._forgets_done = trio.Event()
        self._forgets_done.set()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve connection readers until cancelled; start with `nursery.start`."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # ---------------------------------------------------------------- plumbing
    def _deliver(self, msg) -> None:
        w = self._by_rid.get(msg.rid)
        if w is not None:
            w.reply = msg
            w.event.set()

    def _conn_broken(self, conn: _Conn) -> None:
        if self._conns.get(conn.server) is conn:
            del self._conns[conn.server]
        for w in self._by_rid.values():
            if w.conn is conn:
                w.event.set()

    async def _conn(self, server: str) -> _Conn:
        conn = self._conns.get(server)
        if conn is not None and not conn.broken:
            return conn
        lock = self._connecting.setdefault(server, trio.Lock())
        async with lock:
            conn = self._conns.get(server)
            if conn is not None and not conn.broken:
                return conn
            with trio.fail_after(CONNECT_TIMEOUT):
                ch = await wire.connect(self.cfg.addr(self.name, server), self.secret, self.name)
            conn = _Conn(ch, server)
            self._conns[server] = conn
            self._nursery.start_soon(conn.reader, self)
            return conn

    async def _fetch_view(self, group: int, stale: View) -> View:
        """Ask the view server for `group`'s view (concurrent callers share one answer),
        over one kept connection."""
        async with self._view_lock:
            cur = self.views[group]
            if cur.num > stale.num:
                return cur
            self.stats["view_fetches"] += 1
            try:
                with trio.fail_after(max(0.3, self.cfg.ping_interval * 3)):
                    if self._vs is None:
                        self._vs = await self.viewservers.connect(self.cfg.ping_interval * 3)
                    await self._vs.send(wire.GetView(group))
                    r = await self._vs.receive()
                if (isinstance(r, wire.ViewReply) and r.group == group
                        and r.num >= cur.num):
                    if r.primary != cur.primary and cur.primary:
                        self.stats["failovers"] += 1
                        log.info("group %d: view %d: primary is now %s", group, r.num,
                                 r.primary)
                    self.views[group] = View(r.num, r.primary, r.backup)
                elif not isinstance(r, wire.ViewReply) or r.group != group:
                    raise wire.ProtocolError(f"asked for group {group}'s view, got {r!r}")
            except wire.CONN_ERRORS as exc:
                log.debug("view server unreachable: %s", exc)
                if self._vs is not None:
                    await self._vs.aclose()
                    self._vs = None
                    self.viewservers.failed()
            return self.views[group]

    def _rto(self, attempt: int, nbytes: int = 0) -> float:
        """Retransmission timeout: a few smoothed round trips (retransmitting to a live
        primary is harmless: it answers the duplicate from its table), doubling per
        retry up to `request_timeout`, plus the time a request of `nbytes` takes to
        travel and be written twice at RTO_BYTES_PER_S: the smoothed round trip is of
        small requests, and retransmitting a 1 MiB write that is merely slow costs the
        primary another MiB to receive."""
        base = min(self.request_timeout, max(MIN_RTO, 4 * self._srtt))
        return (min(self.request_timeout * 2, base * 2 ** min(attempt - 1, 5))
                + nbytes / RTO_BYTES_PER_S)

    async def call(self, method: str, *args, **kwargs):
        """Run `method` on the primary of the group of its first inode argument (the
        parent for `link`); returns its value or raises FsError (ForeignInode when the
        group needs an inode of another group)."""
        ino = args[1] if method == "link" else args[0]
        return await self.call_group(ino_group(ino), method, *args, **kwargs)

    async def call_group(self, group: int, method: str, *args, **kwargs):
        """Run `method` on the primary of `group`; returns its value or raises FsError
        (ForeignInode for EXDEV with an inode number)."""
        if group not in self.views:
            raise FsError(errno.EXDEV, f"{method}: no replica group {group} in this cluster")
        await self._lane_free.acquire()
        lane = self._lanes.pop()
        self._lane_seq[lane] += 1
        seq = self._lane_seq[lane]
        w = _Waiter()
        self.stats["requests"] += 1
        self.methods[method] += 1
        marks = self.post_op.begin(changed_inodes(method, args))
        attrs = []
        try:
            with trio.fail_after(self.deadline):
                reply = await self._call(w, group, lane, seq, method, list(args), kwargs)
            attrs = reply.attrs
            return reply.value
        except trio.TooSlowError:
            raise Unavailable(f"{method}: no primary of group {group} answered for "
                              f"{self.deadline:.0f} s") from None
        finally:
            self.post_op.settle(marks, attrs, trio.current_time())
            for rid in w.rids:
                self._by_rid.pop(rid, None)
            self._lanes.append(lane)
            self._lane_free.release()

    async def _call(self, w: "_Waiter", group, lane, seq, method, args, kwargs) -> wire.OpReply:
        """The primary's successful OpReply; raises FsError (ForeignInode) for an error."""
        view = self.views[group]
        if not view.primary:
            view = await self._fetch_view(group, view)
        nbytes = sum(len(a) for a in args if isinstance(a, (bytes, bytearray, memoryview)))
        attempt = 0
        while True:
            if attempt:
                self.stats["retries"] += 1
            attempt += 1
            if not view.primary:
                await trio.sleep(self.cfg.ping_interval)
                view = await self._fetch_view(group, view)
                continue
            try:
                conn = await self._conn(view.primary)
            except wire.CONN_ERRORS:
                view = await self._refetch(group, view)
                continue
            self._rid += 1
            w.rids.append(self._rid)
            self._by_rid[self._rid] = w
            w.conn = conn
            if w.reply is None:
                w.event = trio.Event()
            try:
                await conn.ch.send(wire.OpRequest(self._rid, self.client_id, lane, seq, method,
                                                  args, kwargs))
            except wire.CONN_ERRORS:
                view = await self._refetch(group, view)
                continue
            t0 = trio.current_time()
            with trio.move_on_after(self._rto(attempt, nbytes)):
                await w.event.wait()
            reply, w.reply = w.reply, None
            if isinstance(reply, wire.OpReply):
                if attempt == 1:        # Karn: time only unambiguous round trips
                    self._srtt = 0.875 * self._srtt + 0.125 * (trio.current_time() - t0)
                if reply.errno == errno.EXDEV and type(reply.value) is int:
                    raise ForeignInode(reply.value)
                if reply.errno:
                    raise FsError(reply.errno, reply.message)
                return reply
            if isinstance(reply, wire.NotPrimary) or w.conn.broken:
                view = await self._refetch(group, view)
            else:               # no answer in time: lost, slow, or a hung primary
                view = await self._fetch_view(group, view)

    async def _refetch(self, group: int, view: View) -> View:
        new = await self._fetch_view(group, view)
        if new.num == view.num:
            # nothing new yet: the view server has not given up on the primary; pace
            await trio.sleep(self.cfg.ping_interval / 2)
        return new

    async def aclose(self) -> None:
        """Close every connection, once the background forgets still going out were
        answered (for at most FORGET_DRAIN seconds: an inode whose forget is lost stays
        an orphan, harmless, until the next cluster start reclaims it)."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(FORGET_DRAIN):
                await self._forgets_done.wait()
        if self._forgets:
            log.warning("closing with %d forgets unanswered: those inodes, if unlinked, "
                        "stay orphans until the cluster's next start", self._forgets)
        if self._vs is not None:
            await self._vs.aclose()
        for conn in list(self._conns.values()):
            await conn.ch.aclose()

    # ---------------------------------------------------------------- the interface
    async def _each(self, fns) -> list:
        """Run the coroutine functions `fns` concurrently; their results in order, or the
        first FsError any of them raised."""
        results: list = [None] * len(fns)
        errors: list[FsError] = []

        async def one(i, fn):
            try:
                results[i] = await fn()
            except FsError as exc:
                errors.append(exc)
        async with trio.open_nursery() as nursery:
            for i, fn in enumerate(fns):
                nursery.start_soon(one, i, fn)
        if errors:
            raise errors[0]
        return results

    async def lookup(self, parent, name):
        try:
            return await self.call("lookup", parent, name)
        except ForeignInode as exc:     # the entry (or "..") is an inode of another group
            return await self.call("getattr", exc.ino)

    async def getattr(self, ino):
        """The server's attributes of `ino`, always asked (open's close-to-open check).

        An inode that no longer exists is ESTALE, not ENOENT: the kernel holds it through
        a name that another mount removed or replaced, and on ESTALE the VFS looks the
        path up again (LOOKUP_REVAL) -- finding the new file -- instead of failing."""
        self.post_op.drop(ino)      # older than what is asked now: never answer them
        try:
            return await self.call("getattr", ino)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                raise FsError(errno.ESTALE, f"inode {ino:#x} no longer exists") from None
            raise

    async def getattr_cached(self, ino):
        """(attributes, their age in seconds): those a reply to one of this client's
        updates carried less than `cache_ttl` seconds ago (each answered once), else the
        server's (age 0), as `getattr`."""
        held = self.post_op.take(ino, trio.current_time())
        if held is not None:
            self.stats["attrs_from_replies"] += 1
            return held
        return await self.getattr(ino), 0.0

    async def setattr(self, ino, *, mode=None, uid=None, gid=None, size=None, atime_ns=None,
                      mtime_ns=None):
        kw = dict(mode=mode, uid=uid, gid=gid, size=size, atime_ns=atime_ns, mtime_ns=mtime_ns)
        return await self.call("setattr", ino, **{k: v for k, v in kw.items() if v is not None})

    async def mknod(self, parent, name, mode, rdev, uid, gid):
        return self._created(await self.call("mknod", parent, name, mode, rdev, uid, gid))

    async def create(self, parent, name, mode, uid, gid):
        return self._created(await self.call("create", parent, name, mode, uid, gid))

    async def mkdir(self, parent, name, mode, uid, gid):
        return self._created(await self.call("mkdir", parent, name, mode, uid, gid))

    async def symlink(self, parent, name, target, uid, gid):
        return self._created(await self.call("symlink", parent, name, target, uid, gid))

    async def readlink(self, ino):
        return await self.call("readlink", ino)

    async def link(self, ino, parent, name):
        return await self.call("link", ino, parent, name)

    async def unlink(self, parent, name, keep=None):
        """The inode's number when its last name went and it was freed at once (`keep`:
        the inodes this mount holds open), else None (FileSystem.unlink)."""
        if keep is None:
            return await self.call("unlink", parent, name)
        freed = await self.call("unlink", parent, name, keep=list(keep))
        return freed if type(freed) is int else None

    async def rmdir(self, parent, name):
        return await self.call("rmdir", parent, name)

    async def forget(self, ino):
        """Free `ino` on its group if it has no links left, in the background: the
        caller does not wait (a failure is logged; `aclose` lets the last ones out)."""
        await self._in_background("forget", ino)

    async def release_number(self, ino):
        """Let `ino`'s group reuse the number of an inode that an unlink freed at once
        (this mount's kernel has forgotten it), in the background as `forget`, and
        gathered: the numbers released within RELEASE_DELAY go to their group in one
        request (`release_numbers`), not one request per unlinked file."""
        if self._nursery is None:
            return await self.call("release_number", ino)
        group = ino_group(ino)
        self._releases.setdefault(group, []).append(ino)
        if group not in self._releasing:
            self._releasing.add(group)
            self._background_started()
            self._nursery.start_soon(self._send_releases, group)

    async def _send_releases(self, group: int) -> None:
        """Send `group`'s released numbers, gathered for RELEASE_DELAY, until none are
        left (the one sender of that group meanwhile)."""
        try:
            while self._releases.get(group):
                await trio.sleep(RELEASE_DELAY)
                batch = self._releases[group][:RELEASE_BATCH]
                del self._releases[group][:RELEASE_BATCH]
                try:
                    async with self._forget_lanes:
                        await self.call_group(group, "release_numbers", batch)
                except FsError as exc:
                    log.warning("release of %d inode numbers failed: %s", len(batch), exc)
        except trio.Cancelled:
            log.warning("inode numbers not released: the client is closing")
            raise
        finally:
            self._releasing.discard(group)
            self._background_done()

    def _background_started(self) -> None:
        if not self._forgets:
            self._forgets_done = trio.Event()
        self._forgets += 1

    def _background_done(self) -> None:
        self._forgets -= 1
        if not self._forgets:
            self._forgets_done.set()

    async def _in_background(self, method, ino) -> None:
        if self._nursery is None:
            return await self.call(method, ino)
        self._background_started()
        self._nursery.start_soon(self._forget, method, ino)

    async def _forget(self, method, ino) -> None:
        try:
            async with self._forget_lanes:
                await self.call(method, ino)
        except FsError as exc:
            log.warning("%s of inode %#x failed: %s", method, ino, exc)
        except trio.Cancelled:
            log.warning("%s of inode %#x not sent: the client is closing", method, ino)
            raise
        except Exception:
            log.exception("%s of inode %#x failed unexpectedly", method, ino)
        finally:
            self._background_done()

    async def rename(self, p_old, n_old, p_new, n_new, flags=0):
        return await self.call("rename", p_old, n_old, p_new, n_new, flags)

    async def read(self, ino, offset, size):
        return await self.call("read", ino, offset, size)

    async def write(self, ino, offset, data, stamps=False):
        if stamps:
            return await self.call("write", ino, offset, bytes(data), stamps=True)
        return await self.call("write", ino, offset, bytes(data))

    async def fallocate(self, ino, mode, offset, length, reserve=True):
        return await self.call("fallocate", ino, mode, offset, length, reserve=reserve)

    async def fsync(self, ino=None):
        """Every operation of the group of `ino` (of every group, without one) that
        returned so far is on stable storage on both replicas."""
        if ino is not None:
            return await self.call_group(ino_group(ino), "fsync")
        await self._each([lambda g=g: self.call_group(g, "fsync") for g in self.views])

    async def readdir(self, ino, start, limit=128):
        """[(name, attr, next offset)] as the directory's group lists it, with the
        attributes of entries of other groups read from their groups (an entry whose
        inode is gone by then is left out)."""
        while True:
            batch = await self.call("readdir", ino, start, limit)
            foreign = [i for i, (_, attr, _) in enumerate(batch) if type(attr) is int]
            if not foreign:
                return batch

            async def attr_of(fino):
                try:
                    return await self.call("getattr", fino)
                except FsError as exc:
                    if exc.errno == errno.ENOENT:
                        return None
                    raise
            attrs = await self._each([lambda i=i: attr_of(batch[i][1]) for i in foreign])
            for i, attr in zip(foreign, attrs):
                batch[i] = [batch[i][0], attr, batch[i][2]]
            out = [e for e in batch if e[1] is not None]
            if out or not batch:
                return out
            start = batch[-1][2]        # every entry vanished: an empty list would end it

    async def statfs(self):
        """Size and free space (`blocks`, `bfree`, `files`, `ffree`): the sums over every
        group, what the cluster holds. Available (`bavail`, `favail`): the smallest
        group's, since a file lives in its directory's group and gets that group's space
        only; the smallest is what a file is sure to get wherever it is (a sum would
        promise space that no one file can have). Block size and name length from
        group 0."""
        per = await self._each([lambda g=g: self.call_group(g, "statfs") for g in sorted(self.views)])
        out = dict(per[0])
        for k in ("blocks", "bfree", "files", "ffree"):
            out[k] = sum(st.get(k, 0) for st in per)
        for k in ("bavail", "favail"):
            out[k] = min(st.get(k, 0) for st in per)
        return out

    def _created(self, attr):
        """A new inode has no extended attributes (so the kernel's `security.capability`
        probe before its first write costs nothing)."""
        if isinstance(attr, Attr):
            self.no_xattrs.learn(attr.ino, trio.current_time())
        return attr

    async def getxattr(self, ino, name):
        if self.no_xattrs.absent(ino, trio.current_time(), name):
            self.stats["xattrs_known_absent"] += 1
            raise FsError(errno.ENODATA, name.decode(errors="replace"))
        since = self.no_xattrs.changes
        try:
            return await self.call("getxattr", ino, name)
        except FsError as exc:
            if exc.errno == errno.ENODATA:
                self.no_xattrs.learn(ino, trio.current_time(), name, since=since)
            raise

    async def listxattr(self, ino):
        if self.no_xattrs.absent(ino, trio.current_time()):
            self.stats["xattrs_known_absent"] += 1
            return []
        since = self.no_xattrs.changes
        names = await self.call("listxattr", ino)
        if not names:
            self.no_xattrs.learn(ino, trio.current_time(), since=since)
        return names

    async def setxattr(self, ino, name, value, flags=0):
        with self.no_xattrs.changing(ino):
            return await self.call("setxattr", ino, name, value, flags)

    async def removexattr(self, ino, name):
        with self.no_xattrs.changing(ino):
            return await self.call("removexattr", ino, name)

