"""Tests for :mod:`secure_echo.daemon.signals`: a second stop signal, and a stray SIGUSR1.

The in-process tests drive :class:`SignalService` with a recorded reactor, signal
table and exit; the real-daemon tests signal ``twistd secure-echo`` (one process,
and a supervisor of two workers) while a client that never reads keeps the drain
busy.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from secure_echo.daemon.signals import FORCED_EXIT_STATUS, SignalService
from secure_echo.pool.supervisor import WorkerSupervisor, kill_workers
from tests.daemon import Daemon, start_daemon, wait_workers_ready
from tests.hostile_clients import flood
from tests.test_integration import IntegrationCase, TLSClient, server_args, shared_pki
from tests.test_workers import ProcessReactor, end
from tests.tlspair import capture_events, named

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.daemon import Event

#: The drain timeout of the daemons here: far longer than any test waits.
LONG_DRAIN: Final = 60.0
#: Seconds a forced stop may take, from the second signal to the exit.
FORCED_WITHIN: Final = 5.0
#: Seconds to wait for an event.
WAIT: Final = 20.0


# -- in process ---------------------------------------------------------------------


class FakeReactor(Clock):
    """A clock that records ``callFromThread`` and runs ``callWhenRunning`` at once."""

    def __init__(self) -> None:
        super().__init__()
        self.thread_calls: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        self.thread_calls.append((f, args))

    def callWhenRunning(self, f: Callable[..., object], *args: object) -> None:
        f(*args)

    def run_thread_calls(self) -> None:
        calls, self.thread_calls = self.thread_calls, []
        for f, args in calls:
            f(*args)


class Exited(Exception):  # noqa: N818 - it stands for os._exit, not an error
    """Raised by the stand-in for ``os._exit``."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class SignalTable:
    """A stand-in for ``signal.signal``/``signal.getsignal``."""

    def __init__(self, **handlers: Any) -> None:
        self.handlers: dict[int, Any] = {
            signal.SIGTERM: signal.SIG_DFL,
            signal.SIGINT: signal.default_int_handler,
            signal.SIGUSR1: signal.SIG_DFL,
        }
        self.handlers.update({signal.Signals[name].value: h for name, h in handlers.items()})

    def install(self, number: int, handler: Any) -> Any:
        previous = self.handlers.get(number, signal.SIG_DFL)
        self.handlers[number] = handler
        return previous

    def current(self, number: int) -> Any:
        return self.handlers.get(number, signal.SIG_DFL)

    def deliver(self, number: int) -> None:
        handler = self.handlers[number]
        assert callable(handler), f"no handler for {number}"
        handler(number, None)


def fake_exit(status: int) -> None:
    """``os._exit`` for the tests: raise instead of ending the test process."""
    raise Exited(status)


class SignalServiceTests(SynchronousTestCase):
    """The service in memory: which signal does what, and what is logged."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.events = capture_events(self)
        self.twistd_calls: list[int] = []
        self.table = SignalTable(SIGTERM=self.twistd_handler, SIGINT=self.twistd_handler)
        self.cut_calls = 0

    def twistd_handler(self, number: int, _frame: object) -> None:
        self.twistd_calls.append(number)

    def cut(self) -> dict[str, object]:
        self.cut_calls += 1
        return {"connections": 3}

    def service(self, **kwargs: Any) -> SignalService:
        service = SignalService(
            self.reactor,
            cut=self.cut,
            install=self.table.install,
            current=self.table.current,
            exit=fake_exit,
            **kwargs,
        )
        service.startService()
        return service

    def test_first_stop_signal_goes_to_twistd(self) -> None:
        """The first SIGTERM reaches twistd's handler; nothing is forced or logged."""
        service = self.service()
        self.table.deliver(signal.SIGTERM)
        self.assertEqual(self.twistd_calls, [signal.SIGTERM])
        self.assertEqual(self.reactor.thread_calls, [])
        self.assertEqual(service.stopping, "SIGTERM")
        self.assertFalse(service.forcing)
        self.assertEqual(named(self.events, "shutdown_forced"), [])

    def test_second_stop_signal_forces(self) -> None:
        """A second stop signal: in the reactor, cut, shutdown_forced, exit status 1."""
        service = self.service()
        self.table.deliver(signal.SIGTERM)
        self.reactor.advance(2.5)
        self.table.deliver(signal.SIGINT)
        self.assertEqual(self.twistd_calls, [signal.SIGTERM])
        self.assertTrue(service.forcing)
        self.assertEqual(self.cut_calls, 0, "the signal handler itself only hops")
        exited = self.assertRaises(Exited, self.reactor.run_thread_calls)
        self.assertEqual(exited.status, FORCED_EXIT_STATUS)
        self.assertEqual(self.cut_calls, 1)
        (event,) = named(self.events, "shutdown_forced")
        self.assertEqual(event["signal"], "SIGINT")
        self.assertEqual(event["first"], "SIGTERM")
        self.assertEqual(event["stopping_s"], 2.5)
        self.assertEqual(event["connections"], 3)
        self.assertEqual(event["status"], FORCED_EXIT_STATUS)

    def test_stop_signal_after_the_services_stopped_forces(self) -> None:
        """Once the services stop (the drain), even the first signal forces."""
        service = self.service()
        service.stopService()
        self.table.deliver(signal.SIGTERM)
        self.assertEqual(self.twistd_calls, [])
        self.assertRaises(Exited, self.reactor.run_thread_calls)
        (event,) = named(self.events, "shutdown_forced")
        self.assertEqual((event["signal"], event["first"]), ("SIGTERM", "shutdown"))

    def test_exits_even_if_cutting_fails(self) -> None:
        """A failure while cutting what is left does not keep the process alive."""

        def broken() -> dict[str, object]:
            raise RuntimeError("cannot cut")

        service = SignalService(
            self.reactor,
            cut=broken,
            install=self.table.install,
            current=self.table.current,
            exit=fake_exit,
        )
        service.startService()
        service.stopService()
        self.assertRaises(Exited, service.force, "SIGTERM")

    def test_third_signal_exits_from_the_handler(self) -> None:
        """A signal while a forced stop still waits for the reactor exits at once."""
        self.service()
        self.table.deliver(signal.SIGTERM)
        self.table.deliver(signal.SIGTERM)
        exited = self.assertRaises(Exited, self.table.deliver, signal.SIGTERM)
        self.assertEqual(exited.status, FORCED_EXIT_STATUS)
        self.assertEqual(self.cut_calls, 0)

    def test_signals_without_a_handler_left_alone(self) -> None:
        """A stop signal at its default or ignored (a background job's SIGINT) stays so."""
        self.table = SignalTable(SIGINT=signal.SIG_IGN)
        service = self.service()
        self.assertEqual(self.table.current(signal.SIGTERM), signal.SIG_DFL)
        self.assertEqual(self.table.current(signal.SIGINT), signal.SIG_IGN)
        self.assertEqual(service.previous.keys(), {signal.SIGUSR1})

    def unstarted_reactor(self) -> list[Callable[..., object]]:
        """Make ``callWhenRunning`` wait, as before ``reactor.run()``; the waiting calls."""
        later: list[Callable[..., object]] = []
        self.reactor.callWhenRunning = lambda f, *_: later.append(f)  # type: ignore[method-assign]
        return later

    def test_stopped_before_running_takes_no_stop_signal(self) -> None:
        """A service stopped before the reactor ran leaves SIGTERM and SIGINT alone."""
        service = SignalService(
            self.reactor, install=self.table.install, current=self.table.current
        )
        later = self.unstarted_reactor()
        service.startService()
        service.stopService()
        later[0]()
        self.assertEqual(self.table.current(signal.SIGTERM), self.twistd_handler)

    def test_usr1_before_listening_stop_signals_once_running(self) -> None:
        """SIGUSR1 is taken before anything listens; the stop signals once the reactor runs.

        privilegedStartService runs before the listening service binds, so no SIGUSR1
        after the first ``listening`` record can be fatal; twistd installs its stop
        handlers only as the reactor starts, so ours wait for that.
        """
        service = SignalService(
            self.reactor, install=self.table.install, current=self.table.current
        )
        later = self.unstarted_reactor()
        service.privilegedStartService()
        self.assertTrue(callable(self.table.current(signal.SIGUSR1)))
        service.startService()
        self.assertEqual(self.table.current(signal.SIGTERM), self.twistd_handler)
        later[0]()
        self.assertNotEqual(self.table.current(signal.SIGTERM), self.twistd_handler)
        self.assertNotEqual(self.table.current(signal.SIGINT), self.twistd_handler)

    def test_usr1_ignored_quietly_once_stopped(self) -> None:
        """From the drain on, SIGUSR1 is ignored by the kernel: no record, never fatal."""
        service = self.service()
        service.stopService()
        self.assertEqual(self.table.current(signal.SIGUSR1), signal.SIG_IGN)
        # Stopping does not give the stop signals back: the drain is when they force.
        self.assertNotEqual(self.table.current(signal.SIGTERM), self.twistd_handler)

    def test_worker_keeps_its_stop_signals(self) -> None:
        """forced_stop False (a worker) leaves SIGTERM and SIGINT alone."""
        service = self.service(forced_stop=False)
        self.assertEqual(self.table.current(signal.SIGTERM), self.twistd_handler)
        self.assertEqual(self.table.current(signal.SIGINT), self.twistd_handler)
        self.assertNotIn(signal.SIGTERM, service.previous)

    def test_usr1_logged_and_ignored(self) -> None:
        """Without a SIGUSR1 handler, SIGUSR1 is logged (from the reactor) and ignored."""
        self.service()
        self.table.deliver(signal.SIGUSR1)
        self.assertEqual(named(self.events, "signal_ignored"), [])
        self.reactor.run_thread_calls()
        (event,) = named(self.events, "signal_ignored")
        self.assertEqual(event["signal"], "SIGUSR1")
        self.assertEqual(event["pid"], os.getpid())

    def test_usr1_replaces_ignore_too(self) -> None:
        """An inherited SIG_IGN is replaced too, so the signal is at least logged."""
        self.table = SignalTable(SIGUSR1=signal.SIG_IGN)
        self.service()
        self.assertTrue(callable(self.table.current(signal.SIGUSR1)))

    def test_usr1_handler_kept(self) -> None:
        """A SIGUSR1 handler already there (a log file to reopen) is left in place."""

        def reopen(_number: int, _frame: object) -> None:
            """Stands for the log service's handler."""

        self.table = SignalTable(SIGUSR1=reopen)
        self.service()
        self.assertIs(self.table.current(signal.SIGUSR1), reopen)

    def test_usr1_not_asked(self) -> None:
        """ignore_usr1 False leaves SIGUSR1 alone."""
        self.service(ignore_usr1=False)
        self.assertEqual(self.table.current(signal.SIGUSR1), signal.SIG_DFL)


class KillWorkersTests(SynchronousTestCase):
    """The supervisor's part of a forced stop."""

    def test_running_workers_killed(self) -> None:
        """Every worker still running gets SIGKILL; one that exited is left out."""
        reactor = ProcessReactor()
        supervisor = WorkerSupervisor(
            reactor, 3, {}, executable="/usr/bin/python3", handle_sighup=False
        )
        supervisor.startService()
        first, second, third = (spawned[0] for spawned in reactor.spawned)
        end(second)
        third.transport = None  # gone without a word: no signal can reach it
        self.assertEqual(kill_workers(supervisor), {"workers_killed": [first.pid]})
        self.assertEqual(first.transport.signals, ["KILL"])  # type: ignore[union-attr]


# -- the real daemon ----------------------------------------------------------------


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaped counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in {"Z", "X"}


def wait_gone(pids: list[int], timeout: float = FORCED_WITHIN) -> list[int]:
    """Wait until every process in ``pids`` ended; return those still there."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if not gone(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


class RealSignalsCase(IntegrationCase):
    """Daemons signalled for real."""

    def setUp(self) -> None:
        if not Path("/proc/self/stat").is_file():
            raise SkipTest("needs Linux /proc")

    def daemon(self, *extra: str, log_to_stdout: bool = False) -> Daemon:
        """A daemon of this test with the test certificate and ``extra``."""
        return start_daemon(
            self,
            Path(self.mktemp()),
            server_args(shared_pki(), "--drain-timeout", f"{LONG_DRAIN:g}", *extra),
            log_to_stdout=log_to_stdout,
        )

    def stubborn_client(self, daemon: Daemon) -> TLSClient:
        """A client that pipelined lines and reads none of the replies: it holds the drain."""
        client = self.tls_client(daemon)
        batch = b"".join(b"never read %06d %s\n" % (i, b"." * 60) for i in range(500))
        result = flood(client, batch, 0.5)
        self.assertEqual(result.ended_by, "duration")
        return client

    def force(self, daemon: Daemon, first: int, second: int) -> tuple[Event, float]:
        """Stop with ``first``, wait for the drain, send ``second``; the record and time."""
        since = daemon.mark()
        daemon.process.send_signal(first)
        daemon.wait_for_event(lambda e: e.get("event") == "drain_started", since=since)
        time.sleep(0.2)  # the drain is under way, and stays so: the client never reads
        self.assertIsNone(daemon.process.poll(), daemon.describe())
        started = time.monotonic()
        daemon.process.send_signal(second)
        code = daemon.wait(timeout=FORCED_WITHIN + 5)
        elapsed = time.monotonic() - started
        self.assertEqual(code, FORCED_EXIT_STATUS, daemon.describe())
        self.assertLess(elapsed, FORCED_WITHIN, daemon.describe())
        (event,) = daemon.find_events(lambda e: e.get("event") == "shutdown_forced", since)
        self.assertEqual(event["signal"], signal.Signals(second).name)
        self.assertEqual(event["level"], "warn")
        self.assert_no_traceback(daemon)
        return event, elapsed

    def assert_no_traceback(self, daemon: Daemon) -> None:
        """Nothing on stderr or stdout is a traceback, and no record carries one."""
        for text in (daemon.stderr(), daemon.stdout()):
            self.assertNotIn("Traceback", text)
            self.assertNotIn("Unhandled", text)
        broken = [e for e in daemon.events() if "traceback" in e or "log_failure" in e]
        self.assertEqual(broken, [], daemon.describe())


class ForcedStopTests(RealSignalsCase):
    """A second SIGTERM or SIGINT during the drain ends the process at once."""

    def test_second_sigterm_single_process(self) -> None:
        """One process: SIGTERM, drain held by a non-reader, SIGTERM: exit 1 at once."""
        daemon = self.daemon()
        self.stubborn_client(daemon)
        event, _ = self.force(daemon, signal.SIGTERM, signal.SIGTERM)
        self.assertEqual(event["first"], "SIGTERM")
        self.assertEqual(event["connections"], 1)
        self.assertGreater(event["stopping_s"], 0)

    def test_second_sigint_single_process(self) -> None:
        """One process: a second Ctrl-C (SIGINT) during the drain ends it the same way."""
        daemon = self.daemon()
        self.stubborn_client(daemon)
        event, _ = self.force(daemon, signal.SIGINT, signal.SIGINT)
        self.assertEqual(event["first"], "SIGINT")

    def test_second_sigterm_supervisor(self) -> None:
        """--workers 2: the supervisor kills its draining workers and exits 1 at once."""
        daemon = self.daemon("--workers", "2")
        wait_workers_ready(daemon)
        pids = [e["pid"] for e in daemon.find_events(lambda e: e["event"] == "worker_started")]
        self.assertEqual(len(pids), 2)
        self.stubborn_client(daemon)
        event, _ = self.force(daemon, signal.SIGTERM, signal.SIGTERM)
        # The worker holding the non-reader was still draining; an idle one may
        # have finished its drain and exited already.
        self.assertTrue(event["workers_killed"], event)
        self.assertLessEqual(set(event["workers_killed"]), set(pids))
        self.assertEqual(wait_gone(pids), [], "a worker outlived its supervisor")


class Usr1Tests(RealSignalsCase):
    """SIGUSR1 without --log-file is logged and ignored, never fatal."""

    def assert_ignored(self, daemon: Daemon, pid: int, worker: int | None = None) -> None:
        since = daemon.mark()
        os.kill(pid, signal.SIGUSR1)
        event = daemon.wait_for_event(
            lambda e: e.get("event") == "signal_ignored" and e.get("pid") == pid,
            since=since,
            timeout=WAIT,
        )
        self.assertEqual(event["signal"], "SIGUSR1")
        self.assertEqual(event.get("worker"), worker)

    def test_single_process(self) -> None:
        """One process with --log-stdout json and no --log-file survives SIGUSR1 and echoes."""
        daemon = self.daemon(log_to_stdout=True)
        self.assert_ignored(daemon, daemon.process.pid)
        client = self.tls_client(daemon)
        client.write(b"alive\n")
        self.assertEqual(client.read_until(6), b"alive\n")
        self.assertIsNone(daemon.process.poll())
        self.assertIn(daemon.stop(), {0, -signal.SIGTERM}, daemon.describe())
        self.assert_no_traceback(daemon)

    def test_supervisor_and_worker(self) -> None:
        """--workers 2 without --log-file: the supervisor and a worker survive SIGUSR1."""
        daemon = self.daemon("--workers", "2", log_to_stdout=True)
        wait_workers_ready(daemon)
        workers = {
            e["worker"]: e["pid"]
            for e in daemon.find_events(lambda e: e["event"] == "worker_started")
        }
        since = daemon.mark()
        self.assert_ignored(daemon, daemon.process.pid)
        self.assert_ignored(daemon, workers[1], worker=1)
        client = self.tls_client(daemon)
        client.write(b"alive\n")
        self.assertEqual(client.read_until(6), b"alive\n")
        exited = daemon.find_events(lambda e: e.get("event") == "worker_exited", since)
        self.assertEqual(exited, [])
        self.assertIsNone(daemon.process.poll())
        self.assertIn(daemon.stop(), {0, -signal.SIGTERM}, daemon.describe())
        self.assert_no_traceback(daemon)
