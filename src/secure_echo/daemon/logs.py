"""Structured logging: JSON Lines records to a size-rotated file.

Every record is one JSON object on one line (no ``\\x1e`` separator) with these keys
first, then the event's own named fields (docs/logging.md lists them all):

``time``
    ISO 8601 UTC timestamp with microseconds.
``level``
    ``debug``, ``info``, ``warn``, ``error`` or ``critical``.
``event``
    A stable event name.  Our events set it explicitly; events from Twisted itself
    (which has no such field) get ``twisted``.
``namespace``
    The emitting logger's namespace (e.g. ``secure_echo.tls.connection``).
``message``
    The rendered human text.

A ``Failure`` attached to an event is rendered into ``traceback``; values JSON
cannot hold are written as their ``repr``.  Line contents are never logged by
secure-echo, so no record can carry a client's bytes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import signal
import sys
from typing import TYPE_CHECKING, Any, Final, TextIO

import orjson
from twisted.application.service import Service
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogPublisher,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from typing_extensions import override
from zope.interface import implementer

from secure_echo.tls.offered import RawJSON

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

#: The ``event`` value given to records that do not name one (Twisted's own).
DEFAULT_EVENT = "twisted"


def _default(value: object) -> object:
    """JSON fallback: sets become lists, everything else its ``repr``."""
    if isinstance(value, RawJSON):
        return value.value()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


#: One encoder for every record: ``json.dumps`` with options builds a new one per call.
_ENCODER = json.JSONEncoder(
    default=_default, ensure_ascii=False, allow_nan=False, separators=(",", ":")
)
#: orjson as the standard library's encoder above is set: keys that are scalars
#: become strings, dataclasses and datetimes go through ``_default`` (their repr).
_ORJSON_OPTIONS: Final = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
)


def _dumps(value: object) -> str:
    """Strict JSON on one line, compact.

    orjson writes a record in a tenth of the standard library's time (one record
    per connection makes that a visible share of a handshake's CPU).  What it
    refuses (a lone surrogate, an integer beyond 64 bits, a key that is no
    scalar, a cycle) goes to the standard library's encoder, which writes what
    it can as before (and refuses NaN and infinities, which orjson writes as
    ``null``, so a record with them and one of the above is written field by
    field).
    """
    try:
        return orjson.dumps(value, default=_default, option=_ORJSON_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return _ENCODER.encode(value)


def _field(value: object) -> object:
    """``value`` if JSON can hold it, else its ``repr``."""
    try:
        _dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def iso_timestamp(value: object) -> float | None:
    """An ISO 8601 field of a record (``time``, ``not_after``) as Unix time, else None.

    A time without a zone is taken as UTC, as every time secure-echo writes is.
    """
    if not isinstance(value, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


#: The record written once per connection; the volume of the log.
CONNECTION_RECORD = "connection_closed"


def connection_records_apart(log_file: Path | None, log_stdout: str | None) -> bool:
    """Whether ``connection_closed`` records skip twistd's text log.

    With a JSON log file and no ``--log-stdout`` choice, the per-connection records
    go to the file (and the metrics) only: the text log is then for people (start,
    reloads, warnings), and the one record per connection is not rendered twice.
    ``--log-stdout text`` asks for them in the text log as well; with
    ``--log-stdout json`` every sink is JSON and takes every record.
    """
    return log_file is not None and log_stdout is None


def render_message(event: LogEvent) -> str:
    """The event's human text.

    Plain ``str.format`` (C code) renders our own format strings, which name only
    fields; Twisted's ``formatEvent`` (which also allows ``{method()}`` calls) is
    the fallback for anything else.  It is several times cheaper per record, and
    one record is written per connection.
    """
    text = event.get("log_format")
    if isinstance(text, str):
        try:
            return text.format_map(event)
        except (KeyError, IndexError, AttributeError, ValueError, TypeError):
            pass
    return formatEvent(event)


#: Microseconds per second.
_MICRO: Final = 1_000_000


class _Timestamps:
    """ISO 8601 UTC stamps with microseconds, the date and time part kept per second.

    A record is written per connection; the same second's ``datetime`` is not
    built again for each.  The result is ``datetime.fromtimestamp(when,
    UTC).isoformat(timespec="microseconds")``, rounded the same way (half to even).
    """

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second: int | None = None
        self._prefix = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        micro = round((when - second) * _MICRO)
        if micro >= _MICRO or micro < 0:  # rounded up into the next second
            return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(
                timespec="microseconds"
            )
        if second != self._second:
            whole = datetime.datetime.fromtimestamp(second, datetime.UTC)
            self._prefix = whole.strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._prefix}.{micro:06d}+00:00"


_timestamp = _Timestamps()


#: The keys every record starts with.
_HEAD: Final = ("time", "level", "event", "namespace", "message")
#: Per shape of event (its keys, in order): the keys to drop after copying it
#: whole, and whether a field named like the head's (other than ``event``) must
#: be put back.  None: an event with a failure, copied key by key.
_Plan = tuple[tuple[str, ...], bool] | None
_plans: dict[tuple[str, ...], _Plan] = {}
#: Shapes remembered at most; a daemon emits a few dozen.
_MAX_PLANS: Final = 512


def _plan(keys: tuple[str, ...]) -> _Plan:
    """How to copy an event with ``keys``: drop Twisted's ``log_`` ones after it."""
    plan: _Plan = None
    if "log_failure" not in keys:
        drop = tuple(key for key in keys if key.startswith("log_"))
        plan = (drop, any(key in keys for key in _HEAD if key != "event"))
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[keys] = plan
    return plan


def event_as_record(event: LogEvent) -> dict[str, Any]:
    """Flatten a twisted.logger event into the record described above.

    The head's keys come first; a field named like one of them does not replace
    it.  Twisted's own ``log_`` keys are dropped, except a failure, which becomes
    ``traceback``.  The other fields follow in the event's order.  An event is
    copied whole and Twisted's keys taken out again, by a plan made once per
    shape (the same keys in the same order): the per-connection record has
    about thirty fields.
    """
    when = event.get("log_time")
    time = _timestamp(when) if isinstance(when, int | float) else None
    level = getattr(event.get("log_level"), "name", None)
    namespace = event.get("log_namespace")
    message = render_message(event)
    record: dict[str, Any] = {
        "time": time,
        "level": level,
        "event": event.get("event", DEFAULT_EVENT),
        "namespace": namespace,
        "message": message,
    }
    keys = tuple(event)
    try:
        plan = _plans[keys]
    except KeyError:
        plan = _plan(keys)
    if plan is not None:
        drop, restore = plan
        record.update(event)
        for key in drop:
            del record[key]
        if restore:
            record.update(time=time, level=level, namespace=namespace, message=message)
        return record
    for key, value in event.items():
        if key in record:
            continue
        # Twisted's own keys all start with log_; of them only a failure is kept.
        if key.startswith("log_"):
            if key == "log_failure" and isinstance(value, Failure):
                record["traceback"] = value.getTraceback()
            continue
        record[key] = value
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """Write each event as one JSON line to ``stream`` and flush it."""

    def __init__(self, stream: TextIO | LogFile) -> None:
        self._stream = stream
        self._failing = False

    def __call__(self, event: LogEvent) -> None:
        """Write ``event`` as one line."""
        record = event_as_record(event)
        # A field that is JSON text already (the ClientHello summary) is written as
        # it is, after the rest: encoded once per kind of client, not per record.
        raw = record.get("client_hello")
        if isinstance(raw, RawJSON):
            del record["client_hello"]
        try:
            line = _dumps(record)
        except (TypeError, ValueError):
            # A field JSON cannot hold (keys that are no scalars, a cycle): write
            # that field as its repr rather than lose the whole record.
            line = _dumps({key: _field(value) for key, value in record.items()})
        if isinstance(raw, RawJSON):
            line = f'{line[:-1]},"client_hello":{raw.text}}}'
        if not line.isascii():
            # A lone surrogate (an undecodable file name) cannot be encoded as UTF-8;
            # written as a JSON escape it keeps the record.
            line = line.encode("utf-8", "backslashreplace").decode("utf-8")
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, AttributeError) as error:
            # A log file that cannot be rotated or written (permissions after
            # --uid, a full disk) must not make Twisted drop this observer for
            # good: report once on stderr, keep trying with later records.
            self._report(error)

    def _report(self, error: Exception) -> None:
        if not self._failing:
            self._failing = True
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"secure-echo: cannot write the JSON log: {error}\n")
            stream.flush()


def open_log_file(path: Path, max_bytes: int, keep: int) -> LogFile:
    """Open ``path`` for appending, rotated at ``max_bytes``, ``keep`` old files kept.

    Rotated files are ``path.1`` (newest) to ``path.<keep>``; older ones are deleted.
    """
    return LogFile(
        path.name,
        str(path.parent),
        rotateLength=max_bytes,
        maxRotatedFiles=keep,
        defaultMode=0o640,
    )


class JSONLogService(Service):
    """Attach a :class:`JSONLinesObserver` on a rotating file while running.

    SIGUSR1 reopens the file, for external rotation (logrotate renames the file,
    then signals): the handler only hops into the reactor, which reopens.  A
    handler installed before (twistd's, when it logs to a file) is still called,
    and put back when the service stops; if there was none, SIGUSR1 is ignored
    from then on rather than fatal.
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        keep: int,
        publisher: LogPublisher | None = None,
        reactor: Any = None,
        *,
        also: Sequence[LogPublisher] = (),
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._publisher = publisher if publisher is not None else globalLogPublisher
        #: Further publishers the file takes records from (the connection records').
        self._also = tuple(also)
        self.log = Logger(observer=self._publisher)
        self._reactor = reactor
        self._file: LogFile | None = None
        self._observer: JSONLinesObserver | None = None
        self._previous_usr1: Any = None

    def reopen(self) -> None:
        """Open the log file at its path again (after an external rename).

        The new file is opened before the old one is closed: if it cannot be
        opened (permissions, a missing directory) records keep going to the old
        file and the failure is logged, instead of the log stopping.
        """
        old = self._file
        if old is None or self._observer is None:
            return
        try:
            new = open_log_file(self.path, self.max_bytes, self.keep)
        except OSError as error:
            self.log.error(
                "cannot reopen the log file {path}: {error}; still writing to the old file",
                event="log_reopen_failed",
                path=str(self.path),
                error=str(error),
            )
            return
        self._file = new
        self._observer._stream = new
        old.close()
        self.log.info("log file reopened: {path}", event="log_reopened", path=str(self.path))

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        if self._reactor is not None:
            self._reactor.callFromThread(self.reopen)
        previous = self._previous_usr1
        if callable(previous):
            previous(signum, frame)

    @override
    def privilegedStartService(self) -> None:
        # Open while still privileged, so a root-started daemon can log to a
        # directory its unprivileged user may not create files in.
        self._file = open_log_file(self.path, self.max_bytes, self.keep)
        self._observer = JSONLinesObserver(self._file)
        for publisher in (self._publisher, *self._also):
            publisher.addObserver(self._observer)
        # Before anything listens: from the first ``listening`` record on, SIGUSR1
        # reopens rather than kills.
        if self._reactor is not None and self._previous_usr1 is None:
            self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_sigusr1)
        super().privilegedStartService()

    @override
    def startService(self) -> None:
        if self._file is None:
            self.privilegedStartService()
        super().startService()

    @override
    def stopService(self) -> None:
        super().stopService()
        if self._reactor is not None and self._previous_usr1 is not None:
            # Stopped last, after the drain: a SIGUSR1 from here to the exit must
            # not end the process by its default action, so none is put back.
            previous = self._previous_usr1
            signal.signal(signal.SIGUSR1, previous if callable(previous) else signal.SIG_IGN)
            self._previous_usr1 = None
        if self._observer is not None:
            for publisher in (self._publisher, *self._also):
                publisher.removeObserver(self._observer)
            self._observer = None
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclasses.dataclass(frozen=True)
class LogSinks:
    """The daemon's log outputs as the options chose them (see docs/logging.md)."""

    #: twistd's log observer for ``--log-stdout json`` (None: twistd's own text log).
    stdout: JSONLinesObserver | None
    #: The ``--log-file`` service.
    file: JSONLogService | None
    #: The publisher of ``connection_closed`` when it skips the text log.
    connections: LogPublisher | None

    @property
    def also(self) -> tuple[LogPublisher, ...]:
        """Publishers besides the global one that log readers must observe."""
        return (self.connections,) if self.connections is not None else ()


def log_sinks(
    log_file: Path | None, max_bytes: int, keep: int, log_stdout: str | None, reactor: Any
) -> LogSinks:
    """Build the outputs for the logging options; the caller parents ``file``."""
    # Given to twistd as the application's log observer: its text observer is then
    # not installed, so standard output carries JSON Lines only.
    stdout = JSONLinesObserver(sys.stdout) if log_stdout == "json" else None
    connections = LogPublisher() if connection_records_apart(log_file, log_stdout) else None
    sinks = LogSinks(stdout, None, connections)
    if log_file is None:
        return sinks
    service = JSONLogService(log_file, max_bytes, keep, reactor=reactor, also=sinks.also)
    return dataclasses.replace(sinks, file=service)
