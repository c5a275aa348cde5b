"""The reload coordinator: SIGHUP to the supervisor becomes one reload of every worker.

Each worker reloads its TLS material itself (``tls_reloaded`` / ``tls_reload_failed``,
relayed with ``worker``).  :class:`ReloadCoordinator` forwards SIGHUP to every
serving worker, tells systemd ``RELOADING=1``, waits (at most :data:`RELOAD_TIMEOUT`)
for each worker's outcome in a :class:`ReloadRound`, then logs ``workers_reloaded``
and tells systemd ``READY=1`` with the status, also when some failed (they keep the
previous certificate and still serve).  A newer SIGHUP supersedes a round still
waiting; a worker that exits before it answered is *missing*.

The supervisor, not each worker, names the changed settings a reload cannot apply
(:class:`RestartWatch`, ``reload_needs_restart``): the workers' settings are the
supervisor's copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

from twisted.application.service import Service
from twisted.logger import Logger, LogLevel, LogPublisher, globalLogPublisher
from typing_extensions import override

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from twisted.internet.interfaces import IDelayedCall
    from twisted.logger import ILogObserver, LogEvent

    from secure_echo.daemon.restart import RestartCheck
    from secure_echo.daemon.sdnotify import Notifier

#: Seconds a forwarded SIGHUP waits for every worker's reload outcome.
RELOAD_TIMEOUT: Final = 10.0
#: The records that end a worker's reload.
_OUTCOMES: Final = frozenset({"tls_reloaded", "tls_reload_failed"})


@dataclass
class ReloadOutcome:
    """How the workers of one forwarded SIGHUP fared."""

    reloaded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    #: Workers that gave no outcome in time or exited first.
    missing: list[int] = field(default_factory=list)


class ReloadRound:
    """One forwarded SIGHUP: which workers still owe ``tls_reloaded``/``tls_reload_failed``.

    ``done`` is called once, with the outcome, when every worker answered, left, or
    ``timeout`` seconds passed.
    """

    def __init__(
        self,
        workers: Iterable[int],
        clock: Any,
        timeout: float,
        done: Callable[[ReloadOutcome], object],
    ) -> None:
        self.pending = set(workers)
        self.outcome = ReloadOutcome()
        self._done = done
        self._finished = False
        self._timer: IDelayedCall | None = None
        if self.pending:
            self._timer = clock.callLater(timeout, self._expire)

    @property
    def finished(self) -> bool:
        """Whether ``done`` has been called (or the round was cancelled)."""
        return self._finished

    def check(self) -> None:
        """Finish now if no worker is pending (a round with no workers at all)."""
        if not self.pending:
            self._finish()

    def record(self, worker: int, ok: bool) -> None:
        """Worker ``worker`` logged its reload outcome."""
        if self._finished or worker not in self.pending:
            return
        self.pending.discard(worker)
        (self.outcome.reloaded if ok else self.outcome.failed).append(worker)
        self.check()

    def forget(self, worker: int) -> None:
        """Worker ``worker`` exited before it answered."""
        if self._finished or worker not in self.pending:
            return
        self.pending.discard(worker)
        self.outcome.missing.append(worker)
        self.check()

    def cancel(self) -> None:
        """Drop the round without calling ``done`` (shutdown, or a newer SIGHUP)."""
        self._finished = True
        self._stop_timer()

    def _expire(self) -> None:
        self._timer = None
        self.outcome.missing.extend(sorted(self.pending))
        self.pending.clear()
        self._finish()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._stop_timer()
        self._done(self.outcome)


class ReloadCoordinator:
    """Forwards SIGHUP to the serving workers and reports the round's outcome.

    ``targets`` names the workers to reload (those serving); ``send`` sends a signal
    to one (False if it is gone); ``status`` is systemd's status line.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        *,
        targets: Callable[[], Iterable[int]],
        send: Callable[[int, str], bool],
        status: Callable[[], str],
        notifier: Notifier | None = None,
        timeout: float = RELOAD_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._targets = targets
        self._send = send
        self._status = status
        self.notifier = notifier
        self.timeout = timeout
        self.round: ReloadRound | None = None

    def reload(self) -> None:
        """Forward SIGHUP to every serving worker and wait for their outcomes."""
        targets = sorted(self._targets())
        if self.round is not None:
            self.round.cancel()  # superseded: this round's READY=1 covers both
        if self.notifier is not None:
            self.notifier.reloading()
        self.log.info(
            "forwarding SIGHUP to workers {workers}",
            event="reload_forwarded",
            workers=targets,
        )
        self.round = ReloadRound(targets, self._clock, self.timeout, self._reloaded)
        for index in targets:
            if not self._send(index, "HUP"):
                self.round.forget(index)
        self.round.check()

    def record(self, worker: int, record: Mapping[str, Any]) -> None:
        """A record of worker ``worker``: the outcome of its SIGHUP reload, maybe."""
        name = record.get("event")
        if name in _OUTCOMES and record.get("trigger") == "SIGHUP" and self.round is not None:
            self.round.record(worker, name == "tls_reloaded")

    def forget(self, worker: int) -> None:
        """Worker ``worker`` exited: it owes no outcome any more."""
        if self.round is not None:
            self.round.forget(worker)

    def cancel(self) -> None:
        """Shutdown: drop the round under way, without a READY=1."""
        if self.round is not None:
            self.round.cancel()
            self.round = None

    def _reloaded(self, outcome: ReloadOutcome) -> None:
        self.round = None
        complete = not outcome.failed and not outcome.missing
        self.log.emit(
            LogLevel.info if complete else LogLevel.warn,
            "TLS reload: {count} workers reloaded, failed in {failed}, no answer from {missing}",
            event="workers_reloaded",
            count=len(outcome.reloaded),
            reloaded=sorted(outcome.reloaded),
            failed=sorted(outcome.failed),
            missing=sorted(outcome.missing),
        )
        if self.notifier is not None:
            prefix = ""
            if outcome.failed:
                prefix = "TLS reload failed in workers " + ", ".join(
                    str(i) for i in sorted(outcome.failed)
                )
                prefix += " (previous certificate kept); "
            self.notifier.ready(prefix + self._status())


class RestartWatch(Service):
    """Names the settings a reload did not apply, for the reloads the supervisor sees.

    The workers reload, but their settings are the supervisor's copy, so the
    supervisor checks (:class:`~secure_echo.daemon.restart.RestartCheck`): after each
    forwarded SIGHUP (``workers_reloaded``), and when workers report a file-change
    reload, once per new content of the file.  It watches the log (``publisher``)
    for those records while running; log observers must not log, so each check runs
    in the next reactor turn.
    """

    def __init__(
        self, check: RestartCheck, reactor: Any, publisher: LogPublisher | None = None
    ) -> None:
        self._check = check
        self._reactor = reactor
        self._publisher = publisher if publisher is not None else globalLogPublisher
        # A plain callable is an observer to LogPublisher; the interface says so.
        self._observer = cast("ILogObserver", self.observe)

    def observe(self, event: LogEvent) -> None:
        """A log record: schedule a check if it ends a reload."""
        name = event.get("event")
        if name == "workers_reloaded":
            self._reactor.callLater(0, self._check.check, "SIGHUP")
        elif name in _OUTCOMES and event.get("trigger") == "file-change" and "worker" in event:
            self._reactor.callLater(0, self._check.check, "file-change", only_if_changed=True)

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._publisher.addObserver(self._observer)

    @override
    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self._publisher.removeObserver(self._observer)
