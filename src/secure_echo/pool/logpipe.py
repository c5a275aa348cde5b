"""A worker's records to its supervisor, without ever blocking the worker.

The worker's stdout is a pipe the supervisor reads.  A supervisor slow to read it
(its log disk is slow, its reactor is busy) must not stall the worker's event loop,
so the pipe is non-blocking and :class:`LogPipe` keeps what it did not take, whole
lines in order, up to ``limit`` bytes.  A record that would pass the limit is
dropped whole (a line is never cut) and counted; once the pipe has taken everything
kept, :class:`PipeLogObserver` writes one ``log_records_dropped`` record with the
count, so the gap shows in the log.  The reactor says when the pipe takes bytes again
(:meth:`LogPipe.doWrite`).

Once a write fails for another reason (EPIPE: the supervisor is gone) the pipe is
*broken*: nothing more is written, nowhere (stderr, the other pipe to the supervisor,
is gone too).

At exit, :meth:`LogPipe.drain` waits a bounded time for the pipe to take what is
left (the records of the drain), then gives up.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from twisted.internet.interfaces import IWriteDescriptor
from twisted.logger import ILogObserver, LogLevel
from zope.interface import implementer

from secure_echo.daemon.logs import JSONLinesObserver
from secure_echo.pool.contract import DROPPED_EVENT, LOG_BUFFER_BYTES

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.logger import LogEvent
    from twisted.python.failure import Failure

#: Seconds the worker waits at exit for the pipe to take its last records.
EXIT_DRAIN_TIMEOUT: Final = 5.0


@implementer(IWriteDescriptor)
class LogPipe:
    """Whole lines to ``fd`` without blocking; at most ``limit`` bytes kept back.

    A text stream for :class:`~secure_echo.daemon.logs.JSONLinesObserver`
    (``write`` then ``flush``).  ``drained`` is called each time the pipe took
    everything kept, after records were dropped.  Thread-safe: a record logged from
    another thread is kept under a lock and the reactor is woken to send it.
    """

    def __init__(self, fd: int, limit: int = LOG_BUFFER_BYTES) -> None:
        self._fd = fd
        os.set_blocking(fd, False)
        self.limit = limit
        self._lines: deque[bytes] = deque()
        #: Bytes of the first kept line the pipe already took.
        self._sent = 0
        #: Bytes kept (not yet taken by the pipe).
        self.kept = 0
        #: Records dropped since the process started.
        self.dropped = 0
        #: Records dropped and not reported yet, and when the first of them was.
        self.unreported = 0
        self.first_drop: float | None = None
        self.broken = False
        self.drained: Callable[[], object] | None = None
        self._reactor: Any = None
        self._reactor_thread: int | None = None
        self._writing = False
        self._lock = threading.RLock()

    def attach(self, reactor: Any) -> None:
        """From now on, wait for the pipe through ``reactor``, run by this thread."""
        self._reactor = reactor
        self._reactor_thread = threading.get_ident()

    # -- the text stream ---------------------------------------------------------------

    def write(self, text: str) -> None:
        """Keep ``text`` (one whole record line), or drop it if it does not fit."""
        data = text.encode("utf-8", "backslashreplace")
        with self._lock:
            if self.broken:
                return
            if self._lines and self.kept + len(data) > self.limit:
                self.dropped += 1
                self.unreported += 1
                if self.first_drop is None:
                    self.first_drop = time.time()
                return
            self._lines.append(data)
            self.kept += len(data)

    def flush(self) -> None:
        """Give the pipe what it takes now; wait for it through the reactor for the rest."""
        with self._lock:
            done = self._send()
        if not done:
            self._wait()
        elif self.unreported and self.drained is not None:
            self.drained()

    # -- sending -----------------------------------------------------------------------

    def _send(self) -> bool:
        """Write what the pipe takes; True if nothing is kept any more (or it broke)."""
        lines = self._lines
        while lines:
            head = lines[0]
            try:
                written = os.write(self._fd, memoryview(head)[self._sent :])
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            except OSError:
                self.broken = True
                lines.clear()
                self.kept = 0
                return True
            self._sent += written
            if self._sent == len(head):
                lines.popleft()
                self.kept -= len(head)
                self._sent = 0
        return True

    def _wait(self) -> None:
        reactor = self._reactor
        if reactor is None or self._writing:
            return
        if threading.get_ident() == self._reactor_thread:
            self._writing = True
            reactor.addWriter(self)
        else:
            reactor.callFromThread(self._wait)

    def take_report(self) -> tuple[int, float | None]:
        """The records dropped since the last report and when the first was; resets both."""
        with self._lock:
            count, since = self.unreported, self.first_drop
            self.unreported = 0
            self.first_drop = None
        return count, since

    def drain(self, timeout: float = EXIT_DRAIN_TIMEOUT) -> bool:
        """At exit: wait up to ``timeout`` s for the pipe to take the rest; True if it did."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._send():
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                select.select([], [self._fd], [], left)
            except (OSError, ValueError):
                return False

    # -- IWriteDescriptor --------------------------------------------------------------

    def fileno(self) -> int:
        """The pipe's descriptor."""
        return self._fd

    def doWrite(self) -> None:
        """The pipe takes bytes again: send, and stop waiting once all went out."""
        with self._lock:
            done = self._send()
        if done:
            self._writing = False
            self._reactor.removeWriter(self)
            if self.unreported and self.drained is not None:
                self.drained()

    def connectionLost(self, reason: Failure) -> None:  # noqa: ARG002 - the pipe tells
        """Removed from the reactor (it stops, or the pipe broke)."""
        self._writing = False

    def logPrefix(self) -> str:
        """Twisted's name for this descriptor in its log."""
        return "LogPipe"


@implementer(ILogObserver)
class PipeLogObserver:
    """JSON Lines to the supervisor's pipe (``fd``, stdout) through a :class:`LogPipe`."""

    def __init__(self, fd: int = 1, limit: int = LOG_BUFFER_BYTES) -> None:
        self.pipe = LogPipe(fd, limit)
        self.pipe.drained = self._report_drops
        self._json = JSONLinesObserver(self.pipe)  # type: ignore[arg-type]

    @property
    def broken(self) -> bool:
        """The pipe broke (the supervisor is gone); nothing more is written."""
        return self.pipe.broken

    def __call__(self, event: LogEvent) -> None:
        """Write ``event`` as one line, unless the pipe broke."""
        if not self.pipe.broken:
            self._json(event)

    def _report_drops(self) -> None:
        count, since = self.pipe.take_report()
        if not count:
            return
        now = time.time()
        self._json(
            {
                "log_level": LogLevel.warn,
                "log_namespace": "secure_echo.pool.logpipe",
                "log_time": now,
                "log_format": (
                    "dropped {dropped} log records: the supervisor did not read them "
                    "in time ({limit} bytes were waiting)"
                ),
                "event": DROPPED_EVENT,
                "dropped": count,
                "seconds": round(now - since, 3) if since is not None else None,
                "limit": self.pipe.limit,
                "total_dropped": self.pipe.dropped,
            }
        )
