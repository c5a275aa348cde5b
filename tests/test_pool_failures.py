"""Real workers that die, hang and crash-loop: what ``/readyz``, systemd and the log say.

Each test runs ``twistd -n secure-echo --workers 2`` with ``--metrics`` and a
``NOTIFY_SOCKET`` listener (the one of :mod:`tests.test_sdnotify`), then hurts a worker
the way production does: SIGKILL (the OOM killer), SIGSTOP (a hung worker: the
watchdog must see it), or a certificate that vanished so no worker can start (the
pool must give up and exit non-zero).  A thread probes ``/readyz`` every 50 ms
throughout, so the tests see every answer the pool gave, not only the last one.

Each test prints what it observed (the readiness and STATUS= sequences) to stderr.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from twisted.trial.unittest import SkipTest

from secure_echo.pool.restarts import GIVE_UP_EXIT_STATUS
from tests.daemon import Daemon, Event, start_daemon
from tests.helpers import make_pki
from tests.test_integration import IntegrationCase, server_args, shared_pki
from tests.test_metrics import http_get
from tests.test_sdnotify import NotifyListener, assignments
from tests.test_workers import echo_burst, pids_of, wait_ready

if TYPE_CHECKING:
    from collections.abc import Sequence

#: Seconds any wait may take.
WAIT: Final = 20.0


class ReadyzProbe:
    """Polls ``/readyz`` from a thread; keeps each change of the answer, in order."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body = http_get(self.port, "/readyz")
            answer = (status, body.decode("utf-8", "replace").strip())
            if status and (not self.answers or self.answers[-1] != answer):
                self.answers.append(answer)
            self._stop.wait(0.05)

    def wait_for(self, answer: tuple[int, str], timeout: float = WAIT) -> None:
        """Wait until the latest answer is ``answer``."""
        deadline = time.monotonic() + timeout
        while not self.answers or self.answers[-1] != answer:
            if time.monotonic() > deadline:
                msg = f"/readyz never answered {answer}: {self.answers}"
                raise AssertionError(msg)
            time.sleep(0.05)

    def stop(self) -> list[tuple[int, str]]:
        """Stop probing; the answers seen."""
        self._stop.set()
        self._thread.join(5.0)
        return self.answers


def status_lines(listener: NotifyListener) -> list[str]:
    """Every STATUS= text received so far, in order."""
    listener.drain()
    return [a[7:] for m in listener.messages for a in assignments(m) if a.startswith("STATUS=")]


def serving_counts(lines: Sequence[str]) -> list[str]:
    """The ``N/M workers serving`` part of each status line (consecutive repeats merged)."""
    counts: list[str] = []
    for line in lines:
        head = line.split(";")[0]
        if not counts or counts[-1] != head:
            counts.append(head)
    return counts


class PoolFailureCase(IntegrationCase):
    """A pool of two workers with metrics and a systemd listener."""

    def start_pool(self, *extra: str, cert_dir: Path | None = None) -> Daemon:
        """Two workers serving; ``self.listener`` gets systemd's messages."""
        if not Path("/proc/self/fd").is_dir():
            raise SkipTest("needs Linux /proc")
        self.listener = NotifyListener()
        self.addCleanup(self.listener.close)
        pki = make_pki(cert_dir) if cert_dir is not None else shared_pki()
        args = server_args(
            pki,
            "--workers",
            "2",
            "--drain-timeout",
            "3",
            "--metrics",
            "tcp:0:interface=127.0.0.1",
            *extra,
        )
        daemon = start_daemon(
            self, Path(self.mktemp()), args, env={"NOTIFY_SOCKET": self.listener.value}
        )
        wait_ready(daemon)
        self.metrics_port = int(
            daemon.wait_for_event(lambda e: e.get("event") == "metrics_listening")["port"]
        )
        self.wait_status(daemon, "2/2 workers serving")
        return daemon

    def wait_status(self, daemon: Daemon, head: str, since: int = 0) -> None:
        """Wait for a STATUS= line that starts with ``head`` (after ``since`` lines)."""
        deadline = time.monotonic() + WAIT
        while not any(s.startswith(head) for s in status_lines(self.listener)[since:]):
            if time.monotonic() > deadline:
                seen = status_lines(self.listener)
                self.fail(f"no STATUS={head}...: {seen}\n{daemon.describe()}")
            time.sleep(0.05)

    def records(self, daemon: Daemon, since: int, *names: str) -> list[Event]:
        """The records called one of ``names`` after ``since``."""
        return daemon.find_events(lambda e: e.get("event") in names, since)


class KilledWorkerTests(PoolFailureCase):
    """SIGKILL: the pool stays ready on the other worker; the slot is refilled."""

    def test_kill(self) -> None:
        """/readyz stays 200 (2/2, 1/2, 2/2); STATUS= follows; the records tell the story."""
        daemon = self.start_pool()
        pids = pids_of(daemon)
        since = daemon.mark()
        statuses_before = len(status_lines(self.listener))
        probe = ReadyzProbe(self.metrics_port)
        self.addCleanup(probe.stop)
        time.sleep(0.2)
        os.kill(pids[1], signal.SIGKILL)
        # Served by worker 2 meanwhile: nothing is refused.
        echo_burst(daemon.port, shared_pki().ca_cert, 10)
        wait_ready(daemon, since, workers=(1,))
        self.wait_status(daemon, "2/2 workers serving", statuses_before)
        probe.wait_for((200, "ready: 2/2 workers serving"))
        answers = probe.stop()
        self.assertEqual({status for status, _ in answers}, {200}, answers)
        bodies = [body for _, body in answers]
        self.assertEqual(bodies[0], "ready: 2/2 workers serving")
        self.assertIn("ready: 1/2 workers serving", bodies)
        self.assertEqual(bodies[-1], "ready: 2/2 workers serving")
        counts = serving_counts(status_lines(self.listener)[statuses_before:])
        self.assertEqual(counts[0], "1/2 workers serving")
        self.assertEqual(counts[-1], "2/2 workers serving")
        events = self.records(
            daemon, since, "worker_exited", "workers_serving", "worker_started", "worker_ready"
        )
        story = [(e["event"], e.get("worker"), e.get("serving")) for e in events]
        self.assertEqual(
            story,
            [
                ("worker_exited", 1, None),
                ("workers_serving", None, 1),
                ("worker_started", 1, None),
                ("worker_ready", 1, None),
                ("workers_serving", None, 2),
            ],
        )
        exited = events[0]
        self.assertEqual((exited["signal"], exited["restart_in"]), (signal.SIGKILL, 0.1))
        self.assertFalse(exited["expected"])
        self.assertNotEqual(pids_of(daemon, since)[1], pids[1])
        # The restarted worker counts its connections from 1 again: its ids name
        # its start in the slot, and no id repeats across the pool.
        restarted = daemon.mark()
        echo_burst(daemon.port, shared_pki().ca_cert, 30)
        daemon.wait_for_events(
            lambda e: e.get("event") == "connection_closed", 30, since=restarted, timeout=WAIT
        )
        closed = self.records(daemon, 0, "connection_closed")
        ids = [e["conn_id"] for e in closed]
        self.assertEqual(len(ids), len(set(ids)), ids)
        for record in self.records(daemon, restarted, "connection_closed"):
            expected = "1.2-" if record["worker"] == 1 else "2-"
            self.assertTrue(record["conn_id"].startswith(expected), record)
        print(f"\nkill: /readyz {bodies}; STATUS= {counts}", file=sys.stderr)


class StoppedWorkerTests(PoolFailureCase):
    """SIGSTOP: the watchdog finds the silent worker and replaces it."""

    def test_sigstop(self) -> None:
        """worker_hung after --worker-watchdog, SIGKILL after the grace, a new worker serves."""
        daemon = self.start_pool("--worker-watchdog", "2")
        pids = pids_of(daemon)
        since = daemon.mark()
        statuses_before = len(status_lines(self.listener))
        probe = ReadyzProbe(self.metrics_port)
        self.addCleanup(probe.stop)
        time.sleep(0.2)
        stopped_at = time.monotonic()
        os.kill(pids[2], signal.SIGSTOP)
        self.addCleanup(self._continue, pids[2])
        hung = daemon.wait_for_event(
            lambda e: e.get("event") == "worker_hung", since=since, timeout=WAIT
        )
        found_after = time.monotonic() - stopped_at
        self.assertEqual((hung["worker"], hung["pid"]), (2, pids[2]))
        # Silent for the watchdog's 2 s, counted from its last heartbeat (which came
        # up to a second before the SIGSTOP); found within a look or two of that.
        self.assertGreaterEqual(hung["silent_s"], 2.0)
        self.assertLess(found_after, 5.0)
        killed = daemon.wait_for_event(
            lambda e: e.get("event") == "worker_killed", since=since, timeout=WAIT
        )
        self.assertEqual(killed["pid"], pids[2])
        wait_ready(daemon, since, workers=(2,))
        self.wait_status(daemon, "2/2 workers serving", statuses_before)
        echo_burst(daemon.port, shared_pki().ca_cert, 10)
        probe.wait_for((200, "ready: 2/2 workers serving"))
        answers = probe.stop()
        bodies = [body for _, body in answers]
        self.assertEqual({status for status, _ in answers}, {200}, answers)
        self.assertIn("ready: 1/2 workers serving", bodies)
        self.assertEqual(bodies[-1], "ready: 2/2 workers serving")
        exited = self.records(daemon, since, "worker_exited")
        self.assertEqual([(e["worker"], e["signal"]) for e in exited], [(2, signal.SIGKILL)])
        counts = serving_counts(status_lines(self.listener)[statuses_before:])
        self.assertEqual(counts, ["1/2 workers serving", "2/2 workers serving"])
        replaced = time.monotonic() - stopped_at
        print(
            f"\nSIGSTOP: worker_hung after {found_after:.1f} s (silent {hung['silent_s']} s), "
            f"replaced and serving after {replaced:.1f} s; /readyz {bodies}; STATUS= {counts}",
            file=sys.stderr,
        )

    @staticmethod
    def _continue(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


class CrashLoopTests(PoolFailureCase):
    """No worker can start: the pool says so, then gives up with status 3."""

    def test_crash_loop_gives_up(self) -> None:
        """Certificate gone, workers killed: 503, STATUS= names why, pool_gave_up, exit 3."""
        certs = Path(self.mktemp()).absolute()
        daemon = self.start_pool(cert_dir=certs)
        pids = pids_of(daemon)
        since = daemon.mark()
        statuses_before = len(status_lines(self.listener))
        probe = ReadyzProbe(self.metrics_port)
        self.addCleanup(probe.stop)
        time.sleep(0.2)
        shutil.rmtree(certs)
        started = time.monotonic()
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        code = daemon.wait(timeout=60)
        gave_up_after = time.monotonic() - started
        answers = probe.stop()
        self.assertEqual(code, GIVE_UP_EXIT_STATUS, daemon.describe())
        (gave_up,) = self.records(daemon, since, "pool_gave_up")
        self.assertEqual(gave_up["count"], 5)
        self.assertEqual(gave_up["status"], GIVE_UP_EXIT_STATUS)
        errors = {f["error"] for f in gave_up["failures"] if f["error"]}
        self.assertTrue(errors)
        self.assertTrue(all("does not exist" in e for e in errors), errors)
        failed = self.records(daemon, since, "worker_failed")
        self.assertGreaterEqual(len(failed), 3)
        exited = self.records(daemon, since, "worker_exited")
        self.assertTrue(any(e["exit_code"] == 2 and e["error"] for e in exited), exited)
        bodies = [body for _, body in answers]
        self.assertEqual(answers[0], (200, "ready: 2/2 workers serving"))
        not_ready = [body for status, body in answers if status == 503]
        self.assertTrue(
            any(b.startswith("no worker serving: 0/2 workers serving") for b in not_ready),
            answers,
        )
        lines = status_lines(self.listener)[statuses_before:]
        self.assertTrue(any("cannot start: --cert" in line for line in lines), lines)
        self.assertTrue(lines[-1].startswith("gave up after 5 worker failures"), lines)
        self.listener.drain()
        self.assertIn(b"STOPPING=1", self.listener.messages[-1])
        print(
            f"\ncrash loop: gave up after {gave_up_after:.1f} s with status {code}; "
            f"/readyz {bodies}; last STATUS= {lines[-1]!r}",
            file=sys.stderr,
        )
