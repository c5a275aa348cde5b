"""The process pool: spawn, signal, watch and reap the worker processes.

:class:`ProcessPool` starts each worker (``python -m secure_echo.pool.worker INDEX``)
with its spec and descriptors (:mod:`secure_echo.pool.contract`), hands every line it
writes to a :class:`PoolListener` (the supervisor), and reports each exit there; the
listener decides whether and when the slot starts again (:meth:`ProcessPool.restart_later`).
It stops one worker (SIGTERM, then SIGKILL after a grace) or all of them, and sends
SIGKILL to every one at a forced stop.  It decides nothing about readiness or
backoff.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Final, Protocol

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from typing_extensions import override

from secure_echo.pool.contract import MAX_RECORD_BYTES, MAX_STDERR_BYTES, RecordReader

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from twisted.internet.interfaces import IDelayedCall
    from twisted.python.failure import Failure

    from secure_echo.pool.contract import WorkerSpec

#: Seconds to wait for workers to die after SIGKILL before giving up on them.
KILL_WAIT: Final = 5.0


def exit_status(reason: Failure) -> tuple[int | None, int | None]:
    """``(exit code, signal)`` of an ended process (one of them is None)."""
    value = reason.value
    code = getattr(value, "exitCode", None)
    sig = getattr(value, "signal", None)
    return (code if isinstance(code, int) else None, sig if isinstance(sig, int) else None)


def describe_exit(code: int | None, sig: int | None) -> str:
    """``exited with status 2`` or ``was killed by signal 9``."""
    return f"was killed by signal {sig}" if sig is not None else f"exited with status {code}"


class PoolListener(Protocol):
    """What the pool tells its owner."""

    def worker_line(self, process: WorkerProcess, line: bytes, *, cut: bool) -> None:
        """A line (a record) from the worker's stdout; ``cut`` if it was too long."""

    def worker_stderr(self, process: WorkerProcess, line: bytes) -> None:
        """A line from the worker's stderr."""

    def worker_spawned(self, process: WorkerProcess) -> None:
        """A worker process was started."""

    def worker_spawn_failed(self, index: int, error: OSError) -> None:
        """Worker ``index`` could not be started."""

    def worker_ended(self, process: WorkerProcess, reason: Failure) -> None:
        """A worker exited, after its last line."""


class WorkerProcess(ProcessProtocol):
    """One worker process, seen from the supervisor: its pipes and its end.

    Records from stdout and lines from stderr go to the listener as they complete;
    ``processEnded`` (which Twisted calls after both pipes closed, so after the last
    record) reports the exit.  ``ended`` fires then.
    """

    def __init__(self, index: int, listener: PoolListener) -> None:
        self.index = index
        self.pid: int | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._listener = listener
        self._records = RecordReader(MAX_RECORD_BYTES)
        self._stderr = RecordReader(MAX_STDERR_BYTES)

    @override
    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    @override
    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            for line, cut in self._records.feed(data):
                self._listener.worker_line(self, line, cut=cut)
        elif childFD == 2:  # noqa: PLR2004 - standard error
            for line, _ in self._stderr.feed(data):
                self._listener.worker_stderr(self, line)

    @override
    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 1:
            for line, cut in self._records.finish():
                self._listener.worker_line(self, line, cut=cut)
        elif childFD == 2:  # noqa: PLR2004 - standard error
            for line, _ in self._stderr.finish():
                self._listener.worker_stderr(self, line)

    @override
    def processEnded(self, reason: Failure) -> None:
        self._listener.worker_ended(self, reason)
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


class ProcessPool:
    """The worker processes by slot (1 to N); see the module's text.

    ``prepare(index)`` returns the spec of slot ``index``'s next worker and the
    descriptors it holds that the supervisor closes once the worker was started
    (copies of the TLS files).  ``environment(spec)`` its environment.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listener: PoolListener,
        *,
        prepare: Callable[[int], tuple[WorkerSpec, Sequence[int]]],
        environment: Callable[[WorkerSpec], Mapping[str, str]],
        executable: str = sys.executable,
    ) -> None:
        self._reactor = reactor
        self._listener = listener
        self._prepare = prepare
        self._environment = environment
        self._executable = executable
        #: Live worker processes by slot.
        self.workers: dict[int, WorkerProcess] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._kills: dict[int, IDelayedCall] = {}
        #: No worker starts any more (the pool stops).
        self.closed = False

    def spawn(self, index: int) -> WorkerProcess | None:
        """Start slot ``index``'s worker; None (and the listener told) if that failed."""
        try:
            spec, held = self._prepare(index)
        except OSError as error:
            self._listener.worker_spawn_failed(index, error)
            return None
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        # Each descriptor keeps its number: the spec names it.
        child_fds.update({s.fd: s.fd for s in spec.sockets})
        child_fds.update({c.fd: c.fd for c in spec.tls_files})
        process = WorkerProcess(index, self._listener)
        # The index in argv only makes the worker recognisable in ps.
        args = [self._executable, "-m", "secure_echo.pool.worker", str(index)]
        try:
            self._reactor.spawnProcess(
                process,
                self._executable,
                args,
                env=dict(self._environment(spec)),
                childFDs=child_fds,
            )
        except OSError as error:
            self._listener.worker_spawn_failed(index, error)
            return None
        finally:
            for fd in held:
                os.close(fd)
        self.workers[index] = process
        self._listener.worker_spawned(process)
        return process

    def ended(self, process: WorkerProcess) -> bool:
        """Forget ``process``; True if it was its slot's current worker."""
        timer = self._kills.pop(process.index, None)
        if timer is not None and timer.active():
            timer.cancel()
        if self.workers.get(process.index) is process:
            del self.workers[process.index]
            return True
        return False

    def restart_later(self, index: int, delay: float) -> None:
        """Start slot ``index`` again in ``delay`` seconds, unless the pool closes first."""
        self._restarts[index] = self._reactor.callLater(delay, self._restart, index)

    def _restart(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self.closed and index not in self.workers:
            self.spawn(index)

    def send(self, index: int, name: str) -> bool:
        """Send signal ``name`` to slot ``index``'s worker; False if there is none."""
        process = self.workers.get(index)
        return process is not None and process.send_signal(name)

    def terminate(self, index: int, grace: float) -> None:
        """SIGTERM to slot ``index``'s worker; SIGKILL if it still runs ``grace`` s later."""
        process = self.workers.get(index)
        if process is None or index in self._kills:
            return
        process.send_signal("TERM")

        def kill() -> None:
            self._kills.pop(index, None)
            if process.running:
                self.log.warn(
                    "worker {worker} (pid {pid}) did not exit {timeout:g} s after SIGTERM; "
                    "killing it",
                    event="worker_killed",
                    worker=index,
                    pid=process.pid,
                    timeout=grace,
                )
                process.send_signal("KILL")

        self._kills[index] = self._reactor.callLater(grace, kill)

    def close(self) -> None:
        """Start no worker any more: cancel the restarts that wait."""
        self.closed = True
        for call in [*self._restarts.values(), *self._kills.values()]:
            if call.active():
                call.cancel()
        self._restarts.clear()
        self._kills.clear()

    def live(self) -> list[WorkerProcess]:
        """The workers still running, by slot."""
        return [self.workers[i] for i in sorted(self.workers) if self.workers[i].running]

    async def stop_all(self, grace: float) -> None:
        """SIGTERM to every worker; SIGKILL to those still running after ``grace`` s."""
        live = self.live()
        for process in live:
            process.send_signal("TERM")
        remaining = await self.wait(live, grace)
        for process in remaining:
            self.log.warn(
                "worker {worker} (pid {pid}) did not exit within {timeout:g} s; killing it",
                event="worker_killed",
                worker=process.index,
                pid=process.pid,
                timeout=grace,
            )
            process.send_signal("KILL")
        if remaining:
            await self.wait(remaining, KILL_WAIT)

    def kill_all(self) -> list[int]:
        """SIGKILL to every worker still running; the pids it reached."""
        return [p.pid for p in self.live() if p.send_signal("KILL") and p.pid is not None]

    def wait(
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
