"""Two-phase commit for operations that span replica groups.

An inode belongs to the group its number names (``ino >> 48``). A rename between
directories of different groups, a link or unlink whose inode lives elsewhere, a mkdir
placed in another group, a moved directory whose `..` lives elsewhere: the primary that
receives such an operation becomes its **coordinator**.

1. *Plan* from ordinary committed reads (`FileSystem.entry`, `dir_info`, `getattr`) in
   every group: one list of steps per group (fs/parts.py `_step`); each step re-checks,
   under its locks, what the plan assumed.
2. *Prepare*: every other participant group's primary runs its steps in a transaction
   (locks with a short timeout: a lock it cannot get in time is a NO vote, so a cycle of
   waits across groups cannot last), logs PREPARE (the transaction's after-images, its
   locked keys, and the vote's results), waits until its backup holds that PREPARE, and
   votes YES.
3. *Decide*: the coordinator runs its own steps, and in the same local transaction
   writes the operation's at-most-once reply and the decision entry
   (replication/decisions.py), and commits; once its backup acknowledged that commit,
   the decision is durable in the coordinator's group, whatever fails next. No decision
   logged means abort (presumed abort): a NO vote, a timeout, or a failure before the
   commit point aborts every prepared participant.
4. *Complete*: the coordinator answers its client, and meanwhile tells the participants:
   they commit (and wait for their backup) or abort, release their locks, and
   acknowledge; when all have, the coordinator clears the entry. Until a participant
   has committed, what it changed stays locked and out of its committed-inode cache, so
   whoever reads it after the client's answer waits for the commit.

Recovery. A participant's prepared transaction is replicated to its backup and, after a
restart or failover, recovered *in doubt* with its locks (txn/ recovery); the primary
then asks the coordinator's group "should I commit?" (`tx_query`): commit if the entry
is there, "pending" while that primary is still deciding it, abort otherwise. A
participant that waits longer than RESOLVE_AFTER for a decision asks the same. A new
primary of the coordinator's group re-sends every decision in its table. A failover in
any phase is just another restart of that role.

Retries are invisible to users: a NO vote for contention (a lock timeout, a deadlock
victim, a stale plan) aborts the attempt and the coordinator plans again after a
randomized, growing backoff.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from replfs.crash import crash_point
from replfs.fs.errors import FsError, Stale
from replfs.replication import wire
from replfs.replication.decisions import DecisionTable, TableFull
from replfs.replication.plans import Done, Plan, Planner
from replfs.txn import TxnAborted

log = logging.getLogger("replfs.2pc")

PREPARE_LOCK_TIMEOUT = 0.3    # a participant that cannot lock in time votes NO
COORD_LOCK_TIMEOUT = 0.3
RESOLVE_AFTER = 1.0           # a prepared participant asks its coordinator after this
RESOLVE_EVERY = 0.2
MAX_ATTEMPTS = 200
PEER_DEADLINE = 20.0          # a group unreachable this long fails the operation (EIO);
                              # less than the client's own deadline, which then retries
DISTRIBUTED = frozenset({"rename", "link", "unlink", "rmdir", "mkdir"})
TX_METHODS = frozenset({"tx_prepare", "tx_decide", "tx_query"})


class _Retry(Exception):
    pass


@dataclass
class _Prepared:
    """A participant's prepared part, waiting for its coordinator's decision."""
    gtid: str
    coord: int
    part: Any
    since: float
    recovered: bool = False
    deciding: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    committed: Any = None       # its CommitRecord once committed (a repeated COMMIT only
                                # waits for the backup: e.g. the first was cancelled when
                                # its coordinator's connection broke, after the commit)


class TwoPhase(Planner):
    """The 2PC roles of one replica server (coordinator and participant); the plans
    are replication/plans.py's."""

    def __init__(self, server):
        self.s = server
        self.peer = None                    # RemoteFS to the other groups' primaries
        self.parts: dict[str, _Prepared] = {}
        self.decided: dict[str, bool] = {}  # recently decided gtids (late prepares refused)
        self.active: set[str] = set()       # gtids this primary is still deciding
        self.table: DecisionTable | None = None
        self.counter = 0
        self.transfer_waiting = False
        self._delivering: set[str] = set()
        self.stats = dict(distributed=0, attempts=0, retries=0, aborted=0, prepared=0,
                          resolved_commit=0, resolved_abort=0, redelivered=0)

    # ------------------------------------------------------------ lifecycle
    async def start(self, nursery) -> None:
        from replfs.replication.client import RemoteFS
        self.peer = RemoteFS(self.s.cfg, name=self.s.name, deadline=PEER_DEADLINE, lanes=64)
        await nursery.start(self.peer.run)

    async def on_promote(self, p) -> None:
        """A new primary: its decisions to deliver, its in-doubt parts to resolve."""
        self.table = DecisionTable(self.s.array.nblocks)
        await self.table.load(self.s.fs.mgr)
        self.parts.clear()
        self.active.clear()
        for txn in self.s.fs.mgr.in_doubt():
            pay = txn.payload if isinstance(txn.payload, dict) else {}
            gtid = str(pay.get("gtid", f"unknown.{txn.id}"))
            part = self.s.fs.resume_part(txn)
            self._alias(txn, gtid)
            try:
                part.results = wire.unpack_value(pay.get("results", b"\x90"))
            except Exception:
                part.results = []
            self.parts[gtid] = _Prepared(gtid, int(pay.get("coord", -1)), part,
                                         time.monotonic(), recovered=True)
        if self.parts:
            log.warning("%d distributed transactions in doubt: asking their coordinators",
                        len(self.parts))
        for gtid in list(self.table.entries):
            self.stats["redelivered"] += 1
            self._start_delivery(p, gtid)
        self.s._nursery.start_soon(self._resolver, p)

    def on_demote(self) -> None:
        # our prepared parts stay in the log (in doubt); whoever is primary decides them
        for st in self.parts.values():
            st.done.set()
        self.parts.clear()
        self.active.clear()

    def _alias(self, txn, gtid: str) -> None:
        h = txn.mgr.history
        if h is not None:
            h.alias(txn.id, gtid)

    # ------------------------------------------------------------ coordinator
    async def execute(self, p, key, req, **extra):
        """Run client request `req` as a distributed transaction; returns (value, errno,
        message) like the server's `_execute_update`. Raises NotPrimaryError. `extra`
        goes to the planner (mkdir's target group)."""
        self.stats["distributed"] += 1
        planner = getattr(self, "_plan_" + req.method)
        args, kwargs = req.args, dict(req.kwargs, **extra)
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                self.stats["retries"] += 1
                await trio.sleep(random.uniform(0, min(0.25, 0.002 * 2 ** min(attempt, 8))))
            self.s._check_serving()
            try:
                # a rename's first plan assumes its new name free in a remote directory
                # (it saves asking): the participant's step finds it otherwise (Stale),
                # and the next attempt asks
                plan = await planner(*args, **kwargs, **(
                    {"optimistic": True} if req.method == "rename" and not attempt else {}))
            except FsError as exc:
                return None, exc.errno, str(exc)
            if isinstance(plan, Done):
                return plan.value, 0, ""
            try:
                return await self._attempt(p, key, req, plan)
            except _Retry:
                continue
        return None, errno.EIO, f"{req.method}: gave up after {MAX_ATTEMPTS} attempts (contention)"

    async def _attempt(self, p, key, req, plan: Plan):
        s = self.s
        self.stats["attempts"] += 1
        self.counter += 1
        gtid = f"{s.group}.{p.incarnation}.{self.counter}"
        groups = sorted(plan.remote)
        self.active.add(gtid)
        box: dict = {}
        try:
            crash_point("2pc.coord.planned")
            votes: dict[int, list] = {}
            async with trio.open_nursery() as nursery:
                for g in groups:
                    nursery.start_soon(self._ask_prepare, gtid, g, plan.remote[g], votes)
            bad = [votes[g] for g in groups if votes[g][0] != "yes"]
            if bad:
                self._abort_all(p, gtid, groups)
                hard = [v for v in bad if v[0] == "no"]
                if hard:
                    return None, hard[0][1], hard[0][2]
                raise _Retry
            crash_point("2pc.coord.prepared")
            remote = {g: votes[g][1] for g in groups}

            async def finish(txn, results):
                box["txn"] = txn
                self._alias(txn, gtid)
                result = plan.result(remote, results)
                box["result"] = result
                box["reply"] = await p.table.record(txn, key, req.seq, result)
                if groups:
                    box["slot"] = await self.table.record(txn, gtid, groups)
                # forced here and held by the backup (`_wait_acked`) before anyone hears
                # it; its locks go once it is appended (early release: what reads it
                # logs after it)
                box["rec"] = await txn.commit([req.client, req.lane, req.seq],
                                              release_early=True)
                crash_point("2pc.coord.logged")

            await s.gate.enter()
            try:
                s._check_serving()
                await s.fs.run_part(plan.local(remote), finish, lock_timeout=COORD_LOCK_TIMEOUT,
                                    name="2pc-coordinator")
            except (FsError, TxnAborted, TableFull) as exc:
                if "rec" in box:
                    raise           # committed after all (cannot happen: commit is last)
                self.table.release(box.get("slot"))
                self._abort_all(p, gtid, groups)
                if isinstance(exc, FsError) and not isinstance(exc, Stale):
                    return None, exc.errno, str(exc)
                raise _Retry from None
            except BaseException:
                txn = box.get("txn")
                if txn is not None and txn.commit_record is not None:
                    # the COMMIT was appended (and streamed to the backup) but its force
                    # failed: the decision is unknown here -- answer "pending" for good
                    # and let whoever takes over from us, with the backup's state, decide
                    box["undecided"] = True
                    log.error("decision %s unknown after a log failure: participants wait "
                              "for the next primary", gtid)
                elif "rec" not in box:
                    self.table.release(box.get("slot"))
                    self._abort_all(p, gtid, groups)
                raise
            finally:
                await s.gate.leave()
            rec = box["rec"]
            p.committed_lsn = max(p.committed_lsn, rec.lsn)
            p.table.remember(key, req.seq, box["reply"])
            await s._wait_acked(p, rec.lsn)
            s.confirm(rec.txn)
            if groups:
                self.table.remember(gtid, box["slot"], groups)
            crash_point("2pc.coord.replicated")
        finally:
            if not box.get("undecided"):
                self.active.discard(gtid)
        if groups:
            # the outcome is decided and replicated: answer now, and let the participants
            # commit meanwhile. Until each has, it holds its X locks (whoever touches
            # what it changed waits for them) and its inodes are out of its committed-
            # inode cache (fs/parts.py `run_part`), so no read anywhere sees the state
            # from before this operation once the client heard it is done.
            self._start_delivery(p, gtid)
        return box["result"], 0, ""

    async def _ask_prepare(self, gtid: str, g: int, steps: list, votes: dict) -> None:
        try:
            votes[g] = await self.peer.call_group(g, "tx_prepare", gtid, self.s.group, steps)
        except FsError as exc:
            votes[g] = ["busy", f"group {g}: {exc}"]    # unreachable: abort, retry

    def _abort_all(self, p, gtid: str, groups: list[int]) -> None:
        """Presumed abort: nothing is logged; tell the participants (best effort, in the
        background -- one that misses it asks us later and hears abort)."""
        self.stats["aborted"] += 1

        async def tell(g):
            with trio.move_on_after(PEER_DEADLINE):
                try:
                    await self.peer.call_group(g, "tx_decide", gtid, False)
                except FsError:
                    pass
        for g in groups:
            self.s._nursery.start_soon(tell, g)

    def _start_delivery(self, p, gtid: str) -> trio.Event:
        """Deliver COMMIT to every participant until each acknowledged, then clear the
        decision; returns an event set when all acknowledged."""
        done = trio.Event()
        if gtid in self._delivering:
            return done
        self._delivering.add(gtid)

        async def deliver():
            try:
                slot, groups = self.table.entries[gtid]
                pending = set(groups)
                n = 0
                while pending and self.s.primary is p:
                    async def tell(g):
                        try:
                            await self.peer.call_group(g, "tx_decide", gtid, True)
                            pending.discard(g)
                            crash_point("2pc.coord.told")
                        except FsError as exc:
                            log.info("decision %s for group %d not delivered yet: %s", gtid, g, exc)
                    async with trio.open_nursery() as nursery:
                        for g in sorted(pending):
                            nursery.start_soon(tell, g)
                    if pending:
                        n += 1
                        await trio.sleep(min(1.0, 0.05 * n))
                if not pending and self.s.primary is p:
                    done.set()
                    crash_point("2pc.coord.acknowledged")
                    await self.s.gate.enter()
                    try:
                        await self.table.forget(self.s.fs.mgr, gtid)
                    finally:
                        await self.s.gate.leave()
            except (TxnAborted, OSError) as exc:
                log.warning("decision %s: %s (kept; delivered again at the next promotion)",
                            gtid, exc)
            finally:
                done.set()
                self._delivering.discard(gtid)
        self.s._nursery.start_soon(deliver)
        return done

    def query(self, gtid: str) -> str:
        """A participant asks: "commit", "abort" (presumed: no decision) or "pending"."""
        self.s._check_serving()
        if self.table is not None and gtid in self.table.entries:
            return "commit"
        if gtid in self.active:
            return "pending"
        return "abort"

    # ------------------------------------------------------------ participant
    async def prepare(self, gtid: str, coord: int, steps: list) -> list:
        s = self.s
        s._check_serving()
        p = s.primary
        st = self.parts.get(gtid)
        if st is not None:
            return ["yes", st.part.results]
        if gtid in self.decided:
            return ["busy", "already decided"]
        if self.transfer_waiting:
            return ["busy", "a state transfer to the backup is waiting"]
        box: dict = {}

        async def finish(txn, results):
            self._alias(txn, gtid)
            # YES only once the PREPARE is on our disk and held by the backup
            box["lsn"] = await txn.prepare({"gtid": gtid, "coord": coord,
                                            "results": wire.pack_value(results)})

        await s.gate.enter()
        try:
            s._check_serving()
            crash_point("2pc.part.begin")
            part = await s.fs.run_part(steps, finish, lock_timeout=PREPARE_LOCK_TIMEOUT,
                                       name="2pc-participant")
        except Stale as exc:
            return ["busy", str(exc)]
        except FsError as exc:
            return ["no", exc.errno, str(exc)]
        except TxnAborted as exc:       # lock timeout, deadlock victim, log full
            return ["busy", str(exc)]
        finally:
            await s.gate.leave()
        self.stats["prepared"] += 1
        crash_point("2pc.part.prepared")
        st = self.parts[gtid] = _Prepared(gtid, coord, part, time.monotonic())
        if s.primary is p:
            p.committed_lsn = max(p.committed_lsn, box["lsn"])
        if gtid in self.decided:        # the coordinator gave up while we prepared
            await self.decide(gtid, False)
            return ["busy", "already decided"]
        await s._wait_acked(p, box["lsn"])
        crash_point("2pc.part.acked")
        return ["yes", part.results]

    async def decide(self, gtid: str, commit: bool) -> str:
        s = self.s
        s._check_serving()
        p = s.primary
        st = self.parts.get(gtid)
        if st is None:
            self._note_decided(gtid, commit)
            return "done"
        if st.deciding:
            await st.done.wait()
            return "done"
        st.deciding = True
        try:
            if commit:
                # on our disk and held by the backup before the coordinator may forget
                rec = st.committed
                if rec is None:
                    rec = st.committed = await st.part.commit()
                    crash_point("2pc.part.committed")
                if s.primary is p:
                    p.committed_lsn = max(p.committed_lsn, rec.lsn)
                await s._wait_acked(p, rec.lsn)     # NotPrimaryError: no "done" from us
                s.confirm(rec.txn)
            else:
                await st.part.abort()
            self.parts.pop(gtid, None)
            self._note_decided(gtid, commit)
            crash_point("2pc.part.decided")
        finally:
            st.deciding = False
            st.done.set()
        return "done"

    def _note_decided(self, gtid: str, commit: bool) -> None:
        self.decided[gtid] = commit
        if len(self.decided) > 8192:
            for k in list(self.decided)[:4096]:
                del self.decided[k]

    async def _resolver(self, p) -> None:
        """Ask the coordinator about parts that waited too long (or were recovered)."""
        while self.s.primary is p:
            await trio.sleep(RESOLVE_EVERY)
            now = time.monotonic()
            for gtid, st in list(self.parts.items()):
                if self.s.primary is not p:
                    return
                if st.deciding or (not st.recovered and now - st.since < RESOLVE_AFTER):
                    continue
                try:
                    answer = await self.peer.call_group(st.coord, "tx_query", gtid)
                except FsError as exc:
                    log.info("in doubt %s: coordinator group %d: %s", gtid, st.coord, exc)
                    continue
                if answer in ("commit", "abort") and self.s.primary is p:
                    log.info("in doubt %s: coordinator says %s", gtid, answer)
                    self.stats["resolved_" + answer] += 1
                    try:
                        await self.decide(gtid, answer == "commit")
                    except Exception as exc:    # NotPrimary, log failure: try again later
                        log.warning("in doubt %s: %s", gtid, exc)

    def in_doubt(self) -> list[dict]:
        """A primary: its prepared parts, with their age. A backup: its prepared copies
        (their age is the primary's to tell)."""
        if self.s.role == "primary":
            now = time.monotonic()
            return [dict(gtid=st.gtid, coordinator=st.coord, age=round(now - st.since, 3),
                         recovered=st.recovered) for st in self.parts.values()]
        mgr = self.s.fs.mgr if self.s.fs is not None else None
        out = []
        for t in (mgr.in_doubt() if mgr is not None else []):
            pay = t.payload if isinstance(t.payload, dict) else {}
            out.append(dict(gtid=str(pay.get("gtid", t.id)), coordinator=pay.get("coord", -1),
                            age=None, replica=True))
        return out

    def status(self) -> dict:
        """The server's status fields for 2PC."""
        primary = self.s.role == "primary" and self.table is not None
        return dict(in_doubt=self.in_doubt(),
                    pending_decisions=len(self.table.entries) if primary else 0,
                    twopc=dict(self.stats))
