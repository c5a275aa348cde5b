"""The contract between the supervisor and its workers: how one is started, what it says.

Both sides import this module and nothing of each other.  It is plain data and
parsing, no Twisted and no I/O.

Starting a worker (``python -m secure_echo.pool.worker INDEX``; ``INDEX`` only makes
the process recognisable in ``ps``):

* ``$SECURE_ECHO_WORKER`` (:data:`SPEC_ENV`) holds its :class:`WorkerSpec` as JSON;
  the variables in :data:`SUPERVISOR_ONLY_ENV` are removed (only the supervisor talks
  to systemd).
* Descriptor 0 is a pipe the supervisor never writes to: end of file on it means the
  supervisor is gone, and the worker drains and exits.
* Descriptor 1 is a pipe for the worker's records, one JSON object per line and
  nothing else.  The worker never blocks on it: it keeps at most
  :attr:`WorkerSpec.log_buffer` bytes that the pipe did not take, drops whole records
  past that and says how many once the pipe drains (:data:`DROPPED_EVENT`).
* Descriptor 2 is a pipe for what the worker writes before its log starts (a crash
  at import); each line becomes a ``worker_stderr`` warning.
* Each listening socket (:class:`SharedSocket`) is at the descriptor number the spec
  names, the same number as in the supervisor.
* Each :class:`TLSFileCopy` is a memory file holding one TLS file as the supervisor
  read it at start, for a worker that cannot read the file itself (a root-only key
  after ``twistd --uid``).

What a worker says, in its records (``event``):

* :data:`READY_EVENT` once it accepts on the shared sockets: it serves.
* :data:`HEARTBEAT_EVENT` every :data:`HEARTBEAT_INTERVAL` seconds from its reactor,
  with ``state`` (:class:`WorkerState`) and ``connections`` (open ones).  The
  supervisor consumes these and does not log them; a worker that stops sending
  them is hung.
* :data:`STOPPING_EVENTS` when it begins to drain (it serves no new connection).
* :data:`FAILED_EVENT` with ``error`` when it cannot start; it then exits with
  :data:`EXIT_CANNOT_START`.
* Every other record is its log, which the supervisor writes with ``worker`` added.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The environment variable that carries a worker's :class:`WorkerSpec` (JSON).
SPEC_ENV: Final = "SECURE_ECHO_WORKER"
#: Variables a worker must not see: only the supervisor talks to systemd, and the
#: sockets systemd passed are the supervisor's (the worker's are in the spec).
SUPERVISOR_ONLY_ENV: Final = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)

#: The event a worker logs once it adopted its sockets and serves.
READY_EVENT: Final = "worker_ready"
#: The worker's periodic report, for the supervisor only (never logged).
HEARTBEAT_EVENT: Final = "worker_heartbeat"
#: Seconds between two heartbeats of a worker.
HEARTBEAT_INTERVAL: Final = 1.0
#: Events that say a worker began to drain.
STOPPING_EVENTS: Final = frozenset({"worker_stopping", "supervisor_gone", "drain_started"})
#: The event of a worker that cannot start.
FAILED_EVENT: Final = "worker_failed"
#: The event a worker logs when its pipe drained after records were dropped.
DROPPED_EVENT: Final = "log_records_dropped"
#: A worker's exit status when it cannot start.
EXIT_CANNOT_START: Final = 2

#: Longest record line read from a worker; a longer one is cut and reported.
MAX_RECORD_BYTES: Final = 1 << 20
#: Longest stderr line kept from a worker.
MAX_STDERR_BYTES: Final = 4096
#: Bytes of records a worker keeps for a pipe that does not take them (default).
LOG_BUFFER_BYTES: Final = 1 << 20

_FAMILIES: Final = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


class WorkerState(StrEnum):
    """What a worker reports in its heartbeat."""

    #: It accepts new connections.
    SERVING = "serving"
    #: It accepts none and finishes the open ones.
    DRAINING = "draining"


@dataclass(frozen=True)
class SharedSocket:
    """A listening socket the supervisor hands to its workers."""

    #: The descriptor number, the same in the supervisor and in each worker.
    fd: int
    #: ``INET``, ``INET6`` or ``UNIX``.
    family: str
    #: Where it listens, for log records (``127.0.0.1:8443``, a path).
    address: str

    @property
    def address_family(self) -> int:
        """The ``socket.AF_*`` constant of :attr:`family`."""
        return _FAMILIES[self.family]


@dataclass(frozen=True)
class TLSFileCopy:
    """A TLS file as the supervisor read it, in a memory file at ``fd`` in the worker."""

    #: The file's path (as the settings name it).
    path: str
    #: The descriptor of the copy in the worker.
    fd: int


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides its descriptors.

    ``values`` are the supervisor's option values (``--config`` file and command line
    already merged, paths absolute, the worker's share of ``--max-connections``),
    validated again by the worker.  ``config_file`` and ``command_line`` are the
    supervisor's, so a worker's TLS reload re-reads the file exactly as one process
    would.
    """

    index: int
    values: Mapping[str, Any]
    sockets: tuple[SharedSocket, ...] = ()
    config_file: str | None = None
    command_line: Mapping[str, Any] = field(default_factory=dict)
    #: Bytes of records kept for a pipe that does not take them.
    log_buffer: int = LOG_BUFFER_BYTES
    tls_files: tuple[TLSFileCopy, ...] = ()
    #: The twistd reactor name the worker installs (the supervisor's own, when it
    #: runs on one of ours); None: Twisted's default.
    reactor: str | None = None
    #: Which process of its slot this is (1: the first; a restart counts up), so
    #: that connection ids stay unique across restarts.
    start: int = 1

    def to_json(self) -> str:
        """The spec as one line of JSON."""
        return json.dumps(
            {
                "index": self.index,
                "values": dict(self.values),
                "sockets": [[s.fd, s.family, s.address] for s in self.sockets],
                "config_file": self.config_file,
                "command_line": dict(self.command_line),
                "log_buffer": self.log_buffer,
                "tls_files": [[c.path, c.fd] for c in self.tls_files],
                "reactor": self.reactor,
                "start": self.start,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """Parse :meth:`to_json`'s output; ``ValueError`` names what is wrong."""
        try:
            data = json.loads(text)
            index = data["index"]
            values = data["values"]
            sockets = tuple(
                SharedSocket(int(fd), str(family), str(address))
                for fd, family, address in data["sockets"]
            )
            config_file = data["config_file"]
            command_line = data["command_line"]
            log_buffer = int(data.get("log_buffer", LOG_BUFFER_BYTES))
            copies = tuple(TLSFileCopy(str(p), int(fd)) for p, fd in data.get("tls_files", ()))
            reactor = data.get("reactor")
            start = int(data.get("start", 1))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            msg = f"${SPEC_ENV} is not a worker spec ({type(error).__name__}: {error})"
            raise ValueError(msg) from None
        _check(index, values, command_line, sockets, log_buffer)
        if reactor is not None and not isinstance(reactor, str):
            msg = f"${SPEC_ENV}: reactor must be a reactor name, not {reactor!r}"
            raise ValueError(msg)
        if start < 1:
            msg = f"${SPEC_ENV}: start must be 1 or more, not {start}"
            raise ValueError(msg)
        # JSON has no tuples; the command line keeps repeatable options as tuples.
        restored = {k: tuple(v) if isinstance(v, list) else v for k, v in command_line.items()}
        return cls(
            index,
            values,
            sockets,
            config_file if isinstance(config_file, str) else None,
            MappingProxyType(restored),
            log_buffer,
            copies,
            reactor,
            start,
        )


def _check(
    index: object,
    values: object,
    command_line: object,
    sockets: tuple[SharedSocket, ...],
    log_buffer: int,
) -> None:
    """Raise ``ValueError`` (naming :data:`SPEC_ENV`) if a parsed spec is not one."""
    if not isinstance(index, int) or isinstance(index, bool) or index < 1:
        msg = f"${SPEC_ENV}: index must be a positive whole number, not {index!r}"
        raise ValueError(msg)
    if not isinstance(values, dict) or not isinstance(command_line, dict):
        msg = f"${SPEC_ENV}: values and command_line must be objects"
        raise ValueError(msg)  # noqa: TRY004 - one error type for every bad spec
    unknown = [s.family for s in sockets if s.family not in _FAMILIES]
    if unknown:
        msg = f"${SPEC_ENV}: unknown socket family {unknown[0]!r}"
        raise ValueError(msg)
    if log_buffer < 0:
        msg = f"${SPEC_ENV}: log_buffer must not be negative, not {log_buffer}"
        raise ValueError(msg)


# -- reading a worker's records -------------------------------------------------------


class RecordReader:
    """Splits a byte stream into lines (``\\n`` removed), each at most ``limit`` bytes.

    :meth:`feed` returns ``(line, cut)`` pairs.  A line longer than ``limit`` comes out
    once, as its first ``limit`` bytes with ``cut`` true, and the rest of it up to the
    next newline is dropped: a runaway writer cannot grow the buffer without bound.
    The search for a newline resumes where the last one stopped, so a long line arriving
    in small pieces costs O(n).
    """

    def __init__(self, limit: int = MAX_RECORD_BYTES) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._searched = 0
        self._discarding = False

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Add ``data``; return the lines it completed."""
        buffer = self._buffer
        buffer += data
        lines: list[tuple[bytes, bool]] = []
        start = 0
        while (end := buffer.find(b"\n", max(start, self._searched))) >= 0:
            line = bytes(buffer[start:end])
            start = end + 1
            if self._discarding:
                self._discarding = False  # the tail of a line already reported
            elif len(line) > self.limit:
                lines.append((line[: self.limit], True))
            else:
                lines.append((line, False))
        del buffer[:start]
        self._searched = len(buffer)
        if len(buffer) > self.limit:
            if not self._discarding:
                lines.append((bytes(buffer[: self.limit]), True))
            self._discarding = True
            buffer.clear()
            self._searched = 0
        return lines

    def finish(self) -> list[tuple[bytes, bool]]:
        """The end of the stream: an unterminated last line, if any."""
        rest, discarding = bytes(self._buffer), self._discarding
        self._buffer.clear()
        self._searched = 0
        self._discarding = False
        if rest and not discarding:
            return [(rest, False)]
        return []


def parse_record(line: bytes) -> dict[str, Any] | None:
    """The JSON object on ``line``, or None if it is not one."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def reported_state(record: Mapping[str, Any]) -> WorkerState | None:
    """The state a record says its worker is in, or None if it says nothing of it."""
    name = record.get("event")
    if name == READY_EVENT:
        return WorkerState.SERVING
    if name in STOPPING_EVENTS:
        return WorkerState.DRAINING
    state = record.get("state")
    if name == HEARTBEAT_EVENT and isinstance(state, str):
        try:
            return WorkerState(state)
        except ValueError:
            return None
    return None


def connection_count(record: Mapping[str, Any]) -> int:
    """A heartbeat's ``connections``: a non-negative whole number, else 0."""
    value = record.get("connections")
    if isinstance(value, int) and not isinstance(value, bool):
        return max(value, 0)
    return 0
