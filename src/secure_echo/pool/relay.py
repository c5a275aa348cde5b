"""The log relay: each worker's output into the supervisor's one log.

A worker writes its records (``logs.event_as_record``, one JSON object per line) to
its stdout pipe.  :class:`LogRelay` takes each complete line (split by
:class:`~secure_echo.pool.contract.RecordReader`), adds ``worker`` (1 to N) and
re-emits it into the supervisor's log publisher (:func:`record_as_event`), so the
supervisor's ``JSONLogService`` writes every line whole and its ``Metrics`` observer
sees every worker's events.  On the way it keeps :class:`~secure_echo.pool.health.PoolState`
up to date: every line is a sign of life, a state the record reports is the
worker's state, heartbeats are consumed (not logged), ``worker_failed`` says why a
slot cannot start, and the certificate records say which certificate is in use.

A worker's stderr lines become ``worker_stderr`` warnings; a stdout line that is not
a JSON object becomes ``worker_output_invalid``.

The relay never blocks a worker: the pipes are read by the supervisor's reactor, and
the worker writes without blocking (:mod:`secure_echo.pool.logpipe`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, cast

from twisted.logger import InvalidLogLevelError, Logger, LogLevel

from secure_echo.daemon.logs import CONNECTION_RECORD, DEFAULT_EVENT, iso_timestamp
from secure_echo.pool.contract import (
    FAILED_EVENT,
    HEARTBEAT_EVENT,
    connection_count,
    parse_record,
    reported_state,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from twisted.internet.interfaces import IReactorTime
    from twisted.logger import LogEvent

    from secure_echo.pool.health import PoolState

#: Record keys that become the re-emitted event's ``log_*`` keys, not fields.
_RECORD_HEAD: Final = frozenset({"time", "level", "namespace", "message", "event", "worker"})
#: Records that name the certificate in use.
_CERTIFICATE_EVENTS: Final = frozenset({"tls_context_loaded", "tls_reloaded"})


def _level(name: object) -> LogLevel:
    if isinstance(name, str):
        try:
            return cast("LogLevel", LogLevel.levelWithName(name))
        except InvalidLogLevelError:
            pass
    return cast("LogLevel", LogLevel.info)


def record_as_event(record: Mapping[str, Any], worker: int, now: float) -> LogEvent:
    """The log event of a worker's ``record``, with ``worker`` added.

    :func:`~secure_echo.daemon.logs.event_as_record` turns it back into ``record`` with
    ``worker`` after ``message``, before the other fields.  The worker's time, level
    and namespace are kept; the rendered ``message`` is used as is (``log_format`` is
    ``{message}``, so braces in it are not a format).  ``now`` stands in for a missing
    or malformed time.
    """
    namespace = record.get("namespace")
    message = record.get("message")
    event: dict[str, Any] = {
        "log_time": iso_timestamp(record.get("time")) or now,
        "log_level": _level(record.get("level")),
        "log_namespace": namespace if isinstance(namespace, str) else "secure_echo.pool.worker",
        "log_format": "{message}",
        "log_system": f"worker {worker}",
        "message": message if isinstance(message, str) else "",
        "event": record.get("event", DEFAULT_EVENT),
        "worker": worker,
    }
    event.update(
        (key, value)
        for key, value in record.items()
        if key not in _RECORD_HEAD and not key.startswith("log_")
    )
    return event


class LogRelay:
    """Routes a worker's lines: its log to ``publisher``, its state to ``state``.

    ``connection_publisher`` receives the ``connection_closed`` records (where
    ``--log-file`` keeps them apart); ``on_record`` is called after each record is
    published, with the worker's number and the record (the reload coordinator
    watches for reload outcomes).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        state: PoolState,
        publisher: Callable[[LogEvent], None],
        connection_publisher: Callable[[LogEvent], None] | None = None,
        on_record: Callable[[int, Mapping[str, Any]], object] | None = None,
    ) -> None:
        self._clock = clock
        self._state = state
        self._publisher = publisher
        self._connection_publisher = connection_publisher or publisher
        self._on_record = on_record

    def line(self, worker: int, pid: int | None, line: bytes, *, cut: bool = False) -> None:
        """A line from worker ``worker``'s stdout."""
        state = self._state
        state.seen(worker)
        record = None if cut else parse_record(line)
        if record is None:
            self.log.warn(
                "worker {worker} wrote a line that is not a JSON record ({reason})",
                event="worker_output_invalid",
                worker=worker,
                pid=pid,
                reason="too long" if cut else "not a JSON object",
                length=len(line),
                text=line[:200].decode("utf-8", "backslashreplace"),
            )
            return
        name = record.get("event")
        reported = reported_state(record)
        if name == HEARTBEAT_EVENT:
            if reported is not None:
                state.reported(worker, reported, connection_count(record))
            return
        publish = self._connection_publisher if name == CONNECTION_RECORD else self._publisher
        publish(record_as_event(record, worker, self._clock.seconds()))
        if reported is not None:
            state.reported(worker, reported)
        elif name == FAILED_EVENT:
            error = record.get("error")
            state.failed(worker, error if isinstance(error, str) else "unknown error")
        elif name in _CERTIFICATE_EVENTS:
            state.certificate(record.get("subject"), record.get("not_after"))
        if self._on_record is not None:
            self._on_record(worker, record)

    def stderr(self, worker: int, pid: int | None, line: bytes) -> None:
        """A line worker ``worker`` wrote to stderr (outside its log): a warning."""
        self._state.seen(worker)
        self.log.warn(
            "worker {worker} stderr: {text}",
            event="worker_stderr",
            worker=worker,
            pid=pid,
            text=line.decode("utf-8", "backslashreplace"),
        )
