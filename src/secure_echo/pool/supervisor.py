"""``--workers N``: a supervisor process and N worker processes on shared sockets.

Twisted has no ``SO_REUSEPORT``.  Instead the supervisor (the twistd process) binds
every ``--listen`` endpoint itself and hands the listening sockets to N worker
processes, which accept on them; the kernel gives each new connection to whichever
worker accepts it first (Linux does not promise an even spread).

:class:`WorkerSupervisor` binds like one process (the same
:class:`~secure_echo.daemon.services.ListeningService`: one-line errors, ``listening``
events, ``systemd:`` sockets adopted), then at once stops reading from those ports:
it never accepts.  It puts together, each in its own module:

* the process pool (:mod:`secure_echo.pool.processes`): spawn, signal, reap;
* the log relay (:mod:`secure_echo.pool.relay`): every worker record into the one
  log, with ``worker``;
* the pool's state (:mod:`secure_echo.pool.health`): what each worker reported,
  from which ``/readyz``, ``/healthz`` and systemd's ``READY=1``/``STATUS=`` follow;
* restarts (:mod:`secure_echo.pool.restarts`): backoff per slot, give-up for the pool;
* hung workers (:mod:`secure_echo.pool.watchdog`);
* the reload coordinator (:mod:`secure_echo.pool.reload`);
* the contract with its workers (:mod:`secure_echo.pool.contract`), and the TLS
  files it read as root for workers that cannot (:mod:`secure_echo.pool.tlsfiles`).

Readiness: ready while at least one worker serves and the supervisor is not
stopping.  ``READY=1`` goes to systemd when the first worker serves; each change in
the number of serving workers logs ``workers_serving`` and updates ``STATUS=``
(``N/M workers serving; ...``).  Signals: SIGHUP is forwarded to every serving worker
(the reload coordinator); SIGTERM/SIGINT closes the supervisor's copies of the
sockets, sends SIGTERM to every worker and waits at most ``--drain-timeout`` +
:data:`STOP_GRACE` seconds, then SIGKILL (``worker_killed``); a second one forces
(:mod:`secure_echo.daemon.signals`); SIGUSR1 reopens the supervisor's ``--log-file``.

Limits: ``--max-connections`` is the pool's total, split across the workers (the
first ``total % N`` get one more); ``--max-connections-per-ip`` applies in each
worker.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel, globalLogPublisher
from typing_extensions import override

import secure_echo
from secure_echo.daemon.configfile import Kind
from secure_echo.daemon.reactor import name_of
from secure_echo.daemon.services import ListeningService
from secure_echo.edge.addresses import format_address
from secure_echo.pool.contract import (
    LOG_BUFFER_BYTES,
    SPEC_ENV,
    SUPERVISOR_ONLY_ENV,
    SharedSocket,
    WorkerSpec,
    WorkerState,
)
from secure_echo.pool.health import PoolState
from secure_echo.pool.processes import ProcessPool, WorkerProcess, describe_exit, exit_status
from secure_echo.pool.relay import LogRelay
from secure_echo.pool.reload import ReloadCoordinator
from secure_echo.pool.restarts import GIVE_UP_EXIT_STATUS, Backoff, GiveUp
from secure_echo.pool.tlsfiles import share_copies
from secure_echo.pool.watchdog import HungWatch

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import FrameType

    from twisted.internet.interfaces import IAddress, IListeningPort
    from twisted.logger import LogEvent
    from twisted.python.failure import Failure

    from secure_echo.daemon import options as config
    from secure_echo.daemon.sdnotify import Notifier
    from secure_echo.daemon.settings import Listen

#: Seconds the workers get beyond ``--drain-timeout`` to exit after SIGTERM.
STOP_GRACE: Final = 5.0
#: ``/healthz`` deadline (seconds without a report) when ``--worker-watchdog`` is off.
DEFAULT_HEALTH_DEADLINE: Final = 10.0


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


def connection_share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of a pool limit of ``total`` (0: no limit, for each)."""
    if total <= 0:
        return 0
    return total // workers + (1 if index <= total % workers else 0)


def code_root() -> str | None:
    """The directory this ``secure_echo`` was imported from, unless it is a site directory.

    Found once, at start: after ``--uid`` the supervisor may no longer be able to read
    what ``sysconfig`` loads to answer.
    """
    root = str(Path(next(iter(secure_echo.__path__))).resolve().parent)
    site_dirs = {
        str(Path(p).resolve()) for key in ("purelib", "platlib") if (p := sysconfig.get_path(key))
    }
    return None if root in site_dirs else root


def worker_environment(
    environ: Mapping[str, str], spec: WorkerSpec, root: str | None = None
) -> dict[str, str]:
    """The environment of a worker: ours without the supervisor-only variables, plus the spec.

    ``PYTHONPATH`` starts with ``root`` (:func:`code_root`: the directory this
    ``secure_echo`` was imported from, unless a site directory finds it anyway), so
    the worker runs the same code.
    """
    env = {k: v for k, v in environ.items() if k not in SUPERVISOR_ONLY_ENV}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root is not None and root not in paths:
        paths.insert(0, root)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env[SPEC_ENV] = spec.to_json()
    return env


def exit_after_shutdown(reactor: Any, status: int) -> None:
    """Make this process exit with ``status`` once the reactor stopped and twistd is done.

    twistd exits 0 after an orderly stop and offers no way to say otherwise; an
    exit handler registered after the services stopped runs last, after twistd's
    own clean-up, flushes the standard streams and ends the process with ``status``.
    """

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        os._exit(status)

    reactor.addSystemEventTrigger("after", "shutdown", atexit.register, leave)


def _family_of(address: IAddress) -> str | None:
    if isinstance(address, IPv4Address):
        return "INET"
    if isinstance(address, IPv6Address):
        return "INET6"
    if isinstance(address, UNIXAddress):
        return "UNIX"
    return None


class HeldForWorkers(Factory):
    """The factory of the supervisor's ports, which never accept.

    Twisted names it in its log ("HeldForWorkers starting on 8443").  Were a
    connection accepted, it would be closed at once.
    """

    noisy = False

    @override
    def buildProtocol(self, addr: IAddress) -> None:  # type: ignore[override]
        return None


class WorkerSupervisor(Service):
    """Owns the listening sockets and the worker processes; see the module's text.

    ``values`` are :func:`worker_values`; ``listens`` the validated ``--listen``
    endpoints (bound in ``privilegedStartService``).  ``on_listening`` is called with the
    ports once they listen (the dev banner).  ``notifier`` is systemd's, if any.
    ``publisher`` receives the workers' records.  ``tls_files`` are the TLS files as
    read at start (:func:`~secure_echo.pool.tlsfiles.read_tls_files`).  ``watchdog``
    is ``--worker-watchdog``.  ``exit`` makes the process exit with a status after
    the reactor stopped (:func:`exit_after_shutdown`).
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
        watchdog: float = 10.0,
        certificate: tuple[str, str] | None = None,
        notifier: Notifier | None = None,
        publisher: Callable[[LogEvent], None] | None = None,
        connection_publisher: Callable[[LogEvent], None] | None = None,
        on_listening: Callable[[list[IListeningPort]], object] | None = None,
        environ: Mapping[str, str] | None = None,
        executable: str = sys.executable,
        handle_sighup: bool = True,
        tls_files: Mapping[str, bytes] | None = None,
        exit: Callable[[Any, int], object] = exit_after_shutdown,  # noqa: A002 - what it does
    ) -> None:
        self._reactor = reactor
        self.worker_count = workers
        self._values = dict(values)
        self._config_file = str(config_file) if config_file is not None else None
        self._command_line = dict(command_line or {})
        self.drain_timeout = drain_timeout
        self.notifier = notifier
        self._on_listening = on_listening
        self._environ = environ
        self._handle_sighup = handle_sighup
        self._tls_files = dict(tls_files or {})
        self._exit = exit
        self.log_buffer = LOG_BUFFER_BYTES
        self.listening = ListeningService(reactor, listens, HeldForWorkers(), self._listened)
        #: The sockets handed to every worker.
        self.sockets: tuple[SharedSocket, ...] = ()
        #: Processes started so far per slot (the next one's ``start``).
        self._starts: dict[int, int] = {}
        self.state = PoolState(
            workers,
            reactor,
            deadline=watchdog or DEFAULT_HEALTH_DEADLINE,
            on_change=self._serving_changed,
        )
        if certificate is not None:
            self.state.certificate(*certificate)
        root = code_root()
        self.pool = ProcessPool(
            reactor,
            self,
            prepare=self.prepare,
            environment=lambda spec: worker_environment(
                self._environ if self._environ is not None else os.environ, spec, root
            ),
            executable=executable,
        )
        self.reloads = ReloadCoordinator(
            reactor,
            targets=self.serving_workers,
            send=self.pool.send,
            status=self.state.status,
            notifier=notifier,
        )
        self.relay = LogRelay(
            reactor,
            self.state,
            publisher if publisher is not None else globalLogPublisher,
            connection_publisher,
            on_record=self.reloads.record,
        )
        self.hung = HungWatch(reactor, self.state, self.pool, watchdog)
        self.backoffs = {index: Backoff() for index in range(1, workers + 1)}
        self.give_up = GiveUp(reactor)
        self._ready_sent = False
        self.stopping = False
        self.gave_up = False
        self._previous_sighup: Any = None

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
        self.state.addresses = [s.address for s in shared]
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
        self.state.listening = True
        self.state.began()
        if self._handle_sighup:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        for index in range(1, self.worker_count + 1):
            self.pool.spawn(index)
        self.hung.start()

    @override
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self.stopping = self.state.stopping = True
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        self.pool.close()
        self.reloads.cancel()
        self.hung.stop()
        return defer.Deferred.fromCoroutine(self._stop_workers())

    async def _stop_workers(self) -> None:
        # Stop listening first, as one process does: close our copies (a UNIX
        # socket's path goes now); each worker closes its own as SIGTERM arrives.
        await defer.maybeDeferred(self.listening.stopService)
        timeout = self.drain_timeout + STOP_GRACE
        self.log.info(
            "stopping {workers} workers (at most {timeout:g} s)",
            event="workers_stopping",
            workers=len(self.pool.live()),
            timeout=timeout,
        )
        await self.pool.stop_all(timeout)

    # -- what a worker is started with -----------------------------------------------------

    def spec(self, index: int, copies: tuple[Any, ...] = (), start: int = 1) -> WorkerSpec:
        """What worker ``index`` is started with (its share of ``--max-connections``).

        ``start``: which process of the slot this is (its connection ids say so).
        """
        values = dict(self._values)
        total = int(values.get("max-connections") or 0)
        if total:
            values["max-connections"] = str(connection_share(total, self.worker_count, index))
        return WorkerSpec(
            index,
            values,
            self.sockets,
            self._config_file,
            self._command_line,
            self.log_buffer,
            copies,
            # The workers run on the supervisor's reactor, when it is one of ours.
            name_of(self._reactor),
            start,
        )

    def prepare(self, index: int) -> tuple[WorkerSpec, list[int]]:
        """Slot ``index``'s spec with fresh copies of the TLS files; their descriptors."""
        copies, held = share_copies(self._tls_files)
        start = self._starts[index] = self._starts.get(index, 0) + 1
        return self.spec(index, copies, start), held

    # -- the pool's reports (PoolListener) ----------------------------------------------

    def worker_line(self, process: WorkerProcess, line: bytes, *, cut: bool) -> None:
        """A record line of a worker: to the relay."""
        self.relay.line(process.index, process.pid, line, cut=cut)

    def worker_stderr(self, process: WorkerProcess, line: bytes) -> None:
        """A stderr line of a worker: to the relay."""
        self.relay.stderr(process.index, process.pid, line)

    def worker_spawned(self, process: WorkerProcess) -> None:
        """A worker started: it is starting until it reports."""
        self.state.started(process.index, process.pid)
        self.log.info(
            "worker {worker} started: pid {pid}",
            event="worker_started",
            worker=process.index,
            pid=process.pid,
        )

    def worker_spawn_failed(self, index: int, error: OSError) -> None:
        """Worker ``index`` could not be started: try again after the backoff."""
        delay = self.backoffs[index].next_delay()
        self.log.error(
            "cannot start worker {worker}: {error}; trying again in {restart_in:g} s",
            event="worker_spawn_failed",
            worker=index,
            error=str(error),
            restart_in=delay,
        )
        self._failed(index, f"could not be started ({error})", str(error), delay)

    def worker_ended(self, process: WorkerProcess, reason: Failure) -> None:
        """A worker exited: forget it and, unless stopping, start it again later."""
        index = process.index
        current = self.pool.ended(process)
        served = self.state.served(index) if current else None
        self.reloads.forget(index)
        code, sig = exit_status(reason)
        how = describe_exit(code, sig)
        fields = {"worker": index, "pid": process.pid, "how": how, "exit_code": code}
        if self.stopping or not current:
            self.log.emit(
                LogLevel.info if code == 0 else LogLevel.warn,
                "worker {worker} (pid {pid}) {how}",
                event="worker_exited",
                signal=sig,
                expected=True,
                restart_in=None,
                served_s=None if served is None else round(served, 3),
                **fields,
            )
            if current:
                self.state.ended(index)
            return
        error = None if served is not None else self.state.start_errors.get(index)
        delay = self.backoffs[index].next_delay(served)
        self.log.warn(
            "worker {worker} (pid {pid}) {how}; starting it again in {restart_in:g} s",
            event="worker_exited",
            signal=sig,
            expected=False,
            restart_in=delay,
            served_s=None if served is None else round(served, 3),
            error=error,
            **fields,
        )
        self.state.ended(index)
        self._failed(index, how, error, delay)

    def _failed(self, index: int, how: str, error: str | None, delay: float) -> None:
        """Slot ``index`` lost its worker: give up, or start it again in ``delay`` s."""
        if self.give_up.ended(index, how, error, self.state.serving):
            self._give_up()
            return
        self.pool.restart_later(index, delay)
        if self.notifier is not None:
            self.notifier.status(self.state.status())

    def _give_up(self) -> None:
        if self.gave_up:
            return
        self.gave_up = True
        failures = self.give_up.failures
        self.log.critical(
            "{count} worker failures in {window:g} s with no worker serving: giving up, "
            "exiting with status {status}",
            event="pool_gave_up",
            count=len(failures),
            window=self.give_up.window,
            status=GIVE_UP_EXIT_STATUS,
            failures=[{"worker": f.worker, "how": f.how, "error": f.error} for f in failures],
        )
        if self.notifier is not None:
            last = failures[-1] if failures else None
            why = f"; last: worker {last.worker} {last.how}" if last is not None else ""
            why += f" ({last.error})" if last is not None and last.error else ""
            self.notifier.status(f"gave up after {len(failures)} worker failures{why}")
        self._exit(self._reactor, GIVE_UP_EXIT_STATUS)
        with contextlib.suppress(ReactorNotRunning):  # a stop signal came first
            self._reactor.stop()

    # -- readiness and reload ----------------------------------------------------------

    def serving_workers(self) -> list[int]:
        """The workers that serve now."""
        return sorted(
            index
            for index, view in self.state.views.items()
            if view.state is WorkerState.SERVING and index in self.pool.workers
        )

    def _serving_changed(self, serving: int) -> None:
        if serving:
            self.give_up.serving()
        if self.stopping:
            return
        self.log.emit(
            LogLevel.info if serving else LogLevel.warn,
            "{serving}/{workers} workers serving",
            event="workers_serving",
            serving=serving,
            workers=self.worker_count,
            ready=serving > 0,
            pids=[self.pool.workers[i].pid for i in self.serving_workers()],
        )
        if self.notifier is None:
            return
        if serving and not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready(self.state.status())
        else:
            self.notifier.status(self.state.status())

    def _on_sighup(self, _signum: int, _frame: FrameType | None) -> None:
        """Signal context: only schedule the forwarding in the reactor."""
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Forward SIGHUP to every serving worker (nothing while stopping)."""
        if not self.stopping:
            self.reloads.reload()


def kill_workers(supervisor: WorkerSupervisor) -> dict[str, object]:
    """A forced stop: SIGKILL every worker still running; ``workers_killed``, their pids."""
    return {"workers_killed": supervisor.pool.kill_all()}
