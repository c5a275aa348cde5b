"""The pool's state as its workers report it, and the hung-worker watch, on simulated time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from secure_echo.pool.contract import WorkerState
from secure_echo.pool.health import PoolState
from secure_echo.pool.watchdog import START_ALLOWANCE, HungWatch

NOT_AFTER = "2030-01-01T00:00:00+00:00"
#: 2030-01-01T00:00:00Z as Unix time.
NOT_AFTER_TS = 1893456000.0


class PoolStateCase(SynchronousTestCase):
    """A pool of two workers on a clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.changes: list[int] = []
        self.state = PoolState(2, self.clock, deadline=10.0, on_change=self.changes.append)

    def listen(self) -> None:
        """The supervisor listens and starts; both workers are spawned."""
        self.state.listening = True
        self.state.began()
        self.state.addresses = ["127.0.0.1:8443"]
        self.state.certificate("CN=test", NOT_AFTER)
        self.state.started(1, 101)
        self.state.started(2, 102)

    def ready(self) -> tuple[bool, str]:
        """``/readyz`` now (the certificate is valid)."""
        return self.state.readiness(1_800_000_000.0)


class ReadinessTests(PoolStateCase):
    """Ready while one worker serves and the supervisor is not stopping."""

    def test_transitions(self) -> None:
        """Every state against readiness: starting, serving, draining, gone, stopping."""
        self.assertEqual(self.ready(), (False, "not listening yet"))
        self.listen()
        ok, reason = self.ready()
        self.assertFalse(ok)
        self.assertTrue(reason.startswith("no worker serving: 0/2 workers serving"), reason)
        self.state.reported(1, WorkerState.SERVING)
        self.assertEqual(self.ready(), (True, "ready: 1/2 workers serving"))
        self.state.reported(2, WorkerState.SERVING)
        self.assertEqual(self.ready(), (True, "ready: 2/2 workers serving"))
        # One worker drains: the pool stays ready (a drain never sticks).
        self.state.reported(1, WorkerState.DRAINING)
        self.assertEqual(self.ready(), (True, "ready: 1/2 workers serving"))
        self.assertEqual(self.state.ended(1), 0.0)
        self.state.started(1, 103)
        self.state.reported(1, WorkerState.SERVING)
        self.assertEqual(self.ready()[0], True)
        # Both gone: not ready, until one serves again.
        self.state.ended(1)
        self.state.ended(2)
        self.assertFalse(self.ready()[0])
        self.state.started(2, 104)
        self.state.reported(2, WorkerState.SERVING)
        self.assertTrue(self.ready()[0])
        self.state.stopping = True
        self.assertEqual(self.ready(), (False, "draining: the daemon is shutting down"))
        self.assertEqual(self.changes, [1, 2, 1, 2, 1, 0, 1])

    def test_repeated_reports_change_nothing(self) -> None:
        """Heartbeats restate the state: no change is announced for them."""
        self.listen()
        for _ in range(5):
            self.state.reported(1, WorkerState.SERVING, connections=3)
        self.assertEqual(self.changes, [1])
        self.assertEqual(self.state.connections(), 3)
        self.state.reported(2, WorkerState.SERVING, connections=4)
        self.assertEqual(self.state.connections(), 7)
        self.state.ended(1)
        self.assertEqual(self.state.connections(), 4)

    def test_expired_certificate(self) -> None:
        """Past the certificate's end the pool is not ready, whatever its workers say."""
        self.listen()
        self.state.reported(1, WorkerState.SERVING)
        ok, reason = self.state.readiness(NOT_AFTER_TS)
        self.assertFalse(ok)
        self.assertIn("expired at 2030-01-01T00:00:00+00:00", reason)

    def test_reports_of_unknown_workers(self) -> None:
        """A report from a slot with no process (already gone) changes nothing."""
        self.listen()
        self.state.ended(2)
        self.state.reported(2, WorkerState.SERVING)
        self.assertEqual(self.state.serving, 0)
        self.assertIsNone(self.state.ended(2))

    def test_status(self) -> None:
        """STATUS=: serving count, slots that cannot start, addresses, certificate."""
        self.listen()
        self.state.reported(1, WorkerState.SERVING)
        self.state.failed(2, "--cert: /x does not exist")
        self.assertEqual(
            self.state.status(),
            "1/2 workers serving; worker 2 cannot start: --cert: /x does not exist; "
            "listening on 127.0.0.1:8443; certificate CN=test valid until 2030-01-01",
        )
        self.state.reported(2, WorkerState.SERVING)
        self.assertNotIn("cannot start", self.state.status())

    def test_served_seconds(self) -> None:
        """A worker's time since it first served survives its drain; never serving is None."""
        self.listen()
        self.clock.advance(2)
        self.state.reported(1, WorkerState.SERVING)
        self.clock.advance(40)
        self.state.reported(1, WorkerState.DRAINING)
        self.clock.advance(3)
        self.assertEqual(self.state.ended(1), 43.0)
        self.assertIsNone(self.state.ended(2))


class HealthTests(PoolStateCase):
    """``/healthz``: some worker reported within the deadline."""

    def test_deadline(self) -> None:
        """From the start, then from the latest line of any worker."""
        self.assertEqual(self.state.health(), (False, "not listening yet"))
        self.listen()
        self.assertEqual(self.state.health(), (True, "ok"))
        self.clock.advance(9.9)
        self.assertTrue(self.state.health()[0])
        self.clock.advance(0.1)
        self.assertEqual(self.state.health(), (False, "no worker has reported for 10 s"))
        self.state.seen(2)
        self.assertEqual(self.state.health(), (True, "ok"))
        self.clock.advance(25)
        self.assertEqual(self.state.health(), (False, "no worker has reported for 25 s"))


@dataclass
class FakeProcess:
    """What the watch needs of a worker process."""

    pid: int


class FakePool:
    """What the watch needs of the process pool: the workers and a way to stop one."""

    def __init__(self) -> None:
        self.workers = {1: FakeProcess(101), 2: FakeProcess(102)}
        self.terminated: list[tuple[int, float]] = []

    def terminate(self, index: int, grace: float) -> None:
        """Record the request."""
        self.terminated.append((index, grace))


class HungWatchTests(PoolStateCase):
    """A worker whose heartbeats stop is stopped, once."""

    def setUp(self) -> None:
        super().setUp()
        self.listen()
        self.pool = FakePool()
        self.watch = HungWatch(self.clock, self.state, cast("Any", self.pool), 4.0, grace=3.0)
        self.logged = EventLoggingObserver.createWithCleanup(
            cast("TestCase", self), globalLogPublisher
        )
        self.watch.start()
        self.addCleanup(self.watch.stop)

    def beat(self, seconds: float, *workers: int) -> None:
        """Let ``seconds`` pass in steps of 0.5 s, ``workers`` sending heartbeats."""
        for _ in range(int(seconds * 2)):
            self.clock.advance(0.5)
            for index in workers:
                self.state.reported(index, WorkerState.SERVING)

    def test_heartbeat_loss(self) -> None:
        """Worker 2 falls silent: worker_hung after the timeout, then it is stopped."""
        self.beat(3, 1, 2)
        self.beat(3.5, 1)
        self.assertEqual(self.pool.terminated, [])
        self.beat(0.5, 1)
        self.assertEqual(self.pool.terminated, [(2, 3.0)])
        (hung,) = [e for e in self.logged if e.get("event") == "worker_hung"]
        self.assertEqual((hung["worker"], hung["pid"], hung["watchdog"]), (2, 102, 4.0))
        self.assertGreaterEqual(hung["silent_s"], 4.0)
        self.assertEqual(hung["state"], "serving")
        self.assertEqual(self.state.serving, 1)  # rule 7: a hung worker does not serve
        # Still silent (it has not died yet): reported once.
        self.beat(5, 1)
        self.assertEqual(self.pool.terminated, [(2, 3.0)])

    def test_a_draining_worker_that_beats_is_not_hung(self) -> None:
        """Heartbeats during a long drain keep a worker alive."""
        for _ in range(40):
            self.clock.advance(0.5)
            self.state.reported(1, WorkerState.DRAINING)
            self.state.reported(2, WorkerState.SERVING)
        self.assertEqual(self.pool.terminated, [])

    def test_silent_from_the_start(self) -> None:
        """A starting worker that never writes a line is hung after the start allowance."""
        self.beat(START_ALLOWANCE - 0.5, 1)
        self.assertEqual(self.pool.terminated, [])
        self.beat(0.5, 1)
        self.assertEqual([i for i, _ in self.pool.terminated], [2])
        (hung,) = [e for e in self.logged if e.get("event") == "worker_hung"]
        self.assertEqual(hung["state"], "starting")

    def test_silent_after_a_first_line(self) -> None:
        """Once a starting worker said anything, the watchdog's own timeout applies."""
        self.state.seen(2)
        self.beat(4, 1)
        self.assertEqual(self.pool.terminated, [])
        self.state.reported(2, WorkerState.SERVING)
        self.beat(4, 1)
        self.assertEqual([i for i, _ in self.pool.terminated], [2])

    def test_the_supervisor_stalled(self) -> None:
        """When the supervisor itself could not look for a long time, nobody is hung."""
        self.beat(1, 1, 2)
        self.clock.advance(60)  # one look, 60 s late
        self.assertEqual(self.pool.terminated, [])
        self.beat(3.5, 1, 2)
        self.assertEqual(self.pool.terminated, [])

    def test_off(self) -> None:
        """A timeout of 0 watches nothing."""
        watch = HungWatch(self.clock, self.state, cast("Any", self.pool), 0.0)
        watch.start()
        self.assertIsNone(watch._loop)
        watch.stop()
