"""Finding the active view server: a cluster may run several view server processes
(`ClusterConfig.viewservers`), of which one is active and the others stand by, refusing
connections (replication/viewserver.py run_viewserver). The dialler tries each in turn,
starting with the one that answered last."""

from __future__ import annotations

import trio

from replfs.replication import wire
from replfs.replication.config import ClusterConfig


class ViewServers:
    def __init__(self, cfg: ClusterConfig, me: str, secret: bytes):
        self.cfg = cfg
        self.me = me
        self.secret = secret
        self._good = 0

    async def connect(self, timeout: float) -> wire.Channel:
        """An authenticated channel to a view server that accepted it (`timeout` for
        each one tried); the last connection error if none did."""
        names = self.cfg.viewservers
        last: BaseException = OSError("no view server configured")
        for i in range(len(names)):
            k = (self._good + i) % len(names)
            try:
                with trio.fail_after(timeout):
                    ch = await wire.connect(self.cfg.addr(self.me, names[k]), self.secret,
                                            self.me)
            except wire.CONN_ERRORS as exc:
                last = exc
                continue
            self._good = k
            return ch
        raise last

    def failed(self) -> None:
        """The view server last connected to dropped us (it may have stopped being
        active): start with the next one."""
        self._good = (self._good + 1) % len(self.cfg.viewservers)

    async def ask(self, msg, timeout: float):
        """Send `msg` on a fresh connection and return the answer; a view server that
        closes without answering counts as down, and the next is tried."""
        last: BaseException = OSError("no view server configured")
        for _ in range(len(self.cfg.viewservers)):
            ch = await self.connect(timeout)
            try:
                with trio.fail_after(timeout):
                    await ch.send(msg)
                    return await ch.receive()
            except wire.CONN_ERRORS as exc:
                last = exc
                self.failed()
            finally:
                await ch.aclose()
        raise last
