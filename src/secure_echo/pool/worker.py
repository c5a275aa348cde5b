"""A worker process of ``--workers N``: ``python -m secure_echo.pool.worker INDEX``.

Started only by the supervisor, as :mod:`secure_echo.pool.contract` describes (the
spec in ``$SECURE_ECHO_WORKER``, the sockets and TLS file copies at the descriptors
it names, stdin a pipe whose end of file means the supervisor is gone, stdout the
record pipe, stderr for what comes before logging starts).

The worker is the single-process daemon, ``maker.make_service``, given two things:
the :func:`~secure_echo.pool.ports.adopt` listen strategy (it accepts on the
supervisor's sockets instead of binding) and its number (connection ids
``<worker>-<n>``, or ``<worker>.<start>-<n>`` for a slot's restarted process;
``worker`` in the info reply).  It opens no log file, serves no
metrics and never talks to systemd (the supervisor does all three).  Its records go
to the supervisor through a pipe it never blocks on (:mod:`secure_echo.pool.logpipe`).

It logs ``worker_ready`` once it serves and a heartbeat every second from its
reactor (``worker_heartbeat``: its state and open connections), which the supervisor
watches for hung workers.  A start-up failure is logged as ``worker_failed`` and the
exit status is 2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.reactors import NoSuchReactor, installReactor
from twisted.internet import error
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner
from twisted.python import usage
from zope.interface import implementer

from secure_echo.daemon import maker
from secure_echo.daemon import options as config
from secure_echo.daemon.load import Config, load
from secure_echo.pool.contract import (
    EXIT_CANNOT_START,
    FAILED_EVENT,
    HEARTBEAT_EVENT,
    HEARTBEAT_INTERVAL,
    READY_EVENT,
    SPEC_ENV,
    SUPERVISOR_ONLY_ENV,
    WorkerSpec,
    WorkerState,
)
from secure_echo.pool.logpipe import PipeLogObserver
from secure_echo.pool.ports import SharedPortsService, adopt
from secure_echo.pool.tlsfiles import close_all, readable_settings, with_real_paths

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import FrameType

    from twisted.application.service import MultiService
    from twisted.python.failure import Failure

log = Logger(namespace="secure_echo.pool.worker")


@implementer(IReadDescriptor)
class ParentWatch:
    """Calls ``gone`` when ``fd`` (the pipe from the supervisor) reaches end of file."""

    def __init__(self, fd: int, gone: Callable[[], object]) -> None:
        self._fd = fd
        self._gone = gone
        #: End of file was read: the supervisor closed its end.
        self.eof = False
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        """The watched descriptor."""
        return self._fd

    # IReadDescriptor says Failure, but the reactor looks the reason's class up and
    # Twisted's own descriptors return the exception (CONNECTION_DONE), as here.
    def doRead(self) -> error.ConnectionDone | None:  # type: ignore[override]
        """Read and drop whatever came; report end of file (or an error) as done."""
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if data:
            return None
        self.eof = True
        return CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:  # noqa: ARG002 - the pipe tells
        """Removed from the reactor: the pipe hung up, or the reactor stops.

        The epoll reactor reports a hang-up without calling :meth:`doRead`, and a
        stopping reactor removes every reader the same way; the pipe itself says which.
        """
        if self.eof or self._at_eof():
            self._gone()

    def _at_eof(self) -> bool:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return False
        except OSError:
            return True
        self.eof = not data
        return self.eof

    def logPrefix(self) -> str:
        """Twisted's name for this descriptor in its log."""
        return "ParentWatch"


def worker_settings(spec: WorkerSpec) -> Config:
    """Settings validated from ``spec.values``, as the supervisor validated them, loaded.

    Raises ``usage.UsageError`` if they no longer validate or load (a file went
    missing).  The config file and command line are set back to the supervisor's,
    for reloads.  A TLS file this process may not read is loaded from the
    supervisor's copy (:mod:`secure_echo.pool.tlsfiles`), whose descriptors are
    closed here.
    """
    try:
        options = config.Options()
        options.apply_sources(None, spec.values)
        options.postOptions()
        settings = replace(
            options.settings,
            listens=(),
            workers=1,
            config_file=Path(spec.config_file) if spec.config_file else None,
            command_line=spec.command_line,
        )
        real = settings.tls_settings
        readable, copied = readable_settings(real, spec.tls_files)
        cfg = load(replace(settings, tls_settings=readable))
    finally:
        close_all(c.fd for c in spec.tls_files)
    if copied:
        log.info(
            "read {files} from the supervisor's copy: this user ({uid}) may not read them",
            event="tls_files_from_supervisor",
            files=copied,
            uid=os.getuid(),
        )
        cfg = with_real_paths(cfg, real)
    return cfg


def build_worker_service(
    spec: WorkerSpec, cfg: Config, reactor: Any
) -> tuple[MultiService, SharedPortsService]:
    """``maker.make_service`` adopting the shared sockets; the tree and its ports service."""
    built: list[SharedPortsService] = []
    strategy = adopt(reactor, spec.sockets, built)
    top = maker.make_service(cfg, reactor, listen=strategy, worker=spec.index, start=spec.start)
    return top, built[0]


def _stop_reactor(reactor: Any) -> None:
    if reactor.running:
        with contextlib.suppress(error.ReactorNotRunning):  # already stopping
            reactor.stop()


class WorkerLifecycle:
    """A started worker: its reports to the supervisor and the one way it stops.

    Stop requests (SIGTERM, SIGINT, the supervisor gone) begin the drain once, by
    stopping the reactor; later ones change nothing.  Twisted's own signal handlers
    call ``reactor.stop()`` at every SIGTERM, and a second one raises
    ``ReactorNotRunning`` into the log; a worker often gets two (systemd signals the
    whole control group and the supervisor forwards its own), so :meth:`start`
    replaces them.
    """

    def __init__(
        self,
        reactor: Any,
        top: MultiService,
        ports: SharedPortsService,
        addresses: Sequence[str] = (),
    ) -> None:
        self._reactor = reactor
        self._top = top
        self._ports = ports
        self._addresses = list(addresses)
        #: Why the worker is stopping (the first request), or None while serving.
        self.stopping: str | None = None
        self._heartbeat: LoopingCall | None = None

    def start(self) -> None:
        """In the running reactor: take the signals, start serving, say so."""
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._on_signal)
        self._top.startService()
        self._reactor.addReader(ParentWatch(0, self.supervisor_gone))
        log.info(
            "worker ready (pid {pid}), accepting on {addresses}",
            event=READY_EVENT,
            pid=os.getpid(),
            addresses=self._addresses,
            ports=len(self._ports.ports),
        )
        self._heartbeat = LoopingCall(self.heartbeat)
        self._heartbeat.clock = self._reactor
        self._heartbeat.start(HEARTBEAT_INTERVAL, now=True)

    def heartbeat(self) -> None:
        """Tell the supervisor this reactor turns, the state and the open connections."""
        state = WorkerState.SERVING if self.stopping is None else WorkerState.DRAINING
        log.debug(
            "{state}, {connections} connections open",
            event=HEARTBEAT_EVENT,
            state=str(state),
            connections=len(self._ports.factory.connections),
        )

    def stop(self, why: str) -> None:
        """Begin the drain once; later requests change nothing."""
        if self.stopping is None:
            self.stopping = why
            _stop_reactor(self._reactor)

    def signalled(self, name: str) -> None:
        """A stop signal arrived (now in the reactor)."""
        if self.stopping is None:
            log.info("{signal}: draining and exiting", event="worker_stopping", signal=name)
        self.stop(name)

    def supervisor_gone(self) -> None:
        """The pipe from the supervisor hung up: it is gone."""
        if self.stopping is None:
            log.warn(
                "the supervisor is gone (stdin closed): draining and exiting",
                event="supervisor_gone",
            )
        self.stop("supervisor_gone")

    def _on_signal(self, number: int, _frame: FrameType | None) -> None:
        """Signal context: only hop into the reactor."""
        self._reactor.callFromThread(self.signalled, signal.Signals(number).name)


def run(spec: WorkerSpec, reactor: Any) -> int:
    """Serve until the reactor stops; the exit status."""
    try:
        cfg = worker_settings(spec)
        top, ports = build_worker_service(spec, cfg, reactor)
        top.privilegedStartService()
    except usage.UsageError as problem:
        log.error("worker cannot start: {error}", event=FAILED_EVENT, error=str(problem))
        return EXIT_CANNOT_START
    except Exception:
        log.failure("worker cannot start", event=FAILED_EVENT, error="an unexpected error")
        return EXIT_CANNOT_START
    lifecycle = WorkerLifecycle(reactor, top, ports, [s.address for s in spec.sockets])
    reactor.callWhenRunning(lifecycle.start)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    # Python restores the default action of signals with Python handlers while the
    # interpreter finalizes: a SIGTERM arriving then would end an orderly exit as
    # "killed".  The work is done; ignore them from here on.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)
    return 0


def main(argv: Sequence[str] | None = None) -> int:  # noqa: ARG001 - argv is for ps only
    """The worker's entry point; returns the exit status."""
    # A SIGHUP forwarded, or a SIGUSR1 sent to the whole control group, before the
    # services take them over must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    observer = PipeLogObserver(1)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=True)
    for name in SUPERVISOR_ONLY_ENV:
        os.environ.pop(name, None)
    try:
        spec = WorkerSpec.from_json(os.environ.pop(SPEC_ENV, ""))
    except ValueError as problem:
        log.error("worker cannot start: {error}", event=FAILED_EVENT, error=str(problem))
        observer.pipe.drain()
        return EXIT_CANNOT_START
    observer.pipe.limit = spec.log_buffer
    if spec.reactor is not None:
        try:
            installReactor(spec.reactor)
        except (NoSuchReactor, ImportError, error.ReactorAlreadyInstalledError) as problem:
            log.error(
                "worker cannot start: {error}",
                event=FAILED_EVENT,
                error=f"reactor {spec.reactor!r}: {problem}",
            )
            observer.pipe.drain()
            return EXIT_CANNOT_START
    # Installed here, in the process that runs it; never at import.
    from twisted.internet import reactor  # noqa: PLC0415

    observer.pipe.attach(reactor)
    try:
        return run(spec, reactor)
    finally:
        observer.pipe.drain()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
