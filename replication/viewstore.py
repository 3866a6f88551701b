"""Where the view server keeps its view table: the built-in `FileStore` (DIR/views.json,
the one-machine default) or `EtcdStore` (etcd, an existing consensus engine, for several
view server processes on several machines).

A store answers three things, all async:

- `lead()` returns once this process may act as the view server (at once for the file
  store; for etcd once it holds the election key under its own lease), and
  `active()` says whether it still may (False once the etcd lease may have expired);
- `load()` the table the previous active view server left: {group: record}, a record
  being {num, primary, backup} and, from etcd, {acked, given} too (see
  ViewService.resume);
- `save(table)` the table after a change; for etcd a transaction conditioned on the
  revision the change was computed from and on this process's election, so that two
  view server processes can never fork the sequence of views. `Fenced` when it failed:
  someone else is (or was) active, this process must stop serving.

`keep(nursery_scope)` runs while the process is active (etcd: renews the lease, and
cancels `nursery_scope` once it cannot); `resign()` gives the election up, `close()`
the connections. `running()` names the view server processes alive (for etcd: each keeps
a key under its lease, standing by or active), for `replfs status` on any machine.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os

import trio

from replfs.replication import wire

log = logging.getLogger("replfs.viewstore")


class Fenced(Exception):
    """This view server process is no longer (surely) the active one."""


class Unavailable(Exception):
    """No etcd endpoint answered."""


class FileStore:
    """DIR/views.json: the views only (no acknowledgements): a restarted view server
    resumes conservatively (ViewService.restore)."""

    def __init__(self, path: str):
        self.path = path

    async def lead(self) -> None:
        return None

    def active(self) -> bool:
        return True

    async def keep(self, scope: trio.CancelScope) -> None:
        await trio.sleep_forever()

    async def load(self) -> dict[int, dict]:
        try:
            with open(self.path) as f:
                d = json.load(f)
            return {int(g): dict(num=int(v[0]), primary=str(v[1]), backup=str(v[2]))
                    for g, v in d.items()}
        except (FileNotFoundError, ValueError, TypeError, IndexError, AttributeError):
            return {}

    async def save(self, table: dict[int, dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({str(g): [r["num"], r["primary"], r["backup"]]
                       for g, r in table.items()}, f)
        # no fsync: it could stall the pings for long under load (a view server crash
        # is not a power loss; and the views only pick who resumes)
        os.replace(tmp, self.path)

    async def resign(self) -> None:
        return None

    async def running(self) -> dict[str, dict]:
        return {}

    def close(self) -> None:
        return None


def _refused(exc: BaseException) -> bool:
    """A connection refused (ECONNREFUSED) anywhere in `exc`'s causes (trio reports a
    failed dial as OSError("all attempts ... failed") caused by a group of them)."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ECONNREFUSED:
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


class EtcdStore:
    """The view table in etcd, under `prefix`: `prefix/views` (one JSON value, the whole
    table) and `prefix/leader` (the election key, under the active process's lease).

    Talks to etcd's v3 JSON gateway through etcd3gw (OpenStack's client; one endpoint per
    client object, so it keeps one per endpoint and tries the next when one fails). Its
    calls block, so they run in a worker thread."""

    def __init__(self, endpoints: list[str], prefix: str, me: str, *, ttl: int = 1,
                 timeout: float = 0.5, poll: float = 0.1, dial=None):
        import etcd3gw
        self.me = me
        # async dial(name) -> an authenticated wire.Channel to view server `name`: with
        # it, a standby watches the active process and ends its lease once it surely
        # died (`_watch`); without it a standby waits for etcd to expire that lease
        self.dial = dial
        self._wake = trio.Event()
        # the lease asked for; etcd grants no less than its floor, 1.5 election timeouts
        # rounded up to a second (2 s with its default 1 s election timeout, 1 s with
        # --election-timeout 500 or less), and `ttl` becomes what it granted: how long a
        # standby waits for a killed active process
        self.ttl = ttl
        self.poll = poll
        self.views_key = f"{prefix}/views"
        self.leader_key = f"{prefix}/leader"
        self.standby_prefix = f"{prefix}/standby/"
        self.clients = []
        for ep in endpoints:
            host, _, port = ep.rpartition(":")
            self.clients.append(etcd3gw.Etcd3Client(host=host, port=int(port),
                                                    timeout=timeout, api_path="/v3/"))
        self._good = 0                  # the endpoint that answered last
        self.lease_id: int | None = None
        self._announced: int | None = None   # the lease our standby key is under
        self.election_rev = 0           # create_revision of our leader key
        self.table_rev = 0              # mod_revision of the views we computed from
        self.valid_until = float("-inf")   # trio time until which the lease surely holds

    # ---------------------------------------------------------------- plumbing
    def _post(self, path: str, body: dict) -> dict:
        """POST `body` to the first endpoint that answers, starting with the last good."""
        from etcd3gw import exceptions
        last = None
        n = len(self.clients)
        for i in range(n):
            k = (self._good + i) % n
            c = self.clients[k]
            try:
                r = c.post(c.get_url(path), json=body)
            except (exceptions.Etcd3Exception, ValueError) as exc:   # down, no leader, ...
                last = exc
                continue
            self._good = k
            return r
        raise Unavailable(f"no etcd endpoint answered ({type(last).__name__}: {last})")

    async def _call(self, path: str, body: dict) -> dict:
        return await trio.to_thread.run_sync(self._post, path, body, abandon_on_cancel=True)

    # ---------------------------------------------------------------- election
    async def lead(self) -> None:
        """Campaign until elected: the leader key created under a fresh lease. Meanwhile
        watch the active process (`_watch`)."""
        async with trio.open_nursery() as nursery:
            if self.dial is not None:
                nursery.start_soon(self._watch_loop)
            while True:
                try:
                    if await self._campaign():
                        log.info("%s is the active view server (lease %x)", self.me,
                                 self.lease_id)
                        nursery.cancel_scope.cancel()
                        return
                except Unavailable as exc:
                    log.warning("etcd: %s", exc)
                with trio.move_on_after(self.poll):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _leader(self) -> tuple[str, int] | None:
        """The active view server's name and the lease it holds the election under."""
        r = await self._call("/kv/range", {"key": _b64(self.leader_key)})
        kvs = r.get("kvs") or []
        if not kvs or not kvs[0].get("lease"):
            return None
        return base64.b64decode(kvs[0].get("value", "")).decode(), int(kvs[0]["lease"])

    async def _watch_loop(self) -> None:
        while True:
            try:
                leader = await self._leader()
                if leader is not None and leader[0] != self.me:
                    await self._watch(*leader)
            except (Unavailable, ValueError, *wire.CONN_ERRORS) as exc:
                log.debug("%s: watching the active view server: %r", self.me, exc)
            await trio.sleep(self.poll)

    async def _watch(self, name: str, lease: int) -> None:
        """Hold a connection to the active process `name` (it answers Watch with the
        lease it is active under, then both ends stay silent) until it ends. If its end
        closed it and its address then refuses connections, nothing listens there: the
        process died, or stopped serving -- the listener goes only after every ping
        answer it gave (the view server's nursery is cancelled first). Every lease it
        granted then rests on answers given before now, and the next active process
        counts a full lease from its own start (ViewService.resume). So its etcd lease
        is revoked here, and this process campaigns at once, instead of waiting up to
        the lease's length (and etcd's expiry check) for it to run out. A process that
        hangs (SIGSTOP), a partition or a dead machine closes nothing, or does not
        refuse: their lease runs out as before."""
        with trio.fail_after(1.0):
            ch = await self.dial(name)
        try:
            with trio.fail_after(1.0):
                await ch.send(wire.Watch(self.me))
                reply = await ch.receive()
            if not (isinstance(reply, wire.Watching) and reply.name == name
                    and reply.lease == lease):
                return              # not (or no longer) the holder of that lease
            log.debug("%s: watching %s (lease %x)", self.me, name, lease)
            try:
                msg = await ch.receive()
                raise wire.ProtocolError(f"the active view server sent {msg.TAG}")
            except BaseException as exc:
                if not wire.hung_up(exc):
                    raise
        finally:
            await ch.aclose()
        for _ in range(50):
            try:
                with trio.fail_after(1.0):
                    again = await self.dial(name)
                await again.aclose()
                return              # it still listens (or listens again)
            except OSError as exc:
                if _refused(exc):
                    break
                raise
            except (EOFError, trio.BrokenResourceError) as exc:
                # accepted by its kernel, then reset: a dying process's listener closes
                # after its connections did. Ask again until it refuses (or answers)
                if not wire.hung_up(exc):
                    raise
                await trio.sleep(0.01)
        else:
            return
        log.warning("%s: %s, the active view server, died (its connection closed, its "
                    "address refuses): ending its lease %x", self.me, name, lease)
        try:
            await self._call("/kv/lease/revoke", {"ID": lease})
        except Unavailable as exc:      # e.g. another standby revoked it first
            log.debug("etcd: revoke of %s's lease: %s", name, exc)
        self._wake.set()

    async def _campaign(self) -> bool:
        if self.lease_id is None:
            t0 = trio.current_time()
            r = await self._call("/lease/grant", {"TTL": self.ttl})
            self.lease_id = int(r["ID"])
            self.ttl = int(r["TTL"])
            self.valid_until = t0 + self.ttl
        else:
            await self._refresh()
            if self.lease_id is None:
                return False
        if self._announced != self.lease_id:
            # "I run": a key under the same lease, gone with it (so with this process)
            await self._call("/kv/put", {
                "key": _b64(self.standby_prefix + self.me), "lease": self.lease_id,
                "value": _b64(json.dumps({"pid": os.getpid()}))})
            self._announced = self.lease_id
        r = await self._call("/kv/txn", {
            "compare": [{"key": _b64(self.leader_key), "target": "CREATE",
                         "result": "EQUAL", "create_revision": 0}],
            "success": [{"request_put": {"key": _b64(self.leader_key),
                                         "value": _b64(self.me), "lease": self.lease_id}}],
            "failure": []})
        if not r.get("succeeded"):
            return False
        self.election_rev = int(r["header"]["revision"])
        return True

    async def _refresh(self) -> None:
        t0 = trio.current_time()
        r = await self._call("/lease/keepalive", {"ID": self.lease_id})
        ttl = int(r.get("result", {}).get("TTL", -1))
        if ttl <= 0:
            log.warning("etcd: lease %x expired", self.lease_id)
            self.lease_id = None
            self.valid_until = float("-inf")
        else:
            self.valid_until = t0 + ttl

    def active(self) -> bool:
        # a margin for the clock rates of this machine and etcd's
        return trio.current_time() < self.valid_until - 0.05 * self.ttl

    async def keep(self, scope: trio.CancelScope) -> None:
        """Renew the lease every ttl/4; cancel `scope` once it may have run out."""
        while True:
            with trio.move_on_at(self.valid_until - 0.05 * self.ttl):
                try:
                    await self._refresh()
                except Unavailable as exc:
                    log.warning("etcd: cannot renew the lease: %s", exc)
            if not self.active():
                log.warning("%s: lease lost: standing by", self.me)
                self.lease_id = None
                scope.cancel()
                return
            await trio.sleep(self.ttl / 4)

    async def resign(self) -> None:
        """Give up the lease (the leader key goes with it), so a standby takes over now."""
        if self.lease_id is not None:
            lease, self.lease_id = self.lease_id, None
            self.valid_until = float("-inf")
            try:
                await self._call("/kv/lease/revoke", {"ID": lease})
            except Exception as exc:        # best effort: it expires anyway
                log.debug("etcd: revoke: %s", exc)

    async def running(self) -> dict[str, dict]:
        """The view server processes whose lease lives (the active one and those
        standing by): {name: {"pid": ...}}. A standby refuses every connection, so this
        is how `status` on another machine learns that it runs."""
        end = self.standby_prefix[:-1] + chr(ord(self.standby_prefix[-1]) + 1)
        r = await self._call("/kv/range", {"key": _b64(self.standby_prefix),
                                           "range_end": _b64(end)})
        out = {}
        for kv in r.get("kvs") or []:
            name = base64.b64decode(kv["key"]).decode()[len(self.standby_prefix):]
            try:
                out[name] = json.loads(base64.b64decode(kv.get("value", "")) or b"{}")
            except ValueError:
                out[name] = {}
        return out

    def close(self) -> None:
        for c in self.clients:
            c.session.close()

    # ---------------------------------------------------------------- the table
    async def load(self) -> dict[int, dict]:
        r = await self._call("/kv/range", {"key": _b64(self.views_key)})
        kvs = r.get("kvs") or []
        if not kvs:
            self.table_rev = 0
            return {}
        self.table_rev = int(kvs[0]["mod_revision"])
        d = json.loads(base64.b64decode(kvs[0].get("value", "")) or b"{}")
        return {int(g): rec for g, rec in d.items()}

    async def save(self, table: dict[int, dict]) -> None:
        value = json.dumps({str(g): rec for g, rec in table.items()}, sort_keys=True)
        try:
            r = await self._call("/kv/txn", {
                "compare": [
                    {"key": _b64(self.views_key), "target": "MOD", "result": "EQUAL",
                     "mod_revision": self.table_rev},
                    {"key": _b64(self.leader_key), "target": "CREATE", "result": "EQUAL",
                     "create_revision": self.election_rev}],
                "success": [{"request_put": {"key": _b64(self.views_key),
                                             "value": _b64(value)}}],
                "failure": []})
        except Unavailable as exc:
            raise Fenced(f"cannot save the views: {exc}") from None
        if not r.get("succeeded"):
            raise Fenced("the views or the election changed under this view server")
        self.table_rev = int(r["header"]["revision"])
