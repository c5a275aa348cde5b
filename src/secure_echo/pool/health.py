"""The pool as its workers report it: who serves, who is silent, ready or not.

State rules (:class:`PoolState`; only the supervisor changes it, from what its
workers write and from their exits):

1. A worker slot is *starting* from its spawn until the worker reports a state
   (:func:`~secure_echo.pool.contract.reported_state`): *serving* once it logs
   ``worker_ready`` or a heartbeat says so, *draining* once it begins its drain.
   Each heartbeat restates the worker's state, so a lost record is corrected a
   second later.
2. Any line a worker writes counts as a sign of life (``last_seen``); the pool's
   ``last_report`` is the latest of them.
3. A slot leaves the state at its worker's exit.
4. *Ready*: the supervisor listens, is not stopping, the certificate in use has not
   expired, and at least one worker serves.  A worker that drains (or dies) only
   lowers the count: when another serves, the pool stays ready.
5. *Alive* (``/healthz``): the supervisor listens and some worker reported within
   ``deadline`` seconds (counted from the supervisor's start until the first report).
6. Whenever the number of serving workers changes, ``on_change`` is called with it.
7. A worker found hung (:mod:`secure_echo.pool.watchdog`) no longer counts as
   serving; only a report of its own (it was only slow) makes it count again.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING

from secure_echo.daemon.logs import iso_timestamp
from secure_echo.pool.contract import WorkerState

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.interfaces import IReactorTime


@dataclass
class WorkerView:
    """One worker as the supervisor last heard of it."""

    pid: int | None
    #: None while starting; then what it reported last.
    state: WorkerState | None
    #: Reactor time of its last line.
    last_seen: float
    #: Reactor time it began serving (None: not serving).
    serving_since: float | None = None
    #: Reactor time it first served (kept while it drains).
    first_served: float | None = None
    #: Open connections, from its last heartbeat.
    connections: int = 0


class PoolState:
    """The workers' reported states; readiness, health and systemd's status from them.

    ``workers`` is the pool's size; ``deadline`` the seconds of silence after which
    the pool is not alive.  ``clock`` is the reactor.
    """

    def __init__(
        self,
        workers: int,
        clock: IReactorTime,
        *,
        deadline: float,
        on_change: Callable[[int], object] | None = None,
    ) -> None:
        self.size = workers
        self._clock = clock
        self.deadline = deadline
        self._on_change = on_change
        self.views: dict[int, WorkerView] = {}
        #: The supervisor's ports listen (for the workers to accept on).
        self.listening = False
        #: The supervisor is stopping: the pool drains.
        self.stopping = False
        #: Reactor time of the latest line from any worker, or of the start.
        self.last_report: float | None = None
        #: The certificate in use: subject and expiry (Unix time).
        self.subject: str | None = None
        self.not_after: float | None = None
        #: Addresses the pool listens on, for the status line.
        self.addresses: list[str] = []
        #: Why a slot's worker could not start, until one serves in that slot.
        self.start_errors: dict[int, str] = {}
        self._serving = 0

    # -- what the supervisor tells it --------------------------------------------------

    def began(self) -> None:
        """The supervisor started: silence is counted from now until the first report."""
        self.last_report = self._clock.seconds()

    def started(self, index: int, pid: int | None) -> None:
        """Worker ``index`` was spawned (rule 1: starting)."""
        self.views[index] = WorkerView(pid, None, self._clock.seconds())
        self._count()

    def seen(self, index: int) -> None:
        """Worker ``index`` wrote a line (rule 2)."""
        now = self._clock.seconds()
        self.last_report = now
        view = self.views.get(index)
        if view is not None:
            view.last_seen = now

    def reported(self, index: int, state: WorkerState, connections: int | None = None) -> None:
        """Worker ``index`` says it is in ``state`` (rule 1)."""
        self.seen(index)
        view = self.views.get(index)
        if view is None:
            return
        if connections is not None:
            view.connections = connections
        if state is view.state:
            return
        view.state = state
        if state is WorkerState.SERVING:
            view.serving_since = self._clock.seconds()
            if view.first_served is None:
                view.first_served = view.serving_since
            self.start_errors.pop(index, None)
        else:
            view.serving_since = None
        self._count()

    def lost(self, index: int) -> None:
        """Worker ``index`` is hung: it no longer counts as serving, whatever it said."""
        view = self.views.get(index)
        if view is not None and view.state is not None:
            view.state = None
            view.serving_since = None
            self._count()

    def failed(self, index: int, error: str) -> None:
        """Worker ``index`` says it cannot start, and why."""
        self.start_errors[index] = error

    def served(self, index: int) -> float | None:
        """Seconds since worker ``index`` first served (None: it never did)."""
        view = self.views.get(index)
        if view is None or view.first_served is None:
            return None
        return self._clock.seconds() - view.first_served

    def ended(self, index: int) -> float | None:
        """Worker ``index`` exited (rule 3); seconds since it first served (None: never)."""
        served = self.served(index)
        self.views.pop(index, None)
        self._count()
        return served

    def refresh(self) -> None:
        """Count every worker as seen now (the supervisor itself could not watch)."""
        now = self._clock.seconds()
        for view in self.views.values():
            view.last_seen = max(view.last_seen, now)

    def certificate(self, subject: object, not_after: object) -> None:
        """The certificate in use changed (a worker loaded or reloaded one)."""
        when = iso_timestamp(not_after)
        if isinstance(subject, str) and when is not None:
            self.subject = subject
            self.not_after = when

    # -- what it answers ---------------------------------------------------------------

    @property
    def serving(self) -> int:
        """How many workers serve."""
        return self._serving

    def silent(self, limit: float, starting_limit: float | None = None) -> list[int]:
        """Workers that wrote nothing for ``limit`` seconds, draining ones included.

        A worker that has not reported a state yet (it starts) is silent only after
        ``starting_limit`` seconds, when given.
        """
        now = self._clock.seconds()
        starting = limit if starting_limit is None else starting_limit
        return sorted(
            index
            for index, view in self.views.items()
            if now - view.last_seen >= (starting if view.state is None else limit)
        )

    def connections(self) -> int:
        """Open connections of every worker, from their last heartbeats."""
        return sum(view.connections for view in self.views.values())

    def health(self) -> tuple[bool, str]:
        """``(alive, reason)``: rule 5."""
        if not self.listening or self.last_report is None:
            return False, "not listening yet"
        quiet = self._clock.seconds() - self.last_report
        if quiet >= self.deadline:
            return False, f"no worker has reported for {quiet:.0f} s"
        return True, "ok"

    def readiness(self, now: float) -> tuple[bool, str]:
        """``(ready, reason)`` at Unix time ``now``: rule 4."""
        if not self.listening:
            return False, "not listening yet"
        if self.stopping:
            return False, "draining: the daemon is shutting down"
        if self.not_after is not None and now >= self.not_after:
            expired = datetime.datetime.fromtimestamp(self.not_after, datetime.UTC)
            return False, f"the server certificate expired at {expired.isoformat()}"
        if not self._serving:
            return False, "no worker serving: " + self.status()
        return True, "ready: " + self.serving_text()

    def serving_text(self) -> str:
        """``N/M workers serving``."""
        return f"{self._serving}/{self.size} workers serving"

    def status(self) -> str:
        """The one-line STATUS= text for systemd."""
        parts = [self.serving_text()]
        parts += [f"worker {i} cannot start: {e}" for i, e in sorted(self.start_errors.items())]
        if self.addresses:
            parts.append("listening on " + ", ".join(self.addresses))
        if self.subject is not None and self.not_after is not None:
            until = datetime.datetime.fromtimestamp(self.not_after, datetime.UTC)
            parts.append(f"certificate {self.subject} valid until {until:%Y-%m-%d}")
        return "; ".join(parts)

    def _count(self) -> None:
        serving = sum(1 for v in self.views.values() if v.state is WorkerState.SERVING)
        if serving != self._serving:
            self._serving = serving
            if self._on_change is not None:
                self._on_change(serving)
