"""The reload coordinator: one SIGHUP, one reload round over the serving workers."""

from __future__ import annotations

from typing import cast

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from secure_echo.daemon.sdnotify import Notifier
from secure_echo.pool.reload import RELOAD_TIMEOUT, ReloadCoordinator, ReloadOutcome, ReloadRound
from tests.test_sdnotify import NotifyListener, assignments


class ReloadRoundTests(SynchronousTestCase):
    """Waiting for every worker's reload outcome."""

    def test_all_answer(self) -> None:
        """Done once every worker answered; duplicates and strangers are ignored."""
        clock = Clock()
        done: list[ReloadOutcome] = []
        reload = ReloadRound([1, 2, 3], clock, 10.0, done.append)
        reload.record(1, ok=True)
        reload.record(1, ok=False)
        reload.record(9, ok=True)
        reload.forget(3)
        self.assertEqual(done, [])
        reload.record(2, ok=False)
        self.assertEqual(done, [ReloadOutcome(reloaded=[1], failed=[2], missing=[3])])
        clock.advance(20)
        self.assertEqual(len(done), 1)
        self.assertFalse(clock.getDelayedCalls())

    def test_timeout(self) -> None:
        """Workers silent for the timeout are missing; done is called once."""
        clock = Clock()
        done: list[ReloadOutcome] = []
        reload = ReloadRound([1, 2], clock, 10.0, done.append)
        reload.record(2, ok=True)
        clock.advance(10)
        self.assertEqual(done, [ReloadOutcome(reloaded=[2], missing=[1])])
        reload.record(1, ok=True)
        self.assertEqual(len(done), 1)

    def test_empty_and_cancelled(self) -> None:
        """No worker: done at check(); a cancelled round never calls done."""
        clock = Clock()
        done: list[ReloadOutcome] = []
        ReloadRound([], clock, 10.0, done.append).check()
        self.assertEqual(done, [ReloadOutcome()])
        cancelled = ReloadRound([1], clock, 10.0, done.append)
        cancelled.cancel()
        clock.advance(20)
        self.assertEqual(len(done), 1)
        self.assertTrue(cancelled.finished)


class CoordinatorTests(SynchronousTestCase):
    """SIGHUP forwarded, outcomes collected, systemd told."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.listener = NotifyListener()
        self.addCleanup(self.listener.close)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": self.listener.value})
        assert notifier is not None
        self.addCleanup(notifier.close)
        self.sent: list[tuple[int, str]] = []
        self.gone: set[int] = set()
        self.coordinator = ReloadCoordinator(
            self.clock,
            targets=lambda: [2, 1],
            send=self.send,
            status=lambda: "2/2 workers serving",
            notifier=notifier,
        )
        self.logged = EventLoggingObserver.createWithCleanup(
            cast("TestCase", self), globalLogPublisher
        )

    def send(self, worker: int, name: str) -> bool:
        """Record a signal; False for a worker that is gone."""
        self.sent.append((worker, name))
        return worker not in self.gone

    def notifications(self) -> list[str]:
        """Every assignment received so far."""
        self.listener.drain()
        return [a for m in self.listener.messages for a in assignments(m)]

    def test_round(self) -> None:
        """RELOADING=1, SIGHUP to each target, READY=1 with the failures named."""
        self.coordinator.reload()
        self.assertEqual(self.sent, [(1, "HUP"), (2, "HUP")])
        self.assertIn("RELOADING=1", self.notifications())
        self.coordinator.record(1, {"event": "tls_reloaded", "trigger": "SIGHUP"})
        self.coordinator.record(2, {"event": "tls_reloaded", "trigger": "file-change"})
        self.assertNotIn("READY=1", self.notifications())
        self.coordinator.record(2, {"event": "tls_reload_failed", "trigger": "SIGHUP"})
        self.assertIn("READY=1", self.notifications())
        self.assertIn(
            "STATUS=TLS reload failed in workers 2 (previous certificate kept); "
            "2/2 workers serving",
            self.notifications(),
        )
        (done,) = [e for e in self.logged if e.get("event") == "workers_reloaded"]
        self.assertEqual((done["reloaded"], done["failed"], done["missing"]), ([1], [2], []))
        self.assertEqual(done["log_level"], LogLevel.warn)
        self.assertIsNone(self.coordinator.round)

    def test_gone_and_silent_workers(self) -> None:
        """A worker that cannot be signalled or exits is missing; so is a silent one."""
        self.gone.add(2)
        self.coordinator.reload()
        self.clock.advance(RELOAD_TIMEOUT)
        (done,) = [e for e in self.logged if e.get("event") == "workers_reloaded"]
        self.assertEqual(done["missing"], [1, 2])
        self.assertEqual(self.notifications().count("READY=1"), 1)

    def test_superseded_and_cancelled(self) -> None:
        """A second SIGHUP replaces the round; a cancelled one sends no READY=1."""
        self.coordinator.reload()
        first = self.coordinator.round
        self.coordinator.reload()
        assert first is not None
        self.assertTrue(first.finished)
        self.coordinator.forget(1)
        self.coordinator.cancel()
        self.clock.advance(RELOAD_TIMEOUT)
        self.assertEqual(self.notifications().count("READY=1"), 0)
        self.assertEqual([e for e in self.logged if e.get("event") == "workers_reloaded"], [])
