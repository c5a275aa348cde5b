"""Hung workers: a worker whose reactor stopped turning is killed and started again.

Each worker sends a heartbeat every second from its reactor
(:data:`~secure_echo.pool.contract.HEARTBEAT_EVENT`), and any line it writes counts
as a sign of life (:class:`~secure_echo.pool.health.PoolState`).  :class:`HungWatch`
looks a few times per ``timeout`` (``--worker-watchdog``, default 10 s): a worker
silent for ``timeout`` seconds (stopped with SIGSTOP, stuck in a loop, blocked in a
system call) gets ``worker_hung``, then SIGTERM, then SIGKILL :data:`HUNG_GRACE`
seconds later if it is still there; its exit is handled like any other (restart
with backoff).  A worker that drains still sends heartbeats, so a long drain is not
a hang.  A worker that has not reported yet is starting (its imports, its TLS
files): it has :data:`START_ALLOWANCE` seconds if that is longer.

The supervisor's own stalls do not count against its workers: when a look comes
much later than planned (the supervisor's reactor was blocked, or the host
suspended), every worker counts as seen at that moment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from secure_echo.pool.health import PoolState
    from secure_echo.pool.processes import ProcessPool

#: Seconds a hung worker gets between SIGTERM and SIGKILL.
HUNG_GRACE: Final = 3.0
#: The longest interval between two looks, in seconds.
MAX_INTERVAL: Final = 1.0
#: Seconds a starting worker (it reported no state yet: Python imports, the TLS
#: files are loaded) may stay silent, when that is more than the watchdog.
START_ALLOWANCE: Final = 30.0


class HungWatch:
    """Finds silent workers in ``state`` and has ``pool`` stop them; see the module."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        state: PoolState,
        pool: ProcessPool,
        timeout: float,
        *,
        grace: float = HUNG_GRACE,
    ) -> None:
        self._clock = clock
        self._state = state
        self._pool = pool
        self.timeout = timeout
        self.grace = grace
        self.interval = min(MAX_INTERVAL, timeout / 4)
        self._loop: LoopingCall | None = None
        self._last_look: float | None = None
        #: Pids of the workers already found hung (each is reported once).
        self._reported: set[int | None] = set()

    def start(self) -> None:
        """Look every :attr:`interval` seconds, unless the watchdog is off (timeout 0)."""
        if self.timeout <= 0:
            return
        self._loop = LoopingCall(self.look)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """Look no more (the supervisor stops)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def look(self) -> None:
        """Stop each worker silent for :attr:`timeout` seconds."""
        now = self._clock.seconds()
        if self._last_look is not None and now - self._last_look > self.interval * 3 + 1:
            self._state.refresh()
        self._last_look = now
        starting = max(self.timeout, START_ALLOWANCE)
        for index in self._state.silent(self.timeout, starting):
            process = self._pool.workers.get(index)
            if process is None or process.pid in self._reported:
                continue
            self._reported.add(process.pid)
            view = self._state.views[index]
            self.log.error(
                "worker {worker} (pid {pid}) sent nothing for {silent_s:.1f} s: hung; "
                "stopping it (SIGTERM, SIGKILL after {grace:g} s)",
                event="worker_hung",
                worker=index,
                pid=process.pid,
                silent_s=round(now - view.last_seen, 3),
                state=str(view.state) if view.state is not None else "starting",
                watchdog=self.timeout,
                grace=self.grace,
            )
            self._state.lost(index)
            self._pool.terminate(index, self.grace)
