"""``--workers N``: the supervisor's pieces in memory, then the real daemon with two workers.

The unit tests drive :class:`~secure_echo.pool.supervisor.WorkerSupervisor` with a memory reactor
that records ``spawnProcess`` calls and a :class:`~twisted.internet.task.Clock`; worker
processes are :class:`~secure_echo.pool.supervisor.WorkerProcess` protocols fed bytes by hand.
The integration tests run ``twistd -n secure-echo --workers 2`` and talk to it with real
TLS clients; which worker served a connection is read from the ``worker`` field of its
``connection_closed`` record, or, while it is open, from ``/proc``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Final, cast

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, LogPublisher, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from secure_echo import tap
from secure_echo.daemon import maker
from secure_echo.daemon import options as config
from secure_echo.daemon.load import load
from secure_echo.daemon.printconfig import effective_settings
from secure_echo.daemon.reactor import DirectEPollReactor
from secure_echo.daemon.sdnotify import Notifier
from secure_echo.daemon.settings import FILE_KEYS
from secure_echo.pool import maker as pool_maker
from secure_echo.pool import supervisor as workers
from secure_echo.pool.contract import (
    MAX_RECORD_BYTES,
    SPEC_ENV,
    SUPERVISOR_ONLY_ENV,
    SharedSocket,
    WorkerSpec,
    WorkerState,
)
from secure_echo.pool.ports import SharedPortsService, adopt_port
from secure_echo.pool.reload import RELOAD_TIMEOUT
from secure_echo.pool.restarts import GIVE_UP_EXIT_STATUS, GIVE_UP_FAILURES
from secure_echo.pool.supervisor import (
    WorkerSupervisor,
    code_root,
    connection_share,
    worker_environment,
    worker_values,
)
from secure_echo.pool.watchdog import HUNG_GRACE
from secure_echo.pool.worker import (
    ParentWatch,
    WorkerLifecycle,
    build_worker_service,
    worker_settings,
)
from tests.daemon import Daemon, Event, child_env, start_daemon
from tests.helpers import make_pki, write_crl, write_named_server, write_test_certs
from tests.test_integration import IntegrationCase, client_context, server_args, shared_pki
from tests.test_sdnotify import NotifyListener, assignments, index_of
from tests.test_socket_activation import SocketActivationCase, wait_for_message

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Sequence

    from twisted.logger import LogEvent

    from secure_echo.pool.processes import WorkerProcess

#: Seconds any wait on the real daemon may take.
WAIT: Final = 15.0


# -- the environment -------------------------------------------------------------------


class EnvironmentTests(SynchronousTestCase):
    """The environment a worker is started in."""

    def test_environment(self) -> None:
        """Workers never see systemd's variables; they get the spec and our code's path."""
        spec = WorkerSpec(1, {"x": 1})
        environ = {
            "PATH": "/bin",
            "NOTIFY_SOCKET": "/run/systemd/notify",
            "WATCHDOG_USEC": "1000",
            "WATCHDOG_PID": "1",
            "LISTEN_PID": "1",
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "secure-echo",
            "PYTHONPATH": "elsewhere",
        }
        env = worker_environment(environ, spec, code_root())
        self.assertEqual(env["PATH"], "/bin")
        for name in SUPERVISOR_ONLY_ENV:
            self.assertNotIn(name, env)
        self.assertEqual(WorkerSpec.from_json(env[SPEC_ENV]).values, {"x": 1})
        paths = env["PYTHONPATH"].split(os.pathsep)
        self.assertIn("elsewhere", paths)
        root = Path(workers.__file__).resolve().parent.parent.parent
        site_dirs = {Path(p).resolve() for p in sysconfig.get_paths().values()}
        if root in site_dirs:
            # Installed: the worker finds secure_echo in site-packages anyway.
            self.assertEqual(paths, ["elsewhere"])
        else:
            # From a source tree: that tree comes first, so workers run this code.
            self.assertEqual(Path(paths[0]), root)
        self.assertEqual(worker_environment({}, spec, None).get("PYTHONPATH"), None)


class ConfigTests(SynchronousTestCase):
    """``--workers`` and the values handed to workers."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.tls = ["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)]

    def test_default_and_range(self) -> None:
        """Default 1; 1 to 64 accepted; anything else is a one-line error."""
        self.assertEqual(config.parse(self.tls).workers, 1)
        self.assertEqual(config.parse([*self.tls, "--workers", "64"]).workers, 64)
        for value, words in (("0", "too small"), ("65", "at most 64"), ("two", "whole number")):
            error = self.assertRaises(
                usage.UsageError, config.parse, [*self.tls, "--workers", value]
            )
            self.assertIn("--workers", str(error))
            self.assertIn(words, str(error))

    def test_from_config_file(self) -> None:
        """``workers = 3`` in a config file; --print-config shows it."""
        path = Path(self.mktemp())
        path.write_text("workers = 3\n")
        cfg = config.parse([*self.tls, "--config", str(path)])
        self.assertEqual(cfg.workers, 3)
        shown = effective_settings(cfg)["options"]
        self.assertEqual(cast("Any", shown)["workers"], {"value": 3, "source": "file"})

    def test_worker_values(self) -> None:
        """Workers get the supervisor's values with absolute paths, minus its own jobs."""
        options = config.Options()
        relative = os.path.relpath(self.pki.server_cert)
        options.parseOptions(
            [
                "--cert",
                relative,
                "--key",
                str(self.pki.server_key),
                "--workers",
                "4",
                "--max-pending",
                "9",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--log-file",
                str(Path(self.mktemp()).absolute()),
                "--allow-cn",
                "x",
                "--client-ca",
                str(self.pki.ca_cert),
            ]
        )
        values = worker_values(options)
        self.assertEqual(values["cert"], [str(self.pki.server_cert.absolute())])
        self.assertEqual(values["max-pending"], "9")
        self.assertEqual(values["allow-cn"], ["x"])
        self.assertEqual(values["listen"], [])
        self.assertIsNone(values["log-file"])
        self.assertEqual(values["workers"], "1")
        self.assertEqual(set(values), set(FILE_KEYS))

    def test_dev_certificates_directory(self) -> None:
        """Without --cert, workers are told the state directory the supervisor used."""
        state = Path(self.mktemp()).absolute()
        state.mkdir()
        self.patch(os, "environ", {**os.environ, "STATE_DIRECTORY": str(state)})
        options = config.Options()
        options.parseOptions([])
        values = worker_values(options)
        self.assertEqual(values["state-dir"], str(state))
        self.assertEqual(values["cert"], [])

    def test_worker_options(self) -> None:
        """A worker validates the values again into the config it serves with."""
        options = config.Options()
        options.parseOptions([*self.tls, "--workers", "2", "--max-line-length", "100"])
        spec = WorkerSpec(
            2,
            worker_values(options),
            config_file="/nowhere/se.toml",
            command_line=dict(options.settings.command_line),
        )
        cfg = worker_settings(WorkerSpec.from_json(spec.to_json()))
        self.assertEqual(cfg.listens, ())
        self.assertEqual(cfg.workers, 1)
        self.assertEqual(cfg.max_line_length, 100)
        self.assertEqual(cfg.tls.subject, load(options.settings).tls.subject)
        self.assertEqual(cfg.config_file, Path("/nowhere/se.toml"))
        self.assertEqual(cfg.command_line["max-line-length"], "100")

    def test_worker_gets_every_certificate(self) -> None:
        """Several --cert/--key, --crl, --test-certs, --alpn and --strict-sni reach a worker.

        Relative paths are made absolute, each item of a list; the worker loads the
        same set.
        """
        other = write_named_server(self.pki, "other", ("other.example",))
        test_dir = write_test_certs(self.pki.directory / "test-certs", self.pki.ca)
        crl = write_crl(self.pki, ())
        relative = [os.path.relpath(path) for path in (*other, crl, test_dir)]
        options = config.Options()
        options.parseOptions(
            [
                *self.tls,
                "--cert",
                relative[0],
                "--key",
                relative[1],
                "--client-ca",
                str(self.pki.ca_cert),
                "--crl",
                relative[2],
                "--test-certs",
                relative[3],
                "--alpn",
                "h2",
                "--strict-sni",
                "--workers",
                "2",
            ]
        )
        values = worker_values(options)
        self.assertEqual(
            values["cert"], [str(self.pki.server_cert.absolute()), str(other[0].absolute())]
        )
        self.assertEqual(
            values["key"], [str(self.pki.server_key.absolute()), str(other[1].absolute())]
        )
        self.assertEqual(values["crl"], [str(crl.absolute())])
        self.assertEqual(values["test-certs"], str(test_dir.absolute()))
        cfg = worker_settings(WorkerSpec.from_json(WorkerSpec(1, values).to_json()))
        self.assertEqual([extra.subject for extra in cfg.tls.extra], ["CN=other.example"])
        self.assertEqual([cert.name for cert in cfg.tls.test], ["expired.localhost"])
        self.assertEqual(len(cfg.tls.crls), 1)
        self.assertEqual(cfg.tls.settings.alpn, (b"h2",))
        self.assertTrue(cfg.tls.settings.strict_sni)

    def test_make_service_branches(self) -> None:
        """``--workers 2`` builds a supervisor; the worker builds the one-process tree."""
        options = tap.Options()
        options.parseOptions([*self.tls, "--workers", "2"])
        top = tap.makeService(options, MemoryReactorClock())
        kinds = [type(child) for child in top]
        self.assertIn(WorkerSupervisor, kinds)
        self.assertNotIn(maker.TLSService, kinds)
        spec = WorkerSpec(2, worker_values(options))
        cfg = worker_settings(spec)
        tree, ports = build_worker_service(spec, cfg, MemoryReactorClock())
        children = list(tree)
        self.assertIs(children[-1], ports)
        (tls,) = [child for child in children if isinstance(child, maker.TLSService)]
        self.assertFalse(
            any(type(child).__name__ == "ListeningService" for child in children), children
        )
        # The worker's factory: ids <worker>-<n>, worker in the info reply.
        factory = ports.factory
        self.assertIs(factory, tls._factory)
        self.assertEqual(factory.connections, set())
        self.assertEqual(factory._next_id(), "2-1")
        self.assertEqual(cast("Any", factory.app_factory).settings.info_fields, {"worker": 2})

    def test_connection_ids_unique_across_restarts(self) -> None:
        """Each process of a slot gets the next start; a restarted one's ids say which."""
        options = config.Options()
        options.parseOptions([*self.tls, "--workers", "2"])
        supervisor = WorkerSupervisor(
            MemoryReactorClock(), 2, worker_values(options), handle_sighup=False
        )
        starts = [supervisor.prepare(index)[0].start for index in (1, 2, 1, 1, 2)]
        self.assertEqual(starts, [1, 1, 2, 3, 2])
        self.assertEqual(maker.conn_id_prefix(None), "")
        self.assertEqual(maker.conn_id_prefix(2), "2-")
        self.assertEqual(maker.conn_id_prefix(2, 3), "2.3-")
        spec = WorkerSpec(2, worker_values(options), start=3)
        _, ports = build_worker_service(spec, worker_settings(spec), MemoryReactorClock())
        self.assertEqual(ports.factory._next_id(), "2.3-1")

    def test_workers_run_on_the_supervisors_reactor(self) -> None:
        """Under --reactor=secure-echo-epoll the workers are told to install it too."""
        options = config.Options()
        options.parseOptions([*self.tls, "--workers", "2"])
        ours: Any = DirectEPollReactor.__new__(DirectEPollReactor)
        for reactor, expected in ((ours, "secure-echo-epoll"), (MemoryReactorClock(), None)):
            supervisor = WorkerSupervisor(reactor, 2, worker_values(options), handle_sighup=False)
            self.assertEqual(supervisor.spec(1).reactor, expected)

    def test_connection_limit_split(self) -> None:
        """--max-connections is the pool's: each worker is started with its share."""
        self.assertEqual([connection_share(10, 3, i) for i in (1, 2, 3)], [4, 3, 3])
        self.assertEqual([connection_share(0, 3, i) for i in (1, 2, 3)], [0, 0, 0])
        options = config.Options()
        options.parseOptions([*self.tls, "--workers", "3", "--max-connections", "10"])
        supervisor = WorkerSupervisor(
            MemoryReactorClock(), 3, worker_values(options), handle_sighup=False
        )
        shares = [supervisor.spec(i).values["max-connections"] for i in (1, 2, 3)]
        self.assertEqual(shares, ["4", "3", "3"])
        cfg = worker_settings(supervisor.spec(2))
        self.assertEqual(cfg.max_connections, 3)
        error = self.assertRaises(
            usage.UsageError,
            config.parse,
            [*self.tls, "--workers", "4", "--max-connections", "3"],
        )
        self.assertIn("cannot be split across 4 workers", str(error))

    def test_watchdog_option(self) -> None:
        """--worker-watchdog: 10 s by default; 0 or off switch it off."""
        self.assertEqual(config.parse(self.tls).worker_watchdog, 10.0)
        self.assertEqual(
            config.parse([*self.tls, "--worker-watchdog", "2.5"]).worker_watchdog, 2.5
        )
        self.assertEqual(config.parse([*self.tls, "--worker-watchdog", "0"]).worker_watchdog, 0.0)
        for bad in ("-1", "1.5"):
            self.assertRaises(
                usage.UsageError, config.parse, [*self.tls, "--worker-watchdog", bad]
            )


class MakeSupervisorTests(SynchronousTestCase):
    """The supervisor's service tree, as ``tap.makeService`` builds it for N > 1."""

    def test_tree(self) -> None:
        """Metrics answer from the pool's state; the notifier goes last; TLS files read."""
        pki = make_pki(self.mktemp())
        listener = NotifyListener()
        self.addCleanup(listener.close)
        self.patch(os, "environ", {**os.environ, "NOTIFY_SOCKET": listener.value})
        self.patch(pool_maker, "globalLogPublisher", LogPublisher())
        options = tap.Options()
        options.parseOptions(
            [
                "--cert",
                str(pki.server_cert),
                "--key",
                str(pki.server_key),
                "--workers",
                "2",
                "--metrics",
                "tcp:0:interface=127.0.0.1",
            ]
        )
        top = tap.makeService(options, MemoryReactorClock())
        children = list(top)
        self.assertEqual(
            [type(c).__name__ for c in children],
            [
                "MetricsService",
                "WorkerSupervisor",
                "RestartWatch",
                "SignalService",
                "NotifyService",
            ],
        )
        metrics, supervisor = children[0], children[1]
        assert isinstance(supervisor, WorkerSupervisor)
        self.assertEqual(
            sorted(supervisor._tls_files),
            sorted({str(pki.server_cert.absolute()), str(pki.server_key.absolute())}),
        )
        self.assertEqual(supervisor.state.subject, "CN=localhost")
        site = cast("Any", metrics)._site
        ready = site.resource.children[b"readyz"]
        self.assertEqual(ready._check(), (False, "not listening yet"))
        supervisor.state.listening = True
        supervisor.state.began()
        supervisor.state.started(1, 1)
        supervisor.state.reported(1, WorkerState.SERVING, connections=5)
        self.assertEqual(ready._check(), (True, "ready: 1/2 workers serving"))
        self.assertEqual(site.resource.children[b"healthz"]._check(), (True, "ok"))
        registry = cast("Any", site.resource.children[b"metrics"])._registry
        active = next(m for m in registry.collect() if m.name == "secure_echo_connections_active")
        self.assertEqual(active.samples[0].value, 5)
        on_listening = supervisor._on_listening
        assert on_listening is not None
        on_listening([])  # the dev banner: none with --cert


# -- the supervisor in memory ------------------------------------------------------------


class FakeProcess:
    """The transport of a process :class:`ProcessReactor` pretended to start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        """Record the signal."""
        self.signals.append(name)


class ProcessReactor(MemoryReactorClock):
    """A memory reactor whose ``spawnProcess`` records what it was asked to start."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[WorkerProcess, list[str], dict[str, str], dict[int, Any]]] = []
        self._pids = itertools.count(1000)
        self.refuse = 0

    def spawnProcess(
        self,
        processProtocol: WorkerProcess,
        executable: str,  # noqa: ARG002 - the same as args[0]
        args: list[str],
        env: dict[str, str],
        childFDs: dict[int, Any],
    ) -> FakeProcess:
        """Pretend to start a process: connect the protocol to a fake transport."""
        if self.refuse:
            self.refuse -= 1
            raise OSError(11, "Resource temporarily unavailable")
        transport = FakeProcess(next(self._pids))
        processProtocol.makeConnection(cast("Any", transport))
        self.spawned.append((processProtocol, args, env, childFDs))
        return transport


def line(event: str, **fields: object) -> bytes:
    """A worker's record line."""
    return json.dumps({"level": "info", "event": event, "message": event, **fields}).encode() + (
        b"\n"
    )


def end(process: WorkerProcess, *, code: int | None = 0, sig: int | None = None) -> None:
    """Make ``process`` exit with ``code`` or die of ``sig``."""
    reason = ProcessDone(0) if code == 0 and sig is None else ProcessTerminated(code, sig)
    process.processEnded(Failure(reason))


class SupervisorCase(SynchronousTestCase):
    """A supervisor of two workers on a :class:`ProcessReactor`."""

    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.published: list[LogEvent] = []
        self.exits: list[int] = []
        self.logged = EventLoggingObserver.createWithCleanup(
            cast("TestCase", self), globalLogPublisher
        )
        self.listener = NotifyListener()
        self.addCleanup(self.listener.close)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": self.listener.value})
        assert notifier is not None
        self.addCleanup(notifier.close)
        self.supervisor = WorkerSupervisor(
            self.reactor,
            2,
            {"max-pending": "8"},
            drain_timeout=3.0,
            watchdog=4.0,
            certificate=("CN=test", "2030-01-01T00:00:00+00:00"),
            notifier=notifier,
            publisher=self.published.append,
            environ={"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1"},
            executable="/usr/bin/python3",
            handle_sighup=False,
            exit=lambda _reactor, status: self.exits.append(status),
        )
        self.supervisor.sockets = (SharedSocket(7, "INET", "127.0.0.1:8443"),)
        self.supervisor.state.addresses = ["127.0.0.1:8443"]
        self.addCleanup(self.supervisor.hung.stop)

    def start(self) -> list[WorkerProcess]:
        """Start the supervisor; its two worker processes."""
        self.supervisor.startService()
        return [spawned[0] for spawned in self.reactor.spawned]

    def ready(self, *processes: WorkerProcess) -> None:
        """Each of ``processes`` reports ``worker_ready``."""
        for process in processes:
            process.childDataReceived(1, line("worker_ready", pid=process.pid))

    def beat(self, *processes: WorkerProcess, state: str = "serving") -> None:
        """Each of ``processes`` sends a heartbeat."""
        for process in processes:
            process.childDataReceived(1, line("worker_heartbeat", state=state, connections=0))

    def events(self, name: str) -> list[LogEvent]:
        """The supervisor's own log events called ``name``."""
        return [e for e in self.logged if e.get("event") == name]

    def notifications(self) -> list[str]:
        """Every assignment sent to the notify socket so far."""
        self.listener.drain()
        return [a for m in self.listener.messages for a in assignments(m)]

    def statuses(self) -> list[str]:
        """Every STATUS= text sent so far."""
        return [a[7:] for a in self.notifications() if a.startswith("STATUS=")]

    def latest(self, slot: int) -> WorkerProcess:
        """The process last spawned for ``slot``."""
        return [p for p, *_ in self.reactor.spawned if p.index == slot][-1]


class SupervisorTests(SupervisorCase):
    """Starting, serving records, restarting, reloading and stopping workers."""

    def test_spawns_workers(self) -> None:
        """N workers, each with the sockets at their numbers and a scrubbed environment."""
        processes = self.start()
        self.assertEqual([p.index for p in processes], [1, 2])
        for index, (process, args, env, child_fds) in enumerate(self.reactor.spawned, 1):
            self.assertEqual(
                args, ["/usr/bin/python3", "-m", "secure_echo.pool.worker", str(index)]
            )
            self.assertEqual(child_fds, {0: "w", 1: "r", 2: "r", 7: 7})
            self.assertNotIn("NOTIFY_SOCKET", env)
            self.assertNotIn("WATCHDOG_USEC", env)
            spec = WorkerSpec.from_json(env[SPEC_ENV])
            self.assertEqual((spec.index, spec.sockets), (index, self.supervisor.sockets))
            self.assertEqual(spec.values, {"max-pending": "8"})
            self.assertEqual(spec.tls_files, ())
            self.assertEqual(process.pid, 999 + index)
        started = self.events("worker_started")
        self.assertEqual([(e["worker"], e["pid"]) for e in started], [(1, 1000), (2, 1001)])

    def test_tls_file_copies(self) -> None:
        """Each worker gets a sealed copy of each TLS file; the supervisor keeps none open."""
        supervisor = WorkerSupervisor(
            self.reactor,
            1,
            {},
            executable="/usr/bin/python3",
            handle_sighup=False,
            tls_files={"/etc/se/key.pem": b"KEY BYTES", "/etc/se/cert.pem": b"CERT"},
        )
        kept: list[bytes] = []

        def spawn(*args: Any, **kwargs: Any) -> FakeProcess:
            spec = WorkerSpec.from_json(kwargs["env"][SPEC_ENV])
            for copy in spec.tls_files:
                self.assertEqual(kwargs["childFDs"][copy.fd], copy.fd)
                kept.append(Path(f"/proc/self/fd/{copy.fd}").read_bytes())
                self.assertRaises(OSError, os.write, copy.fd, b"x")  # sealed
            self.fds = [c.fd for c in spec.tls_files]
            return ProcessReactor.spawnProcess(self.reactor, *args, **kwargs)

        self.patch(self.reactor, "spawnProcess", spawn)
        supervisor.startService()
        self.addCleanup(supervisor.hung.stop)
        self.assertEqual(sorted(kept), [b"CERT", b"KEY BYTES"])
        for fd in self.fds:
            self.assertRaises(OSError, os.fstat, fd)

    def test_records_reemitted_with_worker(self) -> None:
        """Records in any pieces come out whole, tagged; heartbeats are summed, not logged."""
        first, second = self.start()
        data = line("connection_closed", conn_id="1-1") + line(
            "worker_heartbeat", state="serving", connections=4
        )
        for byte in data:
            first.childDataReceived(1, bytes([byte]))
        second.childDataReceived(
            1, line("worker_heartbeat", state="serving", connections=3) + b'{"event": "cut'
        )
        second.childConnectionLost(1)
        self.assertEqual(self.supervisor.state.connections(), 7)
        self.assertEqual(
            [(e["event"], e["worker"]) for e in self.published],
            [("connection_closed", 1)],
        )
        self.assertEqual(self.published[0]["conn_id"], "1-1")
        invalid = self.events("worker_output_invalid")
        self.assertEqual([(e["worker"], e["text"]) for e in invalid], [(2, '{"event": "cut')])

    def test_stderr_and_overlong_lines(self) -> None:
        """Stderr lines become warnings; an overlong record is reported, not re-emitted."""
        first, _ = self.start()
        first.childDataReceived(2, b"Traceback (most recent call last):\n  boom\n")
        self.assertEqual(
            [e["text"] for e in self.events("worker_stderr")],
            ["Traceback (most recent call last):", "  boom"],
        )
        first.childDataReceived(1, b"x" * (MAX_RECORD_BYTES + 1) + b"\n")
        (invalid,) = self.events("worker_output_invalid")
        self.assertEqual(invalid["reason"], "too long")
        self.assertEqual(self.published, [])

    def test_ready_when_the_first_worker_serves(self) -> None:
        """READY=1 once, with the first serving worker; STATUS= follows every change."""
        first, second = self.start()
        self.assertFalse(self.supervisor.state.readiness(0)[0])
        self.ready(first)
        self.assertEqual(self.notifications().count("READY=1"), 1)
        self.assertEqual(self.supervisor.state.readiness(0), (True, "ready: 1/2 workers serving"))
        self.ready(second)
        end(first, sig=9)
        self.reactor.advance(0.1)
        self.ready(self.latest(1))
        self.assertEqual(self.notifications().count("READY=1"), 1)
        self.assertEqual(
            [s.split(";")[0] for s in self.statuses()],
            [
                "1/2 workers serving",
                "2/2 workers serving",
                "1/2 workers serving",  # worker 1 ended (its restart: the same, not sent again)
                "2/2 workers serving",
            ],
        )
        self.assertIn("certificate CN=test valid until 2030-01-01", self.statuses()[0])
        serving = self.events("workers_serving")
        self.assertEqual(
            [(e["serving"], e["ready"]) for e in serving],
            [(1, True), (2, True), (1, True), (2, True)],
        )

    def test_a_drain_does_not_stick(self) -> None:
        """One worker drains and exits: still ready; ready at full strength once restarted."""
        first, second = self.start()
        self.ready(first, second)
        first.childDataReceived(1, line("worker_stopping", signal="SIGTERM"))
        self.assertEqual(self.supervisor.state.readiness(0), (True, "ready: 1/2 workers serving"))
        end(first)
        self.reactor.advance(0.1)
        self.ready(self.latest(1))
        self.assertEqual(self.supervisor.state.readiness(0), (True, "ready: 2/2 workers serving"))

    def test_crashed_worker_restarted_with_backoff(self) -> None:
        """A worker that dies starts again after 0.1 s, then 0.2 s, in its own slot."""
        first, second = self.start()
        end(first, sig=signal.SIGKILL)
        (exited,) = self.events("worker_exited")
        self.assertEqual((exited["worker"], exited["signal"]), (1, signal.SIGKILL))
        self.assertEqual((exited["expected"], exited["restart_in"]), (False, 0.1))
        self.assertEqual(exited["log_level"], LogLevel.warn)
        self.assertEqual(set(self.supervisor.pool.workers), {2})
        self.reactor.advance(0.099)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.002)
        self.assertEqual(len(self.reactor.spawned), 3)
        again = self.latest(1)
        self.assertIs(self.supervisor.pool.workers[1], again)
        end(again, code=1)
        self.assertEqual(self.events("worker_exited")[-1]["restart_in"], 0.2)
        self.assertEqual(self.events("worker_exited")[-1]["exit_code"], 1)
        self.assertIs(self.supervisor.pool.workers[2], second)

    def test_backoff_resets_after_serving(self) -> None:
        """A restarted worker that served 30 s or more restarts after 0.1 s again."""
        first, _ = self.start()
        for delay in (0.1, 0.2, 0.4):
            end(self.latest(1), code=1)
            self.assertEqual(self.events("worker_exited")[-1]["restart_in"], delay)
            self.reactor.advance(delay)
        self.ready(self.latest(1))
        self.reactor.advance(30)
        end(self.latest(1), sig=signal.SIGSEGV)
        exited = self.events("worker_exited")[-1]
        self.assertEqual((exited["restart_in"], exited["served_s"]), (0.1, 30.0))
        self.assertIsNot(first, self.latest(1))

    def test_spawn_failure_retried(self) -> None:
        """If a worker cannot be started, starting it is tried again after the backoff."""
        self.reactor.refuse = 1
        self.start()
        (failed,) = self.events("worker_spawn_failed")
        self.assertEqual((failed["worker"], failed["restart_in"]), (1, 0.1))
        self.assertEqual(set(self.supervisor.pool.workers), {2})
        self.reactor.advance(0.1)
        self.assertEqual(set(self.supervisor.pool.workers), {1, 2})

    def test_start_error_reported(self) -> None:
        """A worker that cannot start says why: in worker_exited and in STATUS=."""
        first, second = self.start()
        self.ready(first)
        second.childDataReceived(1, line("worker_failed", error="--cert: /x does not exist"))
        end(second, code=2)
        exited = self.events("worker_exited")[-1]
        self.assertEqual(exited["error"], "--cert: /x does not exist")
        self.assertIn("worker 2 cannot start: --cert: /x does not exist", self.statuses()[-1])
        ok, reason = self.supervisor.state.readiness(0)
        self.assertEqual((ok, reason), (True, "ready: 1/2 workers serving"))

    def test_crash_loop_gives_up(self) -> None:
        """Five failures with nothing serving: pool_gave_up, exit status 3, reactor stopped."""
        first, second = self.start()
        self.ready(first, second)
        end(first, sig=signal.SIGKILL)  # worker 2 still serves: not counted
        end(second, sig=signal.SIGKILL)
        failures = 1
        while not self.supervisor.gave_up and failures < 2 * GIVE_UP_FAILURES:
            self.assertEqual(self.exits, [])
            self.reactor.advance(1)
            slot = min(self.supervisor.pool.workers)
            process = self.supervisor.pool.workers[slot]
            process.childDataReceived(1, line("worker_failed", error="--key: denied"))
            end(process, code=2)
            failures += 1
        self.assertEqual(failures, GIVE_UP_FAILURES)
        self.assertTrue(self.supervisor.gave_up)
        self.assertEqual(self.exits, [GIVE_UP_EXIT_STATUS])
        self.assertTrue(self.reactor.hasStopped)
        (gave_up,) = self.events("pool_gave_up")
        self.assertEqual(gave_up["count"], GIVE_UP_FAILURES)
        self.assertEqual(gave_up["failures"][0]["how"], "was killed by signal 9")
        self.assertEqual(gave_up["failures"][-1]["error"], "--key: denied")
        self.assertEqual(gave_up["log_level"], LogLevel.critical)
        self.assertTrue(self.statuses()[-1].startswith("gave up after 5 worker failures"))
        self.assertFalse(self.supervisor.state.readiness(0)[0])

    def test_no_give_up_while_one_serves(self) -> None:
        """One slot crash-looping beside a serving worker never ends the pool."""
        first, _ = self.start()
        self.ready(first)
        for _ in range(3 * GIVE_UP_FAILURES):
            process = self.latest(2)
            process.childDataReceived(1, line("worker_failed", error="boom"))
            end(process, code=2)
            self.reactor.advance(30)
            self.beat(first)
        self.assertFalse(self.supervisor.gave_up)
        self.assertEqual(self.exits, [])

    def test_hung_worker_replaced(self) -> None:
        """Heartbeats stop: worker_hung, SIGTERM, SIGKILL after the grace, then a restart."""
        first, second = self.start()
        self.ready(first, second)
        for _ in range(8):
            self.reactor.advance(0.5)
            self.beat(first)
        self.assertEqual(second.transport.signals, ["TERM"])  # type: ignore[union-attr]
        (hung,) = self.events("worker_hung")
        self.assertEqual((hung["worker"], hung["pid"]), (2, second.pid))
        self.assertTrue(self.statuses()[-1].startswith("1/2 workers serving"))
        for _ in range(int(HUNG_GRACE * 2)):
            self.reactor.advance(0.5)
            self.beat(first)
        self.assertEqual(second.transport.signals, ["TERM", "KILL"])  # type: ignore[union-attr]
        (killed,) = self.events("worker_killed")
        self.assertEqual(killed["worker"], 2)
        end(second, sig=signal.SIGKILL)
        self.reactor.advance(0.1)
        replacement = self.latest(2)
        self.assertIsNot(replacement, second)
        self.ready(replacement)
        self.assertEqual(self.supervisor.state.serving, 2)
        self.assertEqual(first.transport.signals, [])  # type: ignore[union-attr]

    def test_health(self) -> None:
        """/healthz fails when no worker has reported within the deadline."""
        first, _ = self.start()
        self.assertEqual(self.supervisor.state.health(), (True, "ok"))
        self.reactor.advance(3.9)
        self.beat(first)
        self.assertEqual(self.supervisor.state.health(), (True, "ok"))
        self.supervisor.hung.stop()  # so that nobody is killed meanwhile
        self.reactor.advance(4.0)
        self.assertEqual(self.supervisor.state.health(), (False, "no worker has reported for 4 s"))

    def test_reload_forwarded_to_serving_workers(self) -> None:
        """SIGHUP goes to serving workers; READY=1 after both outcomes, failure in STATUS."""
        first, second = self.start()
        self.ready(first, second)
        before = len(self.notifications())
        self.supervisor.reload()
        self.assertEqual(first.transport.signals, ["HUP"])  # type: ignore[union-attr]
        self.assertEqual(second.transport.signals, ["HUP"])  # type: ignore[union-attr]
        self.assertIn("RELOADING=1", self.notifications()[before:])
        first.childDataReceived(
            1,
            line(
                "tls_reloaded",
                trigger="SIGHUP",
                subject="CN=new",
                not_after="2031-05-06T00:00:00+00:00",
            ),
        )
        self.assertNotIn("READY=1", self.notifications()[before:])
        second.childDataReceived(1, line("tls_reload_failed", trigger="SIGHUP"))
        after = self.notifications()[before:]
        self.assertIn("READY=1", after)
        status = next(a for a in after if a.startswith("STATUS="))
        self.assertIn("TLS reload failed in workers 2", status)
        self.assertIn("CN=new valid until 2031-05-06", status)
        (done,) = self.events("workers_reloaded")
        self.assertEqual((done["reloaded"], done["failed"], done["missing"]), ([1], [2], []))

    def test_reload_skips_starting_workers_and_times_out(self) -> None:
        """A worker not serving yet gets no SIGHUP; a silent one is missing after the timeout."""
        first, second = self.start()
        self.ready(first)
        self.supervisor.reload()
        self.assertEqual(second.transport.signals, [])  # type: ignore[union-attr]
        self.reactor.advance(RELOAD_TIMEOUT)
        (done,) = self.events("workers_reloaded")
        self.assertEqual(done["missing"], [1])
        self.assertEqual(self.notifications().count("READY=1"), 2)

    def test_stop_terms_then_kills(self) -> None:
        """Stopping sends SIGTERM; a worker still there after drain + grace gets SIGKILL."""
        first, second = self.start()
        self.ready(first, second)
        stopped = self.supervisor.stopService()
        self.assertEqual(
            self.supervisor.state.readiness(0), (False, "draining: the daemon is shutting down")
        )
        self.supervisor.reload()  # ignored while stopping
        self.assertEqual(first.transport.signals, ["TERM"])  # type: ignore[union-attr]
        self.assertEqual(second.transport.signals, ["TERM"])  # type: ignore[union-attr]
        end(first)
        self.reactor.advance(3.0 + workers.STOP_GRACE - 0.1)
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.assertEqual(second.transport.signals, ["TERM", "KILL"])  # type: ignore[union-attr]
        (killed,) = self.events("worker_killed")
        self.assertEqual(killed["worker"], 2)
        end(second, sig=signal.SIGKILL)
        self.successResultOf(stopped)
        exits = self.events("worker_exited")
        self.assertEqual([e["expected"] for e in exits], [True, True])
        self.assertEqual(exits[0]["log_level"], LogLevel.info)
        # Nothing is restarted while stopping, and nobody is called hung.
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.events("worker_hung"), [])
        self.assertEqual(len(self.events("workers_serving")), 2)

    def test_ports_kept_for_workers(self) -> None:
        """Bound ports stop reading at once, are not shut down at close, and are shared."""

        class Port:
            def __init__(self, fd: int, host: object) -> None:
                self.fd, self.host, self.reading = fd, host, True
                self._shouldShutdown = True

            def stopReading(self) -> None:
                self.reading = False

            def fileno(self) -> int:
                return self.fd

            def getHost(self) -> object:
                return self.host

        ports = [
            Port(5, IPv4Address("TCP", "127.0.0.1", 8443)),
            Port(6, IPv6Address("TCP", "::1", 8443)),
            Port(9, UNIXAddress(b"/run/echo.sock")),
        ]
        seen: list[object] = []
        supervisor = WorkerSupervisor(
            self.reactor, 2, {}, on_listening=seen.append, handle_sighup=False
        )
        supervisor._listened(cast("Any", ports))
        self.assertEqual(seen, [ports])
        self.assertEqual(
            supervisor.sockets,
            (
                SharedSocket(5, "INET", "127.0.0.1:8443"),
                SharedSocket(6, "INET6", "[::1]:8443"),
                SharedSocket(9, "UNIX", "unix:/run/echo.sock"),
            ),
        )
        self.assertFalse(any(p.reading or p._shouldShutdown for p in ports))
        self.assertIn("listening on 127.0.0.1:8443, [::1]:8443", supervisor.state.status())

    def test_stop_cancels_pending_restart(self) -> None:
        """A restart scheduled before the stop never happens; the stop does not wait on it."""
        first, second = self.start()
        end(first, sig=signal.SIGSEGV)
        stopped = self.supervisor.stopService()
        end(second)
        self.successResultOf(stopped)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_exit_after_shutdown(self) -> None:
        """The exit status is set by a handler registered after the reactor's shutdown."""
        reactor = MemoryReactorClock()
        registered: list[Any] = []
        self.patch(atexit, "register", registered.append)
        workers.exit_after_shutdown(reactor, 3)
        self.assertEqual(registered, [])
        ((trigger, args, _),) = reactor.triggers["after"]["shutdown"]
        trigger(*args)
        (leave,) = registered
        exited: list[int] = []
        self.patch(os, "_exit", exited.append)
        leave()
        self.assertEqual(exited, [3])


# -- the worker's own pieces -------------------------------------------------------------


class WorkerPiecesTests(SynchronousTestCase):
    """The worker's watch on the supervisor, its stop and its heartbeat."""

    def test_parent_watch(self) -> None:
        """End of file on the pipe from the supervisor means it is gone; a reactor stop not."""
        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        gone: list[bool] = []
        watch = ParentWatch(read_fd, lambda: gone.append(True))
        self.assertEqual(watch.fileno(), read_fd)
        self.assertIsNone(watch.doRead())  # nothing to read yet
        os.write(write_fd, b"noise")
        self.assertIsNone(watch.doRead())
        watch.connectionLost(Failure(Exception("the reactor stops")))
        self.assertEqual(gone, [])
        os.close(write_fd)
        self.assertIsNotNone(watch.doRead())
        watch.connectionLost(Failure(Exception("end of file")))
        self.assertEqual(gone, [True])

    def test_stops_once(self) -> None:
        """SIGTERM twice, then the supervisor gone: one drain, one record, no error."""

        class Reactor:
            running = True
            stops = 0

            def stop(self) -> None:
                self.stops += 1

        logged = EventLoggingObserver.createWithCleanup(cast("TestCase", self), globalLogPublisher)
        fake = Reactor()
        ports = SimpleNamespace(factory=SimpleNamespace(connections={1, 2, 3}))
        lifecycle = WorkerLifecycle(fake, cast("Any", None), cast("Any", ports))
        lifecycle.heartbeat()
        lifecycle.signalled("SIGTERM")
        lifecycle.signalled("SIGTERM")
        lifecycle.supervisor_gone()
        lifecycle.heartbeat()
        self.assertEqual(fake.stops, 1)
        self.assertEqual(lifecycle.stopping, "SIGTERM")
        self.assertEqual(
            [(e.get("event"), e.get("state")) for e in logged],
            [
                ("worker_heartbeat", "serving"),
                ("worker_stopping", None),
                ("worker_heartbeat", "draining"),
            ],
        )
        self.assertEqual(logged[0]["connections"], 3)

    def test_parent_watch_hang_up(self) -> None:
        """A hang-up reported without a read (epoll's EPOLLHUP) also means it is gone."""
        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        gone: list[bool] = []
        watch = ParentWatch(read_fd, lambda: gone.append(True))
        os.close(write_fd)
        watch.connectionLost(Failure(Exception("connection lost")))
        self.assertEqual(gone, [True])


class _Recording(protocol.Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hi")
        self.transport.loseConnection()


class SharedUNIXPortTests(TestCase):
    """A worker's UNIX port leaves the socket as the supervisor set it up."""

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="se-workers-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.path = directory / "echo.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.sock.close)
        self.sock.bind(str(self.path))
        self.path.chmod(0o600)
        self.sock.listen(7)
        self.sock.setblocking(False)

    def connect(self) -> bytes:
        """Connect to the path and read what the server says until it closes."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(self.path))
            return client.recv(10)

    @defer.inlineCallbacks
    def test_adopt_serve_and_stop(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Served via the dup; after stopping, path, mode and the supervisor's socket stay."""
        from twisted.internet import reactor  # noqa: PLC0415 - trial's running reactor

        shared = SharedSocket(os.dup(self.sock.fileno()), "UNIX", str(self.path))
        factory = protocol.Factory.forProtocol(_Recording)
        service = SharedPortsService(reactor, [shared], cast("Any", factory))
        service.privilegedStartService()
        self.assertRaises(OSError, os.fstat, shared.fd)  # the inherited fd was closed
        received = yield deferToThreadRead(self.connect)
        self.assertEqual(received, b"hi")
        yield service.stopService()
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        # The socket still listens for the supervisor (and the other workers).
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(str(self.path))
        accepted, _ = self.sock.accept()
        accepted.close()

    def test_adopt_port_tcp(self) -> None:
        """A TCP socket is made non-blocking and adopted with Twisted's adoptStreamPort."""
        calls: list[tuple[int, int]] = []

        class Recorder:
            def adoptStreamPort(self, fd: int, family: int, factory: object) -> str:  # noqa: ARG002
                calls.append((fd, family))
                return "port"

        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as blocking:
            shared = SharedSocket(blocking.fileno(), "INET6", "[::1]:1")
            self.assertEqual(adopt_port(Recorder(), shared, protocol.Factory()), "port")
            self.assertEqual(calls, [(blocking.fileno(), socket.AF_INET6)])
            self.assertFalse(os.get_blocking(blocking.fileno()))


def deferToThreadRead(function: Callable[[], bytes]) -> defer.Deferred[bytes]:
    """Run a blocking client in a thread while the reactor serves it."""
    from twisted.internet.threads import deferToThread  # noqa: PLC0415

    return deferToThread(function)


# -- a worker process on its own ---------------------------------------------------------


def read_records(stream: Any, until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Read JSON lines from a worker's stdout until one matches ``until``; all of them."""
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        text = stream.readline()
        if not text:
            break
        records.append(json.loads(text))
        if until(records[-1]):
            return records
    msg = f"no matching record; got {[r.get('event') for r in records]}"
    raise AssertionError(msg)


class WorkerProcessTests(SynchronousTestCase):
    """``python -m secure_echo.pool.worker`` started by hand, as the supervisor would."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        options = config.Options()
        options.parseOptions(
            ["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)]
        )
        self.values = worker_values(options)

    def spawn(self, spec_json: str, fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
        """A worker process with ``spec_json`` and ``fds`` inherited; killed at cleanup."""
        env = child_env({"NOTIFY_SOCKET": "/nowhere"})
        env[SPEC_ENV] = spec_json
        process = subprocess.Popen(
            [sys.executable, "-m", "secure_echo.pool.worker", "1"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=fds,
        )
        self.addCleanup(self.reap, process)
        return process

    @staticmethod
    def reap(process: subprocess.Popen[str]) -> None:
        """Kill ``process`` if it still runs and close its pipes."""
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()

    def test_bad_spec(self) -> None:
        """A broken spec: one worker_failed record naming the variable; status 2."""
        process = self.spawn("{not json")
        assert process.stdout is not None
        (record,) = read_records(process.stdout, lambda r: r.get("event") == "worker_failed")
        self.assertIn(SPEC_ENV, record["error"])
        self.assertEqual(process.wait(WAIT), 2)

    def test_unknown_reactor(self) -> None:
        """The spec's reactor is installed before anything runs; one that is not: status 2."""
        process = self.spawn(WorkerSpec(1, self.values, reactor="no-such-reactor").to_json())
        assert process.stdout is not None
        (record,) = read_records(process.stdout, lambda r: r.get("event") == "worker_failed")
        self.assertIn("no-such-reactor", record["error"])
        self.assertEqual(process.wait(WAIT), 2)

    def test_invalid_options(self) -> None:
        """Options that no longer validate (a certificate gone): worker_failed, status 2."""
        values = {**self.values, "cert": [str(Path(self.mktemp()).absolute())]}
        process = self.spawn(WorkerSpec(1, values).to_json())
        assert process.stdout is not None
        records = read_records(process.stdout, lambda r: r.get("event") == "worker_failed")
        self.assertIn("--cert", records[-1]["error"])
        self.assertEqual(process.wait(WAIT), 2)

    def test_serves_then_leaves_when_the_supervisor_is_gone(self) -> None:
        """It serves on the inherited socket; at EOF on stdin it drains and exits 0.

        The socket stays usable by the process that passed it (no shutdown()).
        """
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        spec = WorkerSpec(
            1, self.values, (SharedSocket(listener.fileno(), "INET", f"127.0.0.1:{port}"),)
        )
        process = self.spawn(spec.to_json(), (listener.fileno(),))
        assert process.stdout is not None
        assert process.stdin is not None
        records = read_records(process.stdout, lambda r: r.get("event") == "worker_ready")
        self.assertEqual(records[-1]["addresses"], [f"127.0.0.1:{port}"])
        events = {r["event"] for r in records}
        self.assertIn("tls_context_loaded", events)
        context = client_context(self.pki.ca_cert)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"hello worker\n")
            self.assertEqual(tls.recv(100), b"hello worker\n")
        records = read_records(process.stdout, lambda r: r.get("event") == "connection_closed")
        process.stdin.close()
        records = read_records(process.stdout, lambda r: r.get("event") == "supervisor_gone")
        self.assertEqual(process.wait(WAIT), 0)
        # Still listening here: connect completes in the kernel's backlog.
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT):
            accepted, _ = listener.accept()
            accepted.close()


# -- the real daemon -----------------------------------------------------------------------


def pids_of(daemon: Daemon, since: int = 0) -> dict[int, int]:
    """Worker index to pid, from the latest ``worker_started`` records."""
    return {
        e["worker"]: e["pid"]
        for e in daemon.find_events(lambda e: e.get("event") == "worker_started", since)
    }


def wait_ready(daemon: Daemon, since: int = 0, workers: Sequence[int] = (1, 2)) -> None:
    """Wait until each of ``workers`` logged ``worker_ready`` after ``since``."""
    for index in workers:

        def is_ready(event: Event, index: int = index) -> bool:
            return event.get("event") == "worker_ready" and event.get("worker") == index

        daemon.wait_for_event(is_ready, since=since, timeout=WAIT)


def echo_burst(port: int, ca: Path, count: int, threads: int = 4) -> list[str]:
    """``count`` TLS connections from ``threads`` threads at once, each echoing two lines.

    Returns the client addresses; raises if any echo failed.  Each thread owns its
    sockets (an SSLSocket is never shared between threads).
    """
    context = client_context(ca)
    peers: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(n: int) -> None:
        try:
            for i in range(n):
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw,
                    context.wrap_socket(raw, server_hostname="localhost") as tls,
                ):
                    host, client_port = tls.getsockname()[:2]
                    data = b"line %d\nline two %d\n" % (i, i)
                    tls.sendall(data)
                    received = b""
                    while len(received) < len(data):
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        received += chunk
                    assert received == data, f"echo mismatch: {received!r}"
                    with lock:
                        peers.append(f"{host}:{client_port}")
        except BaseException as error:  # reported to the test below
            with lock:
                errors.append(error)

    per_thread = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    workers_ = [threading.Thread(target=run, args=(n,)) for n in per_thread]
    for thread in workers_:
        thread.start()
    for thread in workers_:
        thread.join(WAIT * 2)
    if errors:
        raise errors[0]
    return peers


def wait_closed_all(daemon: Daemon, peers: Sequence[str], since: int) -> list[Event]:
    """Wait for the ``connection_closed`` record of every peer; return them."""
    wanted = set(peers)
    deadline = time.monotonic() + WAIT
    while True:
        closed = daemon.find_events(
            lambda e: e.get("event") == "connection_closed" and e.get("peer") in wanted, since
        )
        if len(closed) >= len(wanted) or time.monotonic() > deadline:
            return closed
        time.sleep(0.05)


def server_connections(pid: int, server_port: int) -> set[int]:
    """The client ports of the TCP connections to ``server_port`` that ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = str(fd.readlink())
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    ports = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        established = fields[3] == "01"  # not the listening socket every worker holds
        if established and local_port == server_port and int(fields[9]) in inodes:
            ports.add(remote_port)
    return ports


class WorkersCase(IntegrationCase):
    """Daemons with ``--workers 2``."""

    def start_workers(self, *extra: str, listen: str = "tcp:0:interface=127.0.0.1") -> Daemon:
        """A fresh daemon with two workers (stopped at cleanup), once both are ready."""
        if not Path("/proc/self/fd").is_dir():
            raise SkipTest("needs Linux /proc")
        args = server_args(shared_pki(), "--workers", "2", "--drain-timeout", "3", *extra)
        daemon = start_daemon(self, Path(self.mktemp()), args, listen=listen)
        wait_ready(daemon)
        return daemon

    def burst(self, daemon: Daemon, count: int = 40) -> list[Event]:
        """Echo over ``count`` concurrent connections; their ``connection_closed`` records."""
        since = daemon.mark()
        peers = echo_burst(daemon.port, shared_pki().ca_cert, count)
        closed = wait_closed_all(daemon, peers, since)
        self.assertEqual(len(closed), count, daemon.describe())
        return closed


class WorkersTests(WorkersCase):
    """Serving, logging, reloading, stopping and restarting with two workers."""

    def test_connections_spread_over_workers(self) -> None:
        """40 connections are all echoed, by both workers; the metrics count them all.

        Connection ids are ``<worker>-<n>``, unique across the pool.
        """
        daemon = self.start_workers("--metrics", "tcp:0:interface=127.0.0.1")
        closed = self.burst(daemon, 40)
        served = {e["worker"] for e in closed}
        self.assertEqual(served, {1, 2}, [e["worker"] for e in closed])
        ids = [e["conn_id"] for e in closed]
        self.assertEqual(len(set(ids)), 40, ids)
        self.assertTrue(all(e["conn_id"].startswith(f"{e['worker']}-") for e in closed), ids)
        metrics_port = daemon.wait_for_event(lambda e: e.get("event") == "metrics_listening")
        url = f"http://127.0.0.1:{metrics_port['port']}/metrics"
        clients = [self.tls_client(daemon) for _ in range(3)]
        deadline = time.monotonic() + WAIT
        while True:
            with urllib.request.urlopen(url, timeout=WAIT) as response:
                text = response.read().decode()
            samples = dict(
                line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")
            )
            active = float(samples["secure_echo_connections_active"])
            if active == len(clients) or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # workers report each second
        self.assertEqual(active, len(clients))
        closed_total = sum(
            float(value)
            for name, value in samples.items()
            if name.startswith("secure_echo_connections_total{")
        )
        self.assertEqual(closed_total, 40)
        self.assertEqual(float(samples["secure_echo_lines_received_total"]), 80)

    def test_info_reply_names_the_worker(self) -> None:
        """The info reply carries ``worker`` and the pool-wide connection id."""
        daemon = self.start_workers("--info-line", "INFO")
        since = daemon.mark()
        client = self.tls_client(daemon)
        client.write(b"INFO\n")
        client.pump(lambda: client.received.endswith(b"\n"))
        reply = json.loads(bytes(client.received))
        self.assertIn(reply["worker"], {1, 2})
        self.assertEqual(reply["conn_id"], f"{reply['worker']}-1")
        self.assertEqual(reply["peer"], client.peer)
        client.send_close_notify()
        client.read_to_end()
        record = daemon.wait_closed(since=since, peer=client.peer)
        self.assertEqual(
            (record["worker"], record["conn_id"]), (reply["worker"], reply["conn_id"])
        )

    def test_log_file_has_whole_lines_only(self) -> None:
        """Under concurrent load every line of the one log file is a whole JSON record."""
        daemon = self.start_workers()
        for _ in range(3):
            self.burst(daemon, 40)
        self.assertIn(daemon.stop(), {0, -signal.SIGTERM}, daemon.describe())
        data = daemon.log_path.read_bytes()
        self.assertTrue(data.endswith(b"\n"))
        records = [json.loads(text) for text in data.split(b"\n")[:-1]]
        self.assertTrue(all(isinstance(r, dict) and "event" in r for r in records))
        closed = [r for r in records if r["event"] == "connection_closed"]
        self.assertEqual(len(closed), 120)
        self.assertEqual({r["worker"] for r in closed}, {1, 2})
        self.assertFalse([r for r in records if r["event"] == "worker_stats"])
        self.assertFalse([r for r in records if r["level"] in {"error", "critical"}])
        # The supervisor's own records carry no worker field.
        listening = [r for r in records if r["event"] == "listening"]
        self.assertEqual(len(listening), 1)
        self.assertNotIn("worker", listening[0])

    def test_sighup_reaches_both_workers(self) -> None:
        """SIGHUP to the supervisor: each worker reloads and logs tls_reloaded."""
        daemon = self.start_workers()
        since = daemon.mark()
        daemon.process.send_signal(signal.SIGHUP)
        done = daemon.wait_for_event(
            lambda e: e.get("event") == "workers_reloaded", since=since, timeout=WAIT
        )
        self.assertEqual(done["reloaded"], [1, 2])
        reloaded = daemon.find_events(lambda e: e.get("event") == "tls_reloaded", since)
        self.assertEqual(sorted(e["worker"] for e in reloaded), [1, 2])
        self.assertTrue(all(e["trigger"] == "SIGHUP" for e in reloaded))
        self.burst(daemon, 8)

    def test_sigterm_drains_both_workers(self) -> None:
        """SIGTERM: open connections on both workers get their echo, then server_shutdown."""
        daemon = self.start_workers()
        pids = pids_of(daemon)
        since = daemon.mark()
        clients = []
        held: dict[int, set[int]] = {}
        for _ in range(40):
            client = self.tls_client(daemon)
            client.write(b"before shutdown\n")
            self.assertEqual(client.read_until(16), b"before shutdown\n")
            clients.append(client)
            held = {i: server_connections(pid, daemon.port) for i, pid in pids.items()}
            if all(held.values()):
                break
        self.assertTrue(all(held.values()), f"one worker holds every connection: {held}")
        started = time.monotonic()
        code = daemon.stop(timeout=3 + workers.STOP_GRACE + 5)
        elapsed = time.monotonic() - started
        self.assertIn(code, {0, -signal.SIGTERM}, daemon.describe())
        self.assertLess(elapsed, 3 + workers.STOP_GRACE)
        for client in clients:
            self.assertEqual(client.read_to_end(), b"before shutdown\n")
            self.assertTrue(client.close_notify)
        closed = daemon.find_events(lambda e: e.get("event") == "connection_closed", since)
        self.assertEqual(len(closed), len(clients))
        self.assertEqual({e["close_reason"] for e in closed}, {"server_shutdown"})
        self.assertEqual({e["worker"] for e in closed}, {1, 2})
        exited = daemon.find_events(lambda e: e.get("event") == "worker_exited", since)
        self.assertEqual(sorted((e["worker"], e["exit_code"]) for e in exited), [(1, 0), (2, 0)])
        self.assertTrue(all(e["expected"] for e in exited))

    def test_sigterm_to_every_process(self) -> None:
        """A control-group SIGTERM (systemd): each worker stops once, no errors; exit 0."""
        daemon = self.start_workers()
        since = daemon.mark()
        client = self.tls_client(daemon)
        client.write(b"still here\n")
        self.assertEqual(client.read_until(11), b"still here\n")
        for pid in [daemon.process.pid, *pids_of(daemon).values()]:
            os.kill(pid, signal.SIGTERM)
        self.assertIn(daemon.wait(), {0, -signal.SIGTERM}, daemon.describe())
        self.assertEqual(client.read_to_end(), b"still here\n")
        records = daemon.events()[since:]
        stopping = [r["worker"] for r in records if r["event"] == "worker_stopping"]
        self.assertEqual(sorted(stopping), [1, 2])
        self.assertFalse([r for r in records if r["level"] in {"error", "critical"}], records)
        exited = [r for r in records if r["event"] == "worker_exited"]
        self.assertEqual(sorted((r["worker"], r["exit_code"]) for r in exited), [(1, 0), (2, 0)])

    def test_killed_worker_is_restarted(self) -> None:
        """SIGKILL a worker: the other keeps serving; it is restarted and serves again."""
        daemon = self.start_workers()
        pids = pids_of(daemon)
        since = daemon.mark()
        os.kill(pids[1], signal.SIGKILL)
        exited = daemon.wait_for_event(
            lambda e: e.get("event") == "worker_exited", since=since, timeout=WAIT
        )
        self.assertEqual((exited["worker"], exited["signal"]), (1, signal.SIGKILL))
        self.assertFalse(exited["expected"])
        self.burst(daemon, 10)  # worker 2 alone, or worker 1 again: nothing is refused
        wait_ready(daemon, since, workers=(1,))
        new_pid = pids_of(daemon, since)[1]
        self.assertNotEqual(new_pid, pids[1])
        for _ in range(10):
            after = daemon.mark()
            if any(e["worker"] == 1 for e in self.burst(daemon, 20)):
                break
        else:
            self.fail("the restarted worker never accepted a connection")
        self.assertTrue(daemon.find_events(lambda e: e.get("worker") == 1, after))
        self.assertIsNone(daemon.process.poll())

    def test_unix_socket_kept_as_bound(self) -> None:
        """A UNIX listen keeps its mode through workers and restarts; gone after stop."""
        directory = Path(tempfile.mkdtemp(prefix="se-w-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        path = directory / "echo.sock"
        daemon = self.start_workers("--listen", f"unix:{path}:mode=0600")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        pids = pids_of(daemon)
        since = daemon.mark()
        os.kill(pids[2], signal.SIGTERM)  # an orderly exit of one worker
        wait_ready(daemon, since, workers=(2,))
        self.assertTrue(path.exists(), "a worker removed the supervisor's socket path")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        context = client_context(shared_pki().ca_cert)
        for i in range(6):
            with socket.socket(socket.AF_UNIX) as raw:
                raw.settimeout(WAIT)
                raw.connect(str(path))
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"unix %d\n" % i)
                    self.assertEqual(tls.recv(100), b"unix %d\n" % i)
        self.assertIn(daemon.stop(), {0, -signal.SIGTERM}, daemon.describe())
        self.assertFalse(path.exists())


class WorkersSystemdTests(SocketActivationCase):
    """Socket activation and sd_notify with ``--workers 2``: only the supervisor talks."""

    def start_workers(self) -> Daemon:
        """A socket-activated supervisor of two workers, started by a first client."""
        pki = self.pki
        daemon = self.start(
            "--cert", str(pki.server_cert), "--key", str(pki.server_key), "--workers", "2"
        )
        self.echo(daemon)
        return daemon

    def test_ready_reload_stopping(self) -> None:
        """READY=1 with the first worker, STATUS= with both; RELOADING/READY; STOPPING."""
        daemon = self.start_workers()
        ready = wait_for_message(self.listener, "READY=1")
        self.assertIn("STATUS=1/2 workers serving", self.listener.messages[ready].decode())
        self.listener.wait_for(
            lambda messages: any(
                a.startswith("STATUS=2/2 workers serving")
                for m in messages[ready:]
                for a in assignments(m)
            )
        )
        wait_ready(daemon)
        self.assertEqual(index_of(self.listener.messages, "READY=1", ready + 1), -1)
        # Workers never see systemd's variables.
        for pid in pids_of(daemon).values():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            names = {entry.partition(b"=")[0] for entry in environ}
            self.assertFalse(
                names & {b"NOTIFY_SOCKET", b"LISTEN_FDS", b"LISTEN_PID", b"LISTEN_FDNAMES"}
            )
        since = daemon.mark()
        start = len(self.listener.messages)
        daemon.process.send_signal(signal.SIGHUP)
        reloading = wait_for_message(self.listener, "RELOADING=1", start)
        wait_for_message(self.listener, "READY=1", reloading + 1)
        reloaded = daemon.find_events(lambda e: e.get("event") == "tls_reloaded", since)
        self.assertEqual(sorted(e["worker"] for e in reloaded), [1, 2])
        self.echo(daemon)
        daemon.terminate()
        wait_for_message(self.listener, "STOPPING=1")
        self.assertIn(daemon.wait(), {0, -signal.SIGTERM}, daemon.describe())
