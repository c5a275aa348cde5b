"""A worker's record pipe: never blocking, bounded, whole lines, drops reported.

The unit tests use real pipes (made small with ``F_SETPIPE_SZ``) and a reactor
double that records ``addWriter``; the process test starts a worker whose record
pipe nobody reads and checks that it still echoes at full speed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Final

from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.daemon import options as config
from secure_echo.pool.contract import SPEC_ENV, SharedSocket, WorkerSpec
from secure_echo.pool.logpipe import LogPipe, PipeLogObserver
from secure_echo.pool.supervisor import worker_values
from tests.daemon import child_env
from tests.helpers import make_pki
from tests.test_integration import client_context

#: The smallest pipe Linux makes (one page).
PIPE_SIZE: Final = 4096
#: Seconds any wait on the worker process may take.
WAIT: Final = 15.0


def small_pipe(case: SynchronousTestCase) -> tuple[int, int]:
    """A pipe holding at most :data:`PIPE_SIZE` bytes; both ends closed at cleanup."""
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    for fd in (read_fd, write_fd):
        case.addCleanup(_close_quietly, fd)
    return read_fd, write_fd


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def read_available(fd: int) -> bytes:
    """Everything the pipe holds now."""
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


class FakeReactor:
    """Records the writers the pipe asks the reactor to watch."""

    def __init__(self) -> None:
        self.writers: list[Any] = []
        self.from_thread: list[Any] = []

    def addWriter(self, writer: Any) -> None:
        """Watch ``writer``."""
        self.writers.append(writer)

    def removeWriter(self, writer: Any) -> None:
        """Stop watching ``writer``."""
        self.writers.remove(writer)

    def callFromThread(self, function: Any, *args: Any) -> None:
        """Keep the call for the test to run."""
        self.from_thread.append((function, args))


def event(n: int, size: int = 200) -> dict[str, Any]:
    """A log event with a ``size``-byte field."""
    return {
        "event": "x",
        "log_format": "record {n}",
        "n": n,
        "pad": "p" * size,
        "log_level": LogLevel.info,
        "log_time": 0.0,
    }


class LogPipeTests(SynchronousTestCase):
    """Writing records to a pipe that may be full."""

    def setUp(self) -> None:
        self.read_fd, self.write_fd = small_pipe(self)
        self.observer = PipeLogObserver(self.write_fd, limit=2048)
        self.reactor = FakeReactor()
        self.observer.pipe.attach(self.reactor)

    def records(self) -> list[dict[str, Any]]:
        """The records in the pipe now; each line must be one whole JSON object."""
        data = read_available(self.read_fd)
        self.assertTrue(not data or data.endswith(b"\n"), data[-50:])
        return [json.loads(line) for line in data.splitlines()]

    def test_whole_lines_when_there_is_room(self) -> None:
        """With room in the pipe each record is written at once, nothing kept or dropped."""
        for n in range(5):
            self.observer(event(n))
        self.assertEqual([r["n"] for r in self.records()], list(range(5)))
        self.assertEqual((self.observer.pipe.kept, self.observer.pipe.dropped), (0, 0))
        self.assertEqual(self.reactor.writers, [])

    def test_full_pipe_never_blocks_and_drops_whole_records(self) -> None:
        """A pipe nobody reads: writes return at once, the rest is kept then dropped."""
        started = time.monotonic()
        for n in range(200):
            self.observer(event(n))
        self.assertLess(time.monotonic() - started, 1.0)
        pipe = self.observer.pipe
        self.assertLessEqual(pipe.kept, pipe.limit)
        self.assertGreater(pipe.dropped, 100)
        self.assertEqual(self.reactor.writers, [pipe])  # waiting for room, once
        # The reader catches up; the reactor says the pipe takes bytes again.
        received = self.records()
        while self.reactor.writers:
            pipe.doWrite()
            received += self.records()
        numbers = [r["n"] for r in received if r["event"] == "x"]
        self.assertEqual(numbers, sorted(numbers))  # in order, gaps where dropped
        self.assertEqual(len(numbers) + pipe.dropped, 200)
        (report,) = [r for r in received if r["event"] == "log_records_dropped"]
        self.assertEqual(report["dropped"], pipe.dropped)
        self.assertEqual(report["level"], "warn")
        self.assertIs(received[-1], report)
        # Reported once: the next record comes alone.
        self.observer(event(999))
        self.assertEqual([r["n"] for r in self.records()], [999])

    def test_partial_line_is_finished_first(self) -> None:
        """A record the pipe took in part is completed before anything else goes."""
        observer = PipeLogObserver(self.write_fd, limit=4 * PIPE_SIZE)
        observer.pipe.attach(self.reactor)
        observer(event(0, size=PIPE_SIZE + 500))  # more than the pipe holds
        observer(event(1))
        data = read_available(self.read_fd)
        self.assertFalse(data.endswith(b"\n"))
        observer.pipe.doWrite()
        data += read_available(self.read_fd)
        self.assertEqual([json.loads(x)["n"] for x in data.splitlines()], [0, 1])

    def test_broken_pipe_goes_quiet(self) -> None:
        """Once the reader is gone, nothing is written and nothing is raised."""
        os.close(self.read_fd)
        self.observer(event(1))
        self.assertTrue(self.observer.broken)
        self.observer(event(2))
        self.assertEqual(self.observer.pipe.kept, 0)

    def test_drain_at_exit(self) -> None:
        """At exit the rest waits a bounded time; it goes out if the reader reads."""
        for n in range(40):
            self.observer(event(n))
        started = time.monotonic()
        self.assertFalse(self.observer.pipe.drain(timeout=0.2))
        self.assertLess(time.monotonic() - started, 1.0)
        received: list[bytes] = []
        reader = threading.Thread(target=self._read_until_quiet, args=(received,))
        reader.start()
        self.assertTrue(self.observer.pipe.drain(timeout=5.0))
        reader.join(5.0)
        lines = b"".join(received).splitlines()
        self.assertTrue(all(json.loads(x)["event"] == "x" for x in lines))

    def _read_until_quiet(self, received: list[bytes]) -> None:
        while select.select([self.read_fd], [], [], 0.5)[0]:
            received.append(os.read(self.read_fd, 65536))

    def test_other_threads_wake_the_reactor(self) -> None:
        """A record logged from another thread asks the reactor (by callFromThread) to wait."""
        for n in range(30):
            self.observer(event(n))
        self.reactor.writers.clear()
        pipe: LogPipe = self.observer.pipe
        pipe._writing = False
        thread = threading.Thread(target=self.observer, args=(event(100),))
        thread.start()
        thread.join(5.0)
        self.assertEqual(self.reactor.writers, [])
        ((function, args),) = self.reactor.from_thread
        function(*args)
        self.assertEqual(self.reactor.writers, [pipe])


def accounted(records: list[dict[str, Any]]) -> int:
    """Connections whose record arrived or whose loss was reported."""
    dropped = sum(int(r["dropped"]) for r in records if r["event"] == "log_records_dropped")
    return dropped + sum(1 for r in records if r["event"] == "connection_closed")


class StalledReaderTests(SynchronousTestCase):
    """A worker whose record pipe nobody reads keeps echoing."""

    def test_stalled_log_reader_does_not_slow_echo(self) -> None:
        """200 connections echo quickly while the pipe is full; the drops are reported."""
        pki = make_pki(self.mktemp())
        options = config.Options()
        options.parseOptions(["--cert", str(pki.server_cert), "--key", str(pki.server_key)])
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        spec = WorkerSpec(
            1,
            worker_values(options),
            (SharedSocket(listener.fileno(), "INET", f"127.0.0.1:{port}"),),
            log_buffer=16384,
        )
        read_fd, write_fd = small_pipe(self)
        env = child_env({SPEC_ENV: spec.to_json()})
        process = subprocess.Popen(
            [sys.executable, "-m", "secure_echo.pool.worker", "1"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=write_fd,
            stderr=subprocess.DEVNULL,
            pass_fds=(listener.fileno(),),
        )
        self.addCleanup(self._reap, process)
        os.close(write_fd)
        context = client_context(pki.ca_cert)
        slowest = 0.0
        started = time.monotonic()
        for n in range(200):
            begun = time.monotonic()
            with (
                socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"line %d\n" % n)
                self.assertEqual(tls.recv(100), b"line %d\n" % n)
            if n:  # the first one also waited for the worker to start
                slowest = max(slowest, time.monotonic() - begun)
        elapsed = time.monotonic() - started
        self.assertLess(slowest, 2.0)
        self.assertLess(elapsed, 60.0)
        # The reader wakes up: what it finds is whole records, and the gap is reported.
        records: list[dict[str, Any]] = []
        buffer = b""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if not select.select([read_fd], [], [], 0.5)[0]:
                continue
            buffer += os.read(read_fd, 65536)
            *lines, buffer = buffer.split(b"\n")
            records += [json.loads(line) for line in lines]
            # The last connections may close after the gap is reported: read
            # until every connection is accounted for, or the deadline says not.
            if accounted(records) >= 200:
                break
        dropped = [r for r in records if r["event"] == "log_records_dropped"]
        self.assertTrue(dropped, [r["event"] for r in records][-20:])
        closed = [r for r in records if r["event"] == "connection_closed"]
        self.assertLess(len(closed), 200)
        self.assertGreaterEqual(accounted(records), 200)
        self.assertEqual(dropped[0]["limit"], 16384)
        print(
            f"\n200 echoes with a stalled log reader: {elapsed:.2f} s, slowest "
            f"{slowest * 1000:.1f} ms; {dropped[0]['dropped']} records dropped and reported",
            file=sys.stderr,
        )

    @staticmethod
    def _reap(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)
        if process.stdin is not None:
            process.stdin.close()
