"""``--workers N``: a supervisor process and N worker processes on shared sockets.

Twisted has no ``SO_REUSEPORT``.  Instead the supervisor (the twistd process) binds
every ``--listen`` endpoint itself and hands the listening sockets to N worker
processes, which accept on them; the kernel gives each new connection to whichever
worker accepts it first (Linux does not promise an even spread).

Roles:

* **Supervisor** (:class:`WorkerSupervisor`, built by :func:`make_supervisor` when
  ``--workers`` is above 1).  It listens in ``privilegedStartService`` with the same
  :class:`~secure_echo.daemon.services.ListeningService` as one process (same one-line errors,
  same ``listening`` events, ``systemd:`` sockets adopted), then at once stops reading
  from those ports: it never accepts.  It keeps them open to hand to every worker it
  starts: ``python -m secure_echo.pool.worker INDEX`` with each socket at its own descriptor
  number and a :class:`WorkerSpec` (JSON in ``$SECURE_ECHO_WORKER``) that holds the
  supervisor's validated option values, so every worker, restarted ones included, runs
  the settings the supervisor started with.
* **Worker** (:mod:`secure_echo.pool.worker`): the single-process daemon (``maker.make_service``)
  that adopts the sockets instead of listening, opens no log file, serves no metrics
  and never talks to systemd.

Logging: one file, whole lines.  A worker writes its records (``logs.event_as_record``,
one JSON object per line) to its stdout.  The supervisor splits each pipe into lines
(:class:`RecordReader`), adds ``worker`` (1 to N) and re-emits each record into its own
log publisher (:func:`record_as_event`), so its ``JSONLogService`` writes every line
whole and its ``Metrics`` observer (``--metrics`` is served by the supervisor) sees every
worker's events.  ``worker_stats`` records (a worker's open connections, each second)
are for the supervisor only and are not logged: :class:`WorkerStats` sums the latest of
each worker for ``secure_echo_connections_active``.  A worker's stderr lines become
``worker_stderr`` warnings; a stdout line that is not a JSON object becomes
``worker_output_invalid``.

Signals and lifecycle:

* SIGHUP to the supervisor is forwarded to every ready worker, which reloads its TLS
  material itself (``tls_reloaded`` / ``tls_reload_failed`` with ``worker``).  A
  :class:`ReloadRound` waits (at most :data:`RELOAD_TIMEOUT`) for each one's outcome.
  The supervisor, not each worker, names the changed settings a reload cannot apply
  (:class:`RestartWatch`, ``reload_needs_restart``).
* SIGTERM/SIGINT: the supervisor closes its copies of the listening sockets, sends
  SIGTERM to every worker (each stops accepting and drains as one process does) and
  waits for them to exit, at most ``--drain-timeout`` + :data:`STOP_GRACE` seconds;
  then SIGKILL (``worker_killed``).  A second SIGTERM/SIGINT meanwhile SIGKILLs every
  worker still running and exits at once (``shutdown_forced``,
  :mod:`secure_echo.daemon.signals`).
* SIGUSR1 reopens the supervisor's ``--log-file``; without one, the supervisor and each
  worker log ``signal_ignored`` and go on.
* A worker that exits while the supervisor runs is started again after a delay from
  its slot's :class:`RestartPolicy` (``worker_exited`` with ``restart_in``, then
  ``worker_started``): at most 5 starts in any 60 s.
* A worker whose supervisor vanished (its stdin pipe reached end of file) drains and
  exits by itself.

systemd: only the supervisor talks to ``NOTIFY_SOCKET``.  ``READY=1`` once every worker
has logged ``worker_ready`` (sockets adopted, serving); ``RELOADING=1`` when a SIGHUP is
forwarded and ``READY=1`` when the round is over; ``STOPPING=1`` as the drain begins;
``WATCHDOG=1`` from the supervisor's reactor.  Workers are started without
``NOTIFY_SOCKET``, ``WATCHDOG_*`` and ``LISTEN_*``.

Limits (``--max-connections``, ``--max-connections-per-ip``) apply per worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import (
    InvalidLogLevelError,
    Logger,
    LogLevel,
    LogPublisher,
    globalLogPublisher,
)
from typing_extensions import override

import secure_echo
from secure_echo.daemon import maker
from secure_echo.daemon.configfile import Kind
from secure_echo.daemon.logs import (
    CONNECTION_RECORD,
    DEFAULT_EVENT,
    iso_timestamp,
    log_sinks,
)
from secure_echo.daemon.metrics import Metrics, metrics_site
from secure_echo.daemon.restart import RestartCheck
from secure_echo.daemon.sdnotify import Notifier, NotifyService, watchdog_interval
from secure_echo.daemon.services import ListeningService, MetricsService
from secure_echo.daemon.signals import SignalService
from secure_echo.edge.addresses import format_address

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from types import FrameType

    from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort
    from twisted.logger import ILogObserver, LogEvent
    from twisted.python.failure import Failure

    from secure_echo.daemon import options as config
    from secure_echo.daemon.load import Config
    from secure_echo.daemon.settings import Listen

#: The environment variable that carries a worker's :class:`WorkerSpec` (JSON).
SPEC_ENV: Final = "SECURE_ECHO_WORKER"
#: Variables a worker must not see: only the supervisor talks to systemd, and the
#: sockets systemd passed are the supervisor's (the worker's are in the spec).
SUPERVISOR_ONLY_ENV: Final = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)
#: Seconds the workers get beyond ``--drain-timeout`` to exit after SIGTERM.
STOP_GRACE: Final = 5.0
#: Seconds to wait for workers to die after SIGKILL before giving up on them.
KILL_WAIT: Final = 5.0
#: Seconds a forwarded SIGHUP waits for every worker's reload outcome.
RELOAD_TIMEOUT: Final = 10.0
#: Longest record line read from a worker; a longer one is cut and reported.
MAX_RECORD_BYTES: Final = 1 << 20
#: Longest stderr line kept from a worker.
MAX_STDERR_BYTES: Final = 4096
#: Seconds between two ``worker_stats`` records of a worker.
STATS_INTERVAL: Final = 1.0
#: Events of a worker meant for the supervisor only (consumed, not logged).
STATS_EVENT: Final = "worker_stats"
#: The event a worker logs once it adopted its sockets and serves.
READY_EVENT: Final = "worker_ready"

_FAMILIES: Final = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}
#: Record keys that become the re-emitted event's ``log_*`` keys, not fields.
_RECORD_HEAD: Final = frozenset({"time", "level", "namespace", "message", "event", "worker"})


# -- what a worker is told --------------------------------------------------------------


@dataclass(frozen=True)
class SharedSocket:
    """A listening socket the supervisor hands to its workers."""

    #: The descriptor number, the same in the supervisor and in each worker.
    fd: int
    #: ``INET``, ``INET6`` or ``UNIX``.
    family: str
    #: Where it listens, for log records (``127.0.0.1:8443``, a path).
    address: str

    @property
    def address_family(self) -> int:
        """The ``socket.AF_*`` constant of :attr:`family`."""
        return _FAMILIES[self.family]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides its sockets' descriptors.

    ``values`` are the supervisor's option values (``--config`` file and command line
    already merged, paths absolute), validated again by the worker.  ``config_file``
    and ``command_line`` are the supervisor's, so a worker's TLS reload re-reads the
    file exactly as one process would.
    """

    index: int
    values: Mapping[str, Any]
    sockets: tuple[SharedSocket, ...] = ()
    config_file: str | None = None
    command_line: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The spec as one line of JSON."""
        return json.dumps(
            {
                "index": self.index,
                "values": dict(self.values),
                "sockets": [[s.fd, s.family, s.address] for s in self.sockets],
                "config_file": self.config_file,
                "command_line": dict(self.command_line),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """Parse :meth:`to_json`'s output; ``ValueError`` names what is wrong."""
        try:
            data = json.loads(text)
            index = data["index"]
            values = data["values"]
            sockets = tuple(
                SharedSocket(int(fd), str(family), str(address))
                for fd, family, address in data["sockets"]
            )
            config_file = data["config_file"]
            command_line = data["command_line"]
        except (ValueError, TypeError, KeyError) as error:
            msg = f"${SPEC_ENV} is not a worker spec ({type(error).__name__}: {error})"
            raise ValueError(msg) from None
        if not isinstance(index, int) or isinstance(index, bool) or index < 1:
            msg = f"${SPEC_ENV}: index must be a positive whole number, not {index!r}"
            raise ValueError(msg)
        if not isinstance(values, dict) or not isinstance(command_line, dict):
            msg = f"${SPEC_ENV}: values and command_line must be objects"
            raise ValueError(msg)  # noqa: TRY004 - one error type for every bad spec
        unknown = [s.family for s in sockets if s.family not in _FAMILIES]
        if unknown:
            msg = f"${SPEC_ENV}: unknown socket family {unknown[0]!r}"
            raise ValueError(msg)
        # JSON has no tuples; the command line keeps repeatable options as tuples.
        restored = {k: tuple(v) if isinstance(v, list) else v for k, v in command_line.items()}
        return cls(
            index,
            values,
            sockets,
            config_file if isinstance(config_file, str) else None,
            MappingProxyType(restored),
        )


def worker_values(options: config.Options) -> dict[str, Any]:
    """The option values a worker is started with: the supervisor's, minus its own jobs.

    Paths are made absolute (twistd may change directory after ``makeService``), and
    the development certificates' directory is the one the supervisor found (a
    worker's environment may not name the same default).  The listening endpoints,
    log file, stdout format, metrics and worker count are the supervisor's business:
    a worker gets none of them (its sockets come in the spec).
    """
    values: dict[str, Any] = {}
    for name, key in options.file_keys.items():
        value = options[name]
        if key.kind is Kind.PATH and value:
            value = str(Path(value).expanduser().absolute())
        elif key.kind is Kind.PATHS and value:
            value = [str(Path(item).expanduser().absolute()) if item else item for item in value]
        values[name] = list(value) if isinstance(value, tuple) else value
    if options.settings.dev_state_dir is not None:
        values["state-dir"] = str(options.settings.dev_state_dir)
    values.update(
        {"listen": [], "log-file": None, "log-stdout": None, "metrics": None, "workers": "1"}
    )
    return values


def worker_environment(environ: Mapping[str, str], spec: WorkerSpec) -> dict[str, str]:
    """The environment of a worker: ours without the supervisor-only variables, plus the spec.

    ``PYTHONPATH`` starts with the directory this ``secure_echo`` was imported from
    (unless that is a site directory, found anyway), so the worker runs the same code.
    """
    env = {k: v for k, v in environ.items() if k not in SUPERVISOR_ONLY_ENV}
    root = str(Path(next(iter(secure_echo.__path__))).resolve().parent)
    site_dirs = {
        str(Path(p).resolve()) for key in ("purelib", "platlib") if (p := sysconfig.get_path(key))
    }
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in site_dirs and root not in paths:
        paths.insert(0, root)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env[SPEC_ENV] = spec.to_json()
    return env


# -- reading a worker's records -------------------------------------------------------


class RecordReader:
    """Splits a byte stream into lines (``\\n`` removed), each at most ``limit`` bytes.

    :meth:`feed` returns ``(line, cut)`` pairs.  A line longer than ``limit`` comes out
    once, as its first ``limit`` bytes with ``cut`` true, and the rest of it up to the
    next newline is dropped: a runaway writer cannot grow the buffer without bound.
    The search for a newline resumes where the last one stopped, so a long line arriving
    in small pieces costs O(n).
    """

    def __init__(self, limit: int = MAX_RECORD_BYTES) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._searched = 0
        self._discarding = False

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Add ``data``; return the lines it completed."""
        buffer = self._buffer
        buffer += data
        lines: list[tuple[bytes, bool]] = []
        start = 0
        while (end := buffer.find(b"\n", max(start, self._searched))) >= 0:
            line = bytes(buffer[start:end])
            start = end + 1
            if self._discarding:
                self._discarding = False  # the tail of a line already reported
            elif len(line) > self.limit:
                lines.append((line[: self.limit], True))
            else:
                lines.append((line, False))
        del buffer[:start]
        self._searched = len(buffer)
        if len(buffer) > self.limit:
            if not self._discarding:
                lines.append((bytes(buffer[: self.limit]), True))
            self._discarding = True
            buffer.clear()
            self._searched = 0
        return lines

    def finish(self) -> list[tuple[bytes, bool]]:
        """The end of the stream: an unterminated last line, if any."""
        rest, discarding = bytes(self._buffer), self._discarding
        self._buffer.clear()
        self._searched = 0
        self._discarding = False
        if rest and not discarding:
            return [(rest, False)]
        return []


def parse_record(line: bytes) -> dict[str, Any] | None:
    """The JSON object on ``line``, or None if it is not one."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _level(name: object) -> LogLevel:
    if isinstance(name, str):
        try:
            return cast("LogLevel", LogLevel.levelWithName(name))
        except InvalidLogLevelError:
            pass
    return cast("LogLevel", LogLevel.info)


def record_as_event(record: Mapping[str, Any], worker: int, now: float) -> LogEvent:
    """The log event of a worker's ``record``, with ``worker`` added.

    :func:`~secure_echo.daemon.logs.event_as_record` turns it back into ``record`` with
    ``worker`` after ``message``, before the other fields.  The worker's time, level
    and namespace are kept; the rendered ``message`` is used as is (``log_format`` is
    ``{message}``, so braces in it are not a format).  ``now`` stands in for a missing
    or malformed time.
    """
    namespace = record.get("namespace")
    message = record.get("message")
    event: dict[str, Any] = {
        "log_time": iso_timestamp(record.get("time")) or now,
        "log_level": _level(record.get("level")),
        "log_namespace": namespace if isinstance(namespace, str) else "secure_echo.pool.worker",
        "log_format": "{message}",
        "log_system": f"worker {worker}",
        "message": message if isinstance(message, str) else "",
        "event": record.get("event", DEFAULT_EVENT),
        "worker": worker,
    }
    event.update(
        (key, value)
        for key, value in record.items()
        if key not in _RECORD_HEAD and not key.startswith("log_")
    )
    return event


class WorkerStats:
    """The latest open-connection count of each worker, summed for the metrics gauge."""

    def __init__(self) -> None:
        self._connections: dict[int, int] = {}

    def update(self, worker: int, connections: object) -> None:
        """Worker ``worker`` has ``connections`` open (anything but a count is 0)."""
        valid = isinstance(connections, int) and not isinstance(connections, bool)
        self._connections[worker] = max(cast("int", connections), 0) if valid else 0

    def forget(self, worker: int) -> None:
        """Worker ``worker`` exited: its connections are gone."""
        self._connections.pop(worker, None)

    def total(self) -> int:
        """Open connections of all workers."""
        return sum(self._connections.values())

    def by_worker(self) -> dict[int, int]:
        """A copy of each worker's latest count."""
        return dict(self._connections)


class RestartPolicy:
    """When a worker slot may start again after its worker died.

    The first restart waits ``base`` seconds, each one more within ``window`` doubles
    that (up to ``cap``), and never more than ``limit`` starts fall within any
    ``window`` seconds: past that, the next one waits until the oldest leaves it.
    """

    def __init__(
        self,
        clock: Any,
        *,
        limit: int = 5,
        window: float = 60.0,
        base: float = 0.5,
        cap: float = 30.0,
    ) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self.base = base
        self.cap = cap
        self._starts: list[float] = []

    def next_delay(self) -> float:
        """Seconds until the next start; that start is counted from now on."""
        now = float(self._clock.seconds())
        recent = [t for t in self._starts if t > now - self.window]
        delay = min(self.base * 2.0 ** len(recent), self.cap)
        if len(recent) >= self.limit:
            delay = max(delay, recent[-self.limit] + self.window - now)
        self._starts = [*recent, now + delay]
        return delay


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


# -- the processes ----------------------------------------------------------------------


def _exit_status(reason: Failure) -> tuple[int | None, int | None]:
    """``(exit code, signal)`` of an ended process (one of them is None)."""
    value = reason.value
    code = getattr(value, "exitCode", None)
    sig = getattr(value, "signal", None)
    return (code if isinstance(code, int) else None, sig if isinstance(sig, int) else None)


class WorkerProcess(ProcessProtocol):
    """One worker process, seen from the supervisor: its pipes and its end.

    Records from stdout and lines from stderr go to the supervisor as they complete;
    ``processEnded`` (which Twisted calls after both pipes closed, so after the last
    record) reports the exit.  ``ended`` fires then.
    """

    def __init__(self, index: int, supervisor: WorkerSupervisor) -> None:
        self.index = index
        self.pid: int | None = None
        #: The worker logged ``worker_ready``: it accepts on the shared sockets.
        self.ready = False
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._supervisor = supervisor
        self._records = RecordReader(MAX_RECORD_BYTES)
        self._stderr = RecordReader(MAX_STDERR_BYTES)

    @override
    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    @override
    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            for line, cut in self._records.feed(data):
                self._supervisor.worker_record(self, line, cut=cut)
        elif childFD == 2:  # noqa: PLR2004 - standard error
            for line, _ in self._stderr.feed(data):
                self._supervisor.worker_stderr(self, line)

    @override
    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 1:
            for line, cut in self._records.finish():
                self._supervisor.worker_record(self, line, cut=cut)
        elif childFD == 2:  # noqa: PLR2004 - standard error
            for line, _ in self._stderr.finish():
                self._supervisor.worker_stderr(self, line)

    @override
    def processEnded(self, reason: Failure) -> None:
        self._supervisor.worker_ended(self, reason)
        if not self.ended.called:
            self.ended.callback(None)

    @property
    def running(self) -> bool:
        """Whether the process has not been seen to end yet."""
        return not self.ended.called

    def send_signal(self, name: str) -> bool:
        """Send signal ``name`` (``"TERM"``, ``"HUP"``, ``"KILL"``); False if it is gone."""
        transport = self.transport
        if transport is None or not self.running:
            return False
        try:
            transport.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            return False
        return True


class HeldForWorkers(Factory):
    """The factory of the supervisor's ports, which never accept.

    Twisted names it in its log ("HeldForWorkers starting on 8443").  Were a
    connection accepted, it would be closed at once.
    """

    noisy = False

    @override
    def buildProtocol(self, addr: IAddress) -> None:  # type: ignore[override]
        return None


def _family_of(address: IAddress) -> str | None:
    if isinstance(address, IPv4Address):
        return "INET"
    if isinstance(address, IPv6Address):
        return "INET6"
    if isinstance(address, UNIXAddress):
        return "UNIX"
    return None


class WorkerSupervisor(Service):
    """Owns the listening sockets and the worker processes; see the module's text.

    ``values`` are :func:`worker_values`; ``listens`` the validated ``--listen``
    endpoints (bound in ``privilegedStartService``).  ``on_listening`` is called with the
    ports once they listen (the dev banner).  ``notifier`` is systemd's, if any;
    ``stats`` is summed for the metrics.  ``publisher`` receives the workers' records.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        workers: int,
        values: Mapping[str, Any],
        *,
        listens: tuple[Listen, ...] = (),
        config_file: Path | None = None,
        command_line: Mapping[str, Any] | None = None,
        drain_timeout: float = 10.0,
        certificate: tuple[str, str] | None = None,
        notifier: Notifier | None = None,
        stats: WorkerStats | None = None,
        publisher: Callable[[LogEvent], None] | None = None,
        connection_publisher: Callable[[LogEvent], None] | None = None,
        on_listening: Callable[[list[IListeningPort]], object] | None = None,
        environ: Mapping[str, str] | None = None,
        executable: str = sys.executable,
        handle_sighup: bool = True,
    ) -> None:
        self._reactor = reactor
        self.worker_count = workers
        self._values = dict(values)
        self._config_file = str(config_file) if config_file is not None else None
        self._command_line = dict(command_line or {})
        self.drain_timeout = drain_timeout
        self.notifier = notifier
        self.stats = stats if stats is not None else WorkerStats()
        self._publisher = publisher if publisher is not None else globalLogPublisher
        #: Where the workers' ``connection_closed`` records go (default: with the rest).
        self._connection_publisher = (
            connection_publisher if connection_publisher is not None else self._publisher
        )
        self._on_listening = on_listening
        self._environ = environ
        self._executable = executable
        self._handle_sighup = handle_sighup
        self.listening = ListeningService(reactor, listens, HeldForWorkers(), self._listened)
        #: The sockets handed to every worker.
        self.sockets: tuple[SharedSocket, ...] = ()
        #: Live worker processes by index (1 to N).
        self.workers: dict[int, WorkerProcess] = {}
        self._policies: dict[int, RestartPolicy] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._ever_ready: set[int] = set()
        self._ready_sent = False
        self._stopping = False
        self._round: ReloadRound | None = None
        self._previous_sighup: Any = None
        #: (subject, not_after) of the certificate in use, for systemd's status line.
        self._certificate = certificate

    # -- listening ---------------------------------------------------------------------

    def _listened(self, ports: list[IListeningPort]) -> None:
        """Keep the ports' sockets for the workers; never accept on them here."""
        shared = []
        for port in ports:
            # Listening started in this call, before the reactor runs, so no
            # connection has been accepted here.  Stop reading: the workers accept.
            port_any = cast("Any", port)
            port_any.stopReading()
            # Closing our copy must not shut the socket down for the workers too:
            # Twisted's tcp.Port calls shutdown() before close(), except on the
            # sockets it adopted (the flag it clears for those).
            port_any._shouldShutdown = False
            host = port.getHost()
            family = _family_of(host)
            if family is None:  # pragma: no cover - every --listen type is one of the three
                msg = f"cannot share a listening socket of address type {type(host).__name__}"
                raise TypeError(msg)
            shared.append(SharedSocket(port_any.fileno(), family, format_address(host)))
        self.sockets = tuple(shared)
        if self._on_listening is not None:
            self._on_listening(ports)

    # -- service -------------------------------------------------------------------------

    @override
    def privilegedStartService(self) -> None:
        self.listening.privilegedStartService()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.listening.startService()  # type: ignore[no-untyped-call]
        if self._handle_sighup:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        for index in range(1, self.worker_count + 1):
            self._policies[index] = RestartPolicy(self._reactor)
            self._spawn(index)

    @override
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        if self._round is not None:
            self._round.cancel()
            self._round = None
        return defer.Deferred.fromCoroutine(self._stop_workers())

    async def _stop_workers(self) -> None:
        # Stop listening first, as one process does: close our copies (a UNIX
        # socket's path goes now); each worker closes its own as SIGTERM arrives.
        await defer.maybeDeferred(self.listening.stopService)
        live = [p for p in self.workers.values() if p.running]
        timeout = self.drain_timeout + STOP_GRACE
        self.log.info(
            "stopping {workers} workers (at most {timeout:g} s)",
            event="workers_stopping",
            workers=len(live),
            timeout=timeout,
        )
        for process in live:
            process.send_signal("TERM")
        remaining = await self._wait(live, timeout)
        if not remaining:
            return
        for process in remaining:
            self.log.warn(
                "worker {worker} (pid {pid}) did not exit within {timeout:g} s; killing it",
                event="worker_killed",
                worker=process.index,
                pid=process.pid,
                timeout=timeout,
            )
            process.send_signal("KILL")
        await self._wait(remaining, KILL_WAIT)

    def _wait(
        self, processes: Sequence[WorkerProcess], timeout: float
    ) -> defer.Deferred[list[WorkerProcess]]:
        """Fire with the processes still running once all ended or ``timeout`` passed."""
        waiting = [p for p in processes if p.running]
        result: defer.Deferred[list[WorkerProcess]] = defer.Deferred()
        if not waiting:
            result.callback([])
            return result

        def expire() -> None:
            if not result.called:
                result.callback([p for p in waiting if p.running])

        timer = self._reactor.callLater(timeout, expire)

        def one_ended(_: object) -> None:
            if not result.called and not any(p.running for p in waiting):
                timer.cancel()
                result.callback([])

        for process in waiting:
            process.ended.addCallback(one_ended)
        return result

    # -- processes -----------------------------------------------------------------------

    def spec(self, index: int) -> WorkerSpec:
        """What worker ``index`` is started with."""
        return WorkerSpec(index, self._values, self.sockets, self._config_file, self._command_line)

    def _spawn(self, index: int) -> None:
        spec = self.spec(index)
        environ = self._environ if self._environ is not None else os.environ
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        # Each socket keeps its number: the spec names it.
        child_fds.update({s.fd: s.fd for s in spec.sockets})
        process = WorkerProcess(index, self)
        # The index in argv only makes the worker recognisable in ps.
        args = [self._executable, "-m", "secure_echo.pool.worker", str(index)]
        try:
            self._reactor.spawnProcess(
                process,
                self._executable,
                args,
                env=worker_environment(environ, spec),
                childFDs=child_fds,
            )
        except OSError as error:
            delay = self._policies[index].next_delay()
            self.log.error(
                "cannot start worker {worker}: {error}; trying again in {restart_in:g} s",
                event="worker_spawn_failed",
                worker=index,
                error=str(error),
                restart_in=delay,
            )
            self._schedule_restart(index, delay)
            return
        self.workers[index] = process
        self.log.info(
            "worker {worker} started: pid {pid}",
            event="worker_started",
            worker=index,
            pid=process.pid,
        )

    def _schedule_restart(self, index: int, delay: float) -> None:
        self._restarts[index] = self._reactor.callLater(delay, self._restart, index)

    def _restart(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self._stopping and index not in self.workers:
            self._spawn(index)

    def worker_record(self, process: WorkerProcess, line: bytes, *, cut: bool = False) -> None:
        """A line from a worker's stdout: re-emit it as a log event with ``worker``."""
        record = None if cut else parse_record(line)
        if record is None:
            self.log.warn(
                "worker {worker} wrote a line that is not a JSON record ({reason})",
                event="worker_output_invalid",
                worker=process.index,
                pid=process.pid,
                reason="too long" if cut else "not a JSON object",
                length=len(line),
                text=line[:200].decode("utf-8", "backslashreplace"),
            )
            return
        name = record.get("event")
        if name == STATS_EVENT:
            self.stats.update(process.index, record.get("connections"))
            return
        publish = self._connection_publisher if name == CONNECTION_RECORD else self._publisher
        publish(record_as_event(record, process.index, self._reactor.seconds()))
        if name == READY_EVENT:
            process.ready = True
            self._worker_ready(process.index)
        elif name in {"tls_context_loaded", "tls_reloaded"}:
            subject, not_after = record.get("subject"), record.get("not_after")
            if isinstance(subject, str) and isinstance(not_after, str):
                self._certificate = (subject, not_after)
        if (
            name in {"tls_reloaded", "tls_reload_failed"}
            and record.get("trigger") == "SIGHUP"
            and self._round is not None
        ):
            self._round.record(process.index, name == "tls_reloaded")

    def worker_stderr(self, process: WorkerProcess, line: bytes) -> None:
        """A line a worker wrote to stderr (outside its log): log it as a warning."""
        self.log.warn(
            "worker {worker} stderr: {text}",
            event="worker_stderr",
            worker=process.index,
            pid=process.pid,
            text=line.decode("utf-8", "backslashreplace"),
        )

    def worker_ended(self, process: WorkerProcess, reason: Failure) -> None:
        """A worker exited: forget it and, unless we are stopping, start it again."""
        index = process.index
        if self.workers.get(index) is process:
            del self.workers[index]
        self.stats.forget(index)
        if self._round is not None:
            self._round.forget(index)
        code, sig = _exit_status(reason)
        how = f"was killed by signal {sig}" if sig is not None else f"exited with status {code}"
        if self._stopping:
            self.log.emit(
                LogLevel.info if code == 0 else LogLevel.warn,
                "worker {worker} (pid {pid}) {how}",
                event="worker_exited",
                worker=index,
                pid=process.pid,
                how=how,
                exit_code=code,
                signal=sig,
                expected=True,
                restart_in=None,
            )
            return
        delay = self._policies[index].next_delay()
        self.log.warn(
            "worker {worker} (pid {pid}) {how}; starting it again in {restart_in:g} s",
            event="worker_exited",
            worker=index,
            pid=process.pid,
            how=how,
            exit_code=code,
            signal=sig,
            expected=False,
            restart_in=delay,
        )
        self._schedule_restart(index, delay)

    # -- readiness and reload ------------------------------------------------------------

    def status(self) -> str:
        """The one-line STATUS= text for systemd."""
        ready = sum(1 for p in self.workers.values() if p.ready)
        text = f"{ready} of {self.worker_count} workers ready"
        if self.sockets:
            text += "; listening on " + ", ".join(s.address for s in self.sockets)
        if self._certificate is not None:
            subject, not_after = self._certificate
            text += f"; certificate {subject} valid until {not_after[:10]}"
        return text

    def _worker_ready(self, index: int) -> None:
        self._ever_ready.add(index)
        if self._ready_sent or len(self._ever_ready) < self.worker_count:
            return
        self._ready_sent = True
        self.log.info(
            "all {workers} workers ready",
            event="workers_ready",
            workers=self.worker_count,
            pids=[self.workers[i].pid for i in sorted(self.workers)],
        )
        if self.notifier is not None:
            self.notifier.ready(self.status())

    def _on_sighup(self, _signum: int, _frame: FrameType | None) -> None:
        """Signal context: only schedule the forwarding in the reactor."""
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Forward SIGHUP to every ready worker and wait for their outcomes."""
        if self._stopping:
            return
        targets = sorted(i for i, p in self.workers.items() if p.ready and p.running)
        if self._round is not None:
            self._round.cancel()  # superseded: this round's READY=1 covers both
        if self.notifier is not None:
            self.notifier.reloading()
        self.log.info(
            "forwarding SIGHUP to workers {workers}",
            event="reload_forwarded",
            workers=targets,
        )
        self._round = ReloadRound(targets, self._reactor, RELOAD_TIMEOUT, self._reloaded)
        for index in targets:
            if not self.workers[index].send_signal("HUP"):
                self._round.forget(index)
        self._round.check()

    def _reloaded(self, outcome: ReloadOutcome) -> None:
        self._round = None
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
            self.notifier.ready(prefix + self.status())


def kill_workers(supervisor: WorkerSupervisor) -> dict[str, object]:
    """A forced stop: SIGKILL every worker still running; ``workers_killed``, their pids."""
    live = [p for p in supervisor.workers.values() if p.running]
    return {"workers_killed": [p.pid for p in live if p.send_signal("KILL")]}


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
        elif (
            name in {"tls_reloaded", "tls_reload_failed"}
            and event.get("trigger") == "file-change"
            and "worker" in event
        ):
            self._reactor.callLater(0, self._check.check, "file-change", only_if_changed=True)

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._publisher.addObserver(self._observer)

    @override
    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self._publisher.removeObserver(self._observer)


# -- building it ------------------------------------------------------------------------


def _first_tcp_port(ports: list[IListeningPort]) -> int | None:
    for port in ports:
        number = getattr(port.getHost(), "port", None)
        if isinstance(number, int):
            return number
    return None


def make_supervisor(
    options: config.Options, cfg: Config, reactor: Any
) -> maker.OrderedMultiService:
    """The services of a ``--workers N`` supervisor (``maker.make_service`` for N > 1).

    Children in start order (stopped in reverse): the log file, the metrics page, the
    supervisor, systemd's notifier.  So at shutdown ``STOPPING=1`` goes first, then the
    workers drain while the log and metrics still take their records.
    """
    top = maker.OrderedMultiService()  # type: ignore[no-untyped-call]
    sinks = log_sinks(cfg.log_file, cfg.log_max_bytes, cfg.log_keep, cfg.log_stdout, reactor)
    top.log_observer = sinks.stdout
    if sinks.file is not None:
        sinks.file.setServiceParent(top)  # type: ignore[no-untyped-call]
    stats = WorkerStats()
    if cfg.metrics is not None:
        metrics = Metrics(active_connections=stats.total)
        for publisher in (globalLogPublisher, *sinks.also):
            publisher.addObserver(metrics.observer)
        MetricsService(
            reactor, cfg.metrics, metrics_site(metrics, metrics.state, reactor)
        ).setServiceParent(top)  # type: ignore[no-untyped-call]
    notifier = Notifier.from_environment()

    def listening(ports: list[IListeningPort]) -> None:
        if cfg.log_stdout != "json":  # keep JSON output pure; dev_certificate says it
            maker.print_dev_banner(cfg, _first_tcp_port(ports))

    supervisor = WorkerSupervisor(
        reactor,
        cfg.workers,
        worker_values(options),
        listens=cfg.listens,
        config_file=cfg.config_file,
        command_line=cfg.command_line,
        drain_timeout=cfg.drain_timeout,
        certificate=(cfg.tls.subject, cfg.tls.not_after.isoformat()),
        notifier=notifier,
        stats=stats,
        connection_publisher=sinks.connections,
        on_listening=listening,
    )
    supervisor.setServiceParent(top)  # type: ignore[no-untyped-call]
    RestartWatch(RestartCheck(cfg), reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
    # After the supervisor, so stopped first: a second signal from then on forces.
    SignalService(
        reactor, cut=lambda: kill_workers(supervisor), ignore_usr1=sinks.file is None
    ).setServiceParent(top)  # type: ignore[no-untyped-call]
    if notifier is not None:
        # Last added, first stopped: STOPPING=1 goes out as the drain starts.
        NotifyService(notifier, reactor, watchdog_interval()).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
