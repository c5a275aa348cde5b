"""A worker process of ``--workers N``: ``python -m secure_echo.pool.worker INDEX``.

Started only by the supervisor (:mod:`secure_echo.pool.supervisor`), which passes:

* the listening sockets, at the descriptor numbers the spec names;
* the spec, JSON in ``$SECURE_ECHO_WORKER`` (:class:`~secure_echo.pool.supervisor.WorkerSpec`);
  ``INDEX`` in argv is only there to make the process recognisable in ``ps``;
* stdin: a pipe the supervisor never writes to.  End of file on it means the
  supervisor is gone: the worker drains and exits (``supervisor_gone``);
* stdout: a pipe for the log records, one JSON object per line, nothing else (the
  standard streams are redirected into the log);
* stderr: a pipe for what is written before logging starts (a crash at import).

The worker is the single-process daemon, ``maker.make_service``, with its
``ListeningService`` replaced by :class:`SharedPortsService`, which adopts the
supervisor's sockets instead of binding.  It opens no log file, serves no metrics and
never talks to systemd (the supervisor does all three).  It logs ``worker_ready`` once it
serves and reports its open connections every second (``worker_stats``, consumed by the
supervisor).  A start-up failure is logged as ``worker_failed`` and the exit status is 2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from twisted.application.service import Service
from twisted.internet import defer, error, tcp, unix
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, globalLogBeginner
from twisted.python import usage
from typing_extensions import override
from zope.interface import implementer

from secure_echo.daemon import maker
from secure_echo.daemon import options as config
from secure_echo.daemon.load import Config, load
from secure_echo.daemon.logs import JSONLinesObserver
from secure_echo.daemon.services import ListeningService
from secure_echo.pool.supervisor import (
    READY_EVENT,
    SPEC_ENV,
    STATS_EVENT,
    STATS_INTERVAL,
    SUPERVISOR_ONLY_ENV,
    SharedSocket,
    WorkerSpec,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import FrameType

    from twisted.application.service import MultiService
    from twisted.internet.interfaces import IListeningPort, IProtocolFactory
    from twisted.logger import LogEvent
    from twisted.python.failure import Failure

    from secure_echo.tls.factory import TLSServerFactory

log = Logger(namespace="secure_echo.pool.worker")


class _SharedUNIXPort(unix.Port):
    """A UNIX port on a socket the supervisor bound, listens on, and owns.

    Twisted's adopted UNIX port (``adoptStreamPort``) calls ``listen()`` again with its
    default backlog of 50, shrinking the one the supervisor set; ``chmod``\\ s the path
    to its default mode (which an unprivileged worker may not do, and which would undo
    ``mode=``); and on close shuts the socket down for every process and removes the
    path that the other workers, and this one's successor, still serve.  This one only
    reads: the supervisor removes the path when it stops.
    """

    # Closing our descriptor must not shut the shared socket down.
    _shouldShutdown = False

    @override
    def startListening(self) -> None:
        # unix.Port.startListening for an adopted socket, without listen() and chmod.
        port: Any = self  # Twisted's port attributes are untyped
        skt = port._preexistingSocket
        if skt is None:  # pragma: no cover - built only by adopt_port below
            raise error.CannotListenError(None, port.port, "no socket to adopt")
        port._preexistingSocket = None
        port.factory.doStart()
        port.connected = True
        port.socket = skt
        port.fileno = skt.fileno
        port.numberAccepts = 100
        port.startReading()

    @override
    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)  # not unix.Port's: it removes the path


def adopt_port(reactor: Any, shared: SharedSocket, factory: IProtocolFactory) -> IListeningPort:
    """Accept on ``shared`` with ``factory``; the caller then closes ``shared.fd``.

    The port holds its own duplicate of the descriptor.  A TCP port adopted this way
    never calls ``listen()`` or ``shutdown()`` (Twisted's own rule for adopted sockets).
    """
    # Twisted accepts in a loop until EAGAIN: on a blocking socket (systemd's default,
    # NonBlocking=no) the second accept would hang the worker.  The flag belongs to
    # the socket all processes share, where non-blocking is right for everyone.
    os.set_blocking(shared.fd, False)
    if shared.address_family == socket.AF_UNIX:
        unix_port: Any = _SharedUNIXPort._fromListeningDescriptor(  # type: ignore[no-untyped-call]
            reactor, shared.fd, factory
        )
        unix_port.startListening()
        return cast("IListeningPort", unix_port)
    return cast(
        "IListeningPort", reactor.adoptStreamPort(shared.fd, shared.address_family, factory)
    )


class SharedPortsService(Service):
    """Accept on the supervisor's sockets; stop accepting when stopped.

    Stands where ``ListeningService`` stands in the single-process tree (added last, so
    stopped first: the drain begins after accepting ended).
    """

    def __init__(
        self, reactor: Any, sockets: Sequence[SharedSocket], factory: IProtocolFactory
    ) -> None:
        self._reactor = reactor
        self._sockets = tuple(sockets)
        self._factory = factory
        self.ports: list[IListeningPort] = []

    @override
    def privilegedStartService(self) -> None:
        try:
            for shared in self._sockets:
                self.ports.append(adopt_port(self._reactor, shared, self._factory))
        except BaseException:
            for port in self.ports:
                port.stopListening()
            self.ports.clear()
            raise
        # Each port holds a duplicate: close the inherited descriptors, so that a
        # port that stops listening leaves no copy behind in this process.
        for shared in self._sockets:
            os.close(shared.fd)
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    @override
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        ports, self.ports = self.ports, []
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in ports]
        ).addCallback(lambda _: None)


class _Pipe:
    """A text stream that goes quiet for good at its first failed write (EPIPE)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> None:
        if not self.broken:
            try:
                self._stream.write(text)
            except (OSError, ValueError):  # EPIPE, or the stream was closed
                self.broken = True

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self.broken = True


@implementer(ILogObserver)
class PipeLogObserver:
    """JSON Lines to the supervisor's pipe; silent once the pipe is gone.

    Writes block when the pipe is full: a supervisor that falls behind slows its
    workers rather than losing their records.  Once a write failed the supervisor is
    gone (stderr, the other pipe to it, is gone too): nothing is reported anywhere.
    """

    def __init__(self, stream: TextIO) -> None:
        self._pipe = _Pipe(stream)
        self._json = JSONLinesObserver(cast("TextIO", self._pipe))

    @property
    def broken(self) -> bool:
        """The pipe broke (the supervisor is gone); nothing more is written."""
        return self._pipe.broken

    def __call__(self, event: LogEvent) -> None:
        """Write ``event`` as one line, unless the pipe broke."""
        if not self._pipe.broken:
            self._json(event)


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
    for reloads.
    """
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
    return load(settings)


def build_worker_service(
    spec: WorkerSpec, reactor: Any
) -> tuple[MultiService, SharedPortsService, TLSServerFactory]:
    """``maker.make_service`` with the shared sockets in place of listening.

    Returns the service tree, its ports service and the connection factory.
    """
    top = maker.make_service(worker_settings(spec), reactor, supervised=True)
    served: IProtocolFactory | None = None
    factory: TLSServerFactory | None = None
    for child in list(top):
        if isinstance(child, ListeningService):
            served = child._factory
            child.disownServiceParent()  # type: ignore[no-untyped-call]
        elif isinstance(child, maker.TLSService):
            factory = child._factory
    if served is None or factory is None:  # pragma: no cover - guards a change in tap
        msg = "maker.make_service built no ListeningService or TLSService"
        raise RuntimeError(msg)
    ports = SharedPortsService(reactor, spec.sockets, served)
    ports.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top, ports, factory


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
        factory: TLSServerFactory,
        addresses: Sequence[str] = (),
    ) -> None:
        self._reactor = reactor
        self._top = top
        self._ports = ports
        self._factory = factory
        self._addresses = list(addresses)
        #: Why the worker is stopping (the first request), or None while serving.
        self.stopping: str | None = None
        self._stats: LoopingCall | None = None

    def start(self) -> None:
        """In the running reactor: take the signals, start serving, say so."""
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._on_signal)
        self._top.startService()
        self._stats = LoopingCall(self.report)
        self._stats.clock = self._reactor
        self._stats.start(STATS_INTERVAL, now=True)
        self._reactor.addReader(ParentWatch(0, self.supervisor_gone))
        log.info(
            "worker ready (pid {pid}), accepting on {addresses}",
            event=READY_EVENT,
            pid=os.getpid(),
            addresses=self._addresses,
            ports=len(self._ports.ports),
        )

    def report(self) -> None:
        """Tell the supervisor how many connections are open (``worker_stats``)."""
        log.debug(
            "{connections} connections open",
            event=STATS_EVENT,
            connections=len(self._factory.connections),
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
        top, ports, factory = build_worker_service(spec, reactor)
        top.privilegedStartService()
    except usage.UsageError as problem:
        log.error("worker cannot start: {error}", event="worker_failed", error=str(problem))
        return 2
    except Exception:
        log.failure("worker cannot start", event="worker_failed")
        return 2
    lifecycle = WorkerLifecycle(reactor, top, ports, factory, [s.address for s in spec.sockets])
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
    observer = PipeLogObserver(sys.stdout)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=True)
    for name in SUPERVISOR_ONLY_ENV:
        os.environ.pop(name, None)
    try:
        spec = WorkerSpec.from_json(os.environ.pop(SPEC_ENV, ""))
    except ValueError as problem:
        log.error("worker cannot start: {error}", event="worker_failed", error=str(problem))
        return 2
    # Installed here, in the process that runs it; never at import.
    from twisted.internet import reactor  # noqa: PLC0415

    return run(spec, reactor)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
