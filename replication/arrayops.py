"""A running server's array, operated over its authenticated connection (`ArrayOpsRole`,
mixed into `ReplicaServer`).

`replfs raid rebuild|scrub|status|pause|resume|cancel|speed --server S` and `replfs fault
fail-disk --server S` send an `ArrayOp` (a wire message, defined here) to server S
instead of opening the array (which S holds); S answers `ArrayOpReply` with its array's
status and background job (raid/jobs.py), or one sentence saying why it did not do it. The rebuild and scrub run
in the background inside S while it keeps serving; the command only starts, steers and
watches them. Paths (`--image`) are paths on S's machine.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import trio

from replfs.raid.errors import RaidError
from replfs.replication import wire

log = logging.getLogger("replfs.server")

@wire.message
class ArrayOp:
    """`replfs raid ... --server S` / `fault fail-disk --server S`: `action` is one of
    ACTIONS, `params` its arguments (disk, image, speed_min, speed_max). (Registered with
    the wire's other messages; defined here, beside its only handler.)"""
    TAG: ClassVar[str] = "array-op"
    action: str
    params: dict


@wire.message
class ArrayOpReply:
    """The array's status and its background job after the action, or `error`: one
    sentence saying why the action was not done."""
    TAG: ClassVar[str] = "array-op-reply"
    info: dict
    error: str = ""


ACTIONS = ("status", "rebuild", "scrub", "pause", "resume", "cancel", "speed", "fail-disk")
_TYPES = {"disk": int, "image": str, "speed_min": int, "speed_max": int}


def check_params(action: str, params: dict) -> None:
    """ProtocolError for an action or argument a correct client never sends."""
    if action not in ACTIONS:
        raise wire.ProtocolError(f"unknown array action {action!r}")
    for k, v in params.items():
        t = _TYPES.get(k)
        if t is None or (v is not None and (not isinstance(v, t) or isinstance(v, bool))):
            raise wire.ProtocolError(f"bad array parameter {k}={v!r}")
        if k.startswith("speed") and v is not None and v < 0:
            raise wire.ProtocolError(f"bad array parameter {k}={v!r}")
    if action in ("rebuild", "fail-disk") and params.get("disk") is None:
        raise wire.ProtocolError(f"array action {action} needs a disk")


class ArrayOpsRole:
    """Part of `ReplicaServer`: `_on_array_op`. Uses its `array` and `jobs`
    (raid.jobs.ArrayJobs, run in the server's nursery)."""

    async def _on_array_op(self, ch: wire.Channel, msg: ArrayOp) -> None:
        if not (isinstance(msg.action, str) and isinstance(msg.params, dict)):
            raise wire.ProtocolError("malformed array-op")
        check_params(msg.action, msg.params)
        p = msg.params
        error = ""
        try:
            if msg.action == "rebuild":
                await self.jobs.start_rebuild(p["disk"], p.get("image"), p.get("speed_min"),
                                              p.get("speed_max"))
                log.warning("rebuild of disk %d started%s", p["disk"],
                            f" onto {p['image']}" if p.get("image") else "")
            elif msg.action == "scrub":
                await self.jobs.start_scrub(p.get("speed_min"), p.get("speed_max"))
                log.info("scrub started")
            elif msg.action == "pause":
                self.jobs.pause()
            elif msg.action == "resume":
                self.jobs.resume()
            elif msg.action == "cancel":
                await self.jobs.cancel()
            elif msg.action == "speed":
                self.jobs.set_speed(p.get("speed_min"), p.get("speed_max"))
            elif msg.action == "fail-disk":
                await self._fail_disk(p["disk"])
        except RaidError as exc:
            error = str(exc)
        await ch.send(ArrayOpReply(self.array_info(), error))

    async def _fail_disk(self, k: int) -> None:
        j = self.jobs.job
        if j is not None and j.kind == "rebuild" and j.disk == k and j.state in ("running",
                                                                                "paused"):
            await self.jobs.cancel()
        await trio.to_thread.run_sync(self.array.fail_disk, k)
        log.warning("disk %d marked failed by the operator; the array runs degraded", k)

    def array_info(self) -> dict:
        """The array's status (as `replfs raid status` shows it) and its background job."""
        return dict(server=self.name, array=self.array.status(), job=self.jobs.status())
