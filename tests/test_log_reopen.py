"""SIGUSR1 reopens the JSON log file, for external rotation (logrotate)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.daemon.logs import JSONLogService


class ImmediateReactor:
    """Runs callFromThread calls at once and records them."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callFromThread(self, function: Any, *args: Any) -> None:
        self.calls.append(function)
        function(*args)


class ReopenTests(SynchronousTestCase):
    """Reopening after a rename writes to a fresh file at the configured path."""

    def setUp(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        self.path = directory / "log.jsonl"
        self.publisher = LogPublisher()
        self.reactor = ImmediateReactor()
        self.service = JSONLogService(
            self.path, 1 << 20, 3, publisher=self.publisher, reactor=self.reactor
        )
        self.previous = signal.getsignal(signal.SIGUSR1)
        self.service.startService()
        self.addCleanup(self.stop)
        self.log = Logger(observer=self.publisher)

    def stop(self) -> None:
        if self.service.running:
            self.service.stopService()

    def events(self, path: Path) -> list[str]:
        return [json.loads(line)["event"] for line in path.read_text().splitlines()]

    def test_sigusr1_reopens(self) -> None:
        """After logrotate renames the file, SIGUSR1 makes new records go to a new file."""
        self.log.info("one", event="first")
        rotated = self.path.with_name("log.jsonl.1")
        self.path.rename(rotated)
        os.kill(os.getpid(), signal.SIGUSR1)
        self.log.info("two", event="second")
        self.assertEqual(self.events(rotated), ["first"])
        self.assertEqual(self.events(self.path), ["log_reopened", "second"])
        self.assertEqual(len(self.reactor.calls), 1)

    def test_handler_restored(self) -> None:
        """Stopping the service puts the previous SIGUSR1 handler back."""

        def previous(_number: int, _frame: object) -> None:
            """Stands for twistd's handler (its --logfile rotation)."""

        self.service.stopService()
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, previous)
        self.service.startService()
        self.assertIsNot(signal.getsignal(signal.SIGUSR1), previous)
        self.service.stopService()
        self.assertIs(signal.getsignal(signal.SIGUSR1), previous)

    def test_handler_installed_before_listening(self) -> None:
        """The privileged start (before anything listens) already takes SIGUSR1."""
        self.service.stopService()
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.service.privilegedStartService()
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))

    def test_default_action_not_restored(self) -> None:
        """With no handler before, a stopped service leaves SIGUSR1 ignored, not fatal.

        The log service stops last, after the drain; a logrotate SIGUSR1 between then
        and the exit must not end the process by the signal's default action.
        """
        self.service.stopService()
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.service.startService()
        self.service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_IGN)


class ReopenFailureTests(SynchronousTestCase):
    """A reopen that fails keeps the log going to the old file."""

    def test_unopenable_path_keeps_old_file(self) -> None:
        """If the path cannot be opened again, records still reach the old file."""
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        path = directory / "log.jsonl"
        publisher = LogPublisher()
        service = JSONLogService(path, 1 << 20, 3, publisher=publisher, reactor=None)
        service.startService()
        self.addCleanup(service.stopService)
        log = Logger(observer=publisher)
        moved = directory / "moved.jsonl"
        path.rename(moved)
        path.mkdir()  # the path is now a directory: opening it as a file fails
        service.reopen()
        log.info("after", event="after")
        events = [json.loads(line)["event"] for line in moved.read_text().splitlines()]
        self.assertEqual(events[-2:], ["log_reopen_failed", "after"])


class WriteFailureTests(SynchronousTestCase):
    """A write error never disables the observer."""

    def test_write_error_reported_once(self) -> None:
        """An OSError from the stream is reported once on stderr; later records go on."""
        from io import StringIO  # noqa: PLC0415

        from secure_echo.daemon.logs import JSONLinesObserver  # noqa: PLC0415

        class Flaky(StringIO):
            fail = True

            def write(self, text: str) -> int:
                if self.fail:
                    raise OSError(28, "No space left on device")
                return super().write(text)

        stream = Flaky()
        stderr = StringIO()
        self.patch(sys, "__stderr__", stderr)
        observer = JSONLinesObserver(stream)
        log = Logger(observer=observer)
        log.info("one", event="one")
        log.info("two", event="two")
        stream.fail = False
        log.info("three", event="three")
        self.assertEqual(stderr.getvalue().count("\n"), 1)
        self.assertIn("No space left", stderr.getvalue())
        self.assertEqual(json.loads(stream.getvalue())["event"], "three")
