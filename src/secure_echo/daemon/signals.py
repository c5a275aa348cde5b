"""Signals beyond twistd's own: a second stop signal during the drain, and a stray SIGUSR1.

twistd stops the reactor at SIGTERM and SIGINT; the reactor's shutdown then stops the
services, which is the drain (up to ``--drain-timeout``).  Two gaps remain, and
:class:`SignalService` closes them, for the single process and for the supervisor of
``--workers N`` alike:

* **A second SIGTERM or SIGINT during the drain ends the process at once.**  The
  operator (or a second Ctrl-C) does not want to wait for the drain.  Before,
  twistd's handler called ``reactor.stop()`` again, which raised
  ``ReactorNotRunning`` into the log as an unhandled error, and the drain went on.
  Once the reactor runs, this service puts its own handler in front of twistd's
  (where twistd installed one: a SIGINT ignored from the start, as in a background
  job, stays ignored).  The first stop signal is passed on to twistd's handler
  unchanged (so the exit status of an orderly stop stays what twistd makes it); a
  stop signal after that, or after the services began stopping for any reason, is
  a forced stop:

  1. the handler only hops into the reactor (``callFromThread``), which stays
     responsive during the drain;
  2. there ``cut()`` runs (the supervisor SIGKILLs its workers) and returns fields
     for the record; ``shutdown_forced`` is logged (every log sink flushes each
     record as it is written), standard output and error are flushed;
  3. the process ends with ``os._exit(FORCED_EXIT_STATUS)``.

  ``os._exit`` rather than stopping the reactor harder: twistd offers no hook to
  change its exit status (after the reactor returns it re-raises the *first* signal
  against itself, which would look like an orderly stop), and an interpreter exit
  would first run the reactor's remaining shutdown and join its thread pool, which
  is the very wait the operator refused.  The open sockets are closed by the kernel.
  What is skipped: a ``connection_closed`` record for each connection still open
  (``shutdown_forced`` counts them), and twistd's removal of its pid file (twistd
  removes a stale one at the next start).  Should a third signal come before the
  reactor got to step 2 (a reactor that no longer turns), the handler calls
  ``os._exit`` itself, without a record.

  A worker of ``--workers N`` does not take this part: it routinely gets two
  SIGTERMs (systemd signals the whole control group and the supervisor forwards its
  own), and the supervisor's forced stop kills it anyway.

* **SIGUSR1 with nothing to reopen is logged and ignored.**  SIGUSR1 reopens
  ``--log-file`` (:class:`secure_echo.daemon.logs.JSONLogService`), and twistd's own
  ``--logfile`` rotates on it; without either, its default action ends the process,
  so a logrotate ``postrotate`` or a ``systemctl kill -s USR1`` aimed at the wrong
  set-up would kill the daemon.  When no handler is installed, this service
  installs one that logs ``signal_ignored``, before anything listens (so from the
  first ``listening`` record on).  When the services stop, the drain begins and
  SIGUSR1 is ignored without a record until the process exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Final

from twisted.application.service import Service
from twisted.logger import Logger
from typing_extensions import override

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import FrameType

#: The exit status of a forced stop (an orderly one exits 0 or by its signal).
FORCED_EXIT_STATUS: Final = 1
#: The signals that stop the daemon.
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

_Handler = Any  # what signal.signal takes and returns: a callable, SIG_DFL, SIG_IGN or None


class SignalService(Service):
    """Forced stop on a second stop signal, and SIGUSR1 ignored when nothing handles it.

    ``cut`` is called in the reactor at a forced stop, before the record is written;
    it ends what is left and returns fields for ``shutdown_forced``.
    ``forced_stop`` False leaves SIGTERM and SIGINT alone (a worker); ``ignore_usr1``
    False leaves SIGUSR1 alone.  ``install``, ``current`` and ``exit`` stand for
    ``signal.signal``, ``signal.getsignal`` and ``os._exit`` (tests replace them).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        cut: Callable[[], Mapping[str, object]] | None = None,
        forced_stop: bool = True,
        ignore_usr1: bool = True,
        install: Callable[[int, _Handler], _Handler] = signal.signal,
        current: Callable[[int], _Handler] = signal.getsignal,
        exit: Callable[[int], object] = os._exit,  # noqa: A002 - names what it stands for
    ) -> None:
        self._reactor = reactor
        self._cut = cut
        self._forced_stop = forced_stop
        self._ignore_usr1 = ignore_usr1
        self._install = install
        self._current = current
        self._exit = exit
        #: The handlers ours replaced, by signal number.
        self.previous: dict[int, _Handler] = {}
        #: What began the stop (a signal's name, or ``"shutdown"``), once it began.
        self.stopping: str | None = None
        #: Reactor time (``seconds()``) the stop began.
        self._stop_began: float | None = None
        #: A forced stop was requested and waits for the reactor.
        self.forcing = False

    @override
    def privilegedStartService(self) -> None:
        # Before the listening service binds (it comes later in the tree): from the
        # first ``listening`` record on, SIGUSR1 is never fatal.
        self._take_usr1()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def _take_usr1(self) -> None:
        if (
            self._ignore_usr1
            and signal.SIGUSR1 not in self.previous
            and not callable(self._current(signal.SIGUSR1))
        ):
            self.previous[signal.SIGUSR1] = self._install(signal.SIGUSR1, self._on_usr1)

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._take_usr1()
        if self._forced_stop:
            # twistd installs its SIGTERM/SIGINT handlers as the reactor starts,
            # after startService: ours go in front of them once it runs (a tree
            # started without a running reactor, in a test, takes none).
            self._reactor.callWhenRunning(self._take_stop_signals)

    @override
    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        # The services stop: the drain begins, whatever stopped the reactor.
        self._began("shutdown")
        if self.previous.pop(signal.SIGUSR1, None) is not None:
            # Nothing to log to for long, and SIGUSR1 must stay harmless: ignored.
            self._install(signal.SIGUSR1, signal.SIG_IGN)

    def _take_stop_signals(self) -> None:
        if not self.running:
            return  # stopped before the reactor ran
        for number in STOP_SIGNALS:
            # Only in front of a handler (twistd's).  A signal left at its default
            # or ignored (SIGINT in a background job) stays as it is.
            if callable(self._current(number)):
                self.previous[number] = self._install(number, self._on_stop_signal)

    def _began(self, why: str) -> None:
        if self.stopping is None:
            self.stopping = why
            self._stop_began = self._reactor.seconds()

    def _on_stop_signal(self, number: int, frame: FrameType | None) -> None:
        """Signal context: pass the first stop on; force any later one."""
        name = signal.Signals(number).name
        if self.forcing:
            # The reactor has not acted on the last one: it may not turn at all.
            self._exit(FORCED_EXIT_STATUS)
        elif self.stopping is not None:
            self.forcing = True
            self._reactor.callFromThread(self.force, name)
        else:
            self._began(name)
            # twistd's handler: it logs, stops the reactor and keeps the signal for
            # the exit status.
            self.previous[number](number, frame)

    def force(self, name: str) -> None:
        """In the reactor: end what is left, log ``shutdown_forced``, exit at once.

        The exit happens whatever goes wrong before it: the operator asked for it.
        """
        try:
            fields = dict(self._cut()) if self._cut is not None else {}
            began = self._stop_began if self._stop_began is not None else self._reactor.seconds()
            self.log.warn(
                "{signal} during the drain: exiting at once with status {status}",
                event="shutdown_forced",
                signal=name,
                first=self.stopping,
                stopping_s=round(self._reactor.seconds() - began, 3),
                status=FORCED_EXIT_STATUS,
                **fields,
            )
            for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(Exception):
                    if stream is not None:
                        stream.flush()
        finally:
            self._exit(FORCED_EXIT_STATUS)

    def _on_usr1(self, number: int, _frame: FrameType | None) -> None:
        """Signal context: only hop into the reactor, which logs."""
        self._reactor.callFromThread(self._usr1_ignored, signal.Signals(number).name)

    def _usr1_ignored(self, name: str) -> None:
        self.log.info(
            "{signal} ignored: there is no --log-file to reopen",
            event="signal_ignored",
            signal=name,
            pid=os.getpid(),
        )
