"""The line protocol: framing, handler calls, ordered replies, limits.

The protocol is a translator.  It turns ``dataReceived`` into framer events, hands
each line to an :class:`~secure_echo.line.handler.ILineHandler`, and writes the replies,
in line order, as error replies where a handler failed.

State rules (all of them live in this module):

1. Replies leave in the order the lines arrived.  A FIFO of slots holds lines whose
   reply is not ready; a reply is written only when every earlier one has been.
   While the FIFO is empty, a synchronous reply skips it and joins the batch that
   the transport writes at the end of the read.
2. A handler that raises, fails, or does not answer within ``handler_timeout``
   seconds yields ``-ERR handler-failed``/``-ERR handler-timeout`` in its line's
   place, and a log event.  The connection goes on.
3. An overlong line yields ``-ERR line-too-long`` (ended with LF) in its place as
   soon as the read that crosses the limit arrives, and is counted then; the rest
   of it is dropped up to its LF (see :mod:`secure_echo.line.framing`).
4. Memory is bounded: the framer holds at most ``max_line_length + 1`` bytes, and
   when ``max_pending`` replies are waiting, reading pauses until the FIFO drains
   to half of that.  The transport separately pauses reading while the client
   does not read what we send.
5. End of input (``readConnectionLost``): a final unterminated line is handled
   like any other; once every reply is written the protocol closes the connection.
   Nothing read is left unanswered while the client can still read.
6. After ``connectionLost`` nothing is written; pending handler Deferreds are
   cancelled.
"""

from __future__ import annotations

import json
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from secure_echo.line.framing import LF, LineFramer, terminator_of
from secure_echo.line.handler import IBatchLineHandler

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from secure_echo.line.framing import Event
    from secure_echo.line.handler import ILineHandler

#: Stable reason tokens of ``-ERR`` replies (docs/protocol.md).
LINE_TOO_LONG: Final = "line-too-long"
HANDLER_FAILED: Final = "handler-failed"
HANDLER_TIMEOUT: Final = "handler-timeout"


def error_reply(token: str, text: str, terminator: bytes) -> bytes:
    """Format an error reply: ``-ERR <token> <text>`` and the line's terminator."""
    return b"-ERR %s %s%s" % (token.encode("ascii"), text.encode("ascii"), terminator or LF)


class LineRecord(TypingProtocol):
    """What the protocol counts and reports about its connection.

    The transport below owns the record (:class:`secure_echo.tls.record.ConnectionRecord`
    is one); the line protocol only adds to its line counters and asks it for the
    info reply, so this layer needs nothing of the transport's.
    """

    conn_id: Any
    lines_in: int
    lines_out: int
    overlong_lines: int
    handler_errors: int

    def info(self) -> dict[str, Any]:
        """The connection as the server sees it (the ``--info-line`` reply)."""
        ...


class _Slot:
    """A line whose reply is not written yet."""

    __slots__ = ("deferred", "reply")

    def __init__(self, reply: bytes | None, deferred: Deferred[Any] | None = None) -> None:
        self.reply = reply
        self.deferred = deferred


class LineSettings:
    """Per-connection limits, shared by every protocol of a factory."""

    __slots__ = ("handler_timeout", "info_line", "max_line_length", "max_pending")

    def __init__(
        self,
        *,
        max_line_length: int = 65536,
        max_pending: int = 256,
        handler_timeout: float = 30.0,
        info_line: bytes | None = None,
    ) -> None:
        self.max_line_length = max_line_length
        self.max_pending = max_pending
        self.handler_timeout = handler_timeout
        #: Opt-in: a line with exactly this content gets :meth:`info_reply`
        #: instead of the handler's reply (off, so echo stays byte-exact).
        self.info_line = info_line


@implementer(IHalfCloseableProtocol)
class LineProtocol(Protocol):
    """Echo (or whatever the handler says) every line, in order; see module rules."""

    log = Logger()

    def __init__(
        self,
        handler: ILineHandler,
        settings: LineSettings,
        clock: IReactorTime,
        record: LineRecord,
    ) -> None:
        self._handler = handler
        self._settings = settings
        self._clock = clock
        self.record = record
        self._framer = LineFramer(settings.max_line_length)
        # The batch form of the handler, when it has one and no info line must be
        # looked for (the info line needs the per-line path).
        self._batch = (
            handler.handle_batch
            if IBatchLineHandler.providedBy(handler) and settings.info_line is None
            else None
        )
        self._fifo: deque[_Slot] = deque()
        self._paused = False
        self._input_ended = False
        self._lost = False
        self._line_no = 0
        # True while _dispatch runs: a Deferred that fires meanwhile (one returned
        # already fired, or fired by a later handler call) only marks its slot
        # ready, and _dispatch writes it after the batch that precedes it.
        self._dispatching = False

    @override
    def dataReceived(self, data: bytes) -> None:
        batch = self._batch
        if batch is not None and not self._fifo and not self._framer.holding:
            # Fast path (see IBatchLineHandler): every complete line of this read
            # is at most as long as the limit when the last LF lies within it.
            last = data.rfind(LF)
            if 0 <= last < self._settings.max_line_length:
                end = last + 1
                whole = data if end == len(data) else data[:end]
                count = whole.count(LF)
                self._line_no += count
                record = self.record
                record.lines_in += count
                record.lines_out += count
                self._write([batch(whole, count)])
                if end < len(data):
                    # The tail may already prove its line too long.
                    tail_events = self._framer.feed(data[end:])
                    if tail_events:
                        self._dispatch(tail_events)
                return
        events = self._framer.feed(data)
        if events:
            self._dispatch(events)

    def readConnectionLost(self) -> None:
        """The client sent all it will send: answer the rest, then close."""
        self._input_ended = True
        events = self._framer.end()
        if events:
            self._dispatch(events)
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        """Not used: the transport never half-closes our side."""

    @property
    def pending(self) -> int:
        """Lines whose replies are not written yet."""
        return len(self._fifo)

    def drain(self) -> None:
        """The server is stopping: answer the lines already read, then close.

        Unlike :meth:`readConnectionLost` an unfinished line is not a line: the
        client did not end it, so it gets no reply.
        """
        self._input_ended = True
        self._close_if_done()

    @override
    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        fifo = self._fifo
        self._fifo = deque()
        for slot in fifo:
            if slot.deferred is not None:
                slot.deferred.cancel()

    # -- the per-line path ------------------------------------------------------

    def _dispatch(self, events: list[Event]) -> None:
        """Turn events into replies; write the ready ones (state rule 1)."""
        fifo = self._fifo
        record = self.record
        batch: list[bytes] = []
        self._dispatching = True
        try:
            self._dispatch_events(events, batch)
        finally:
            self._dispatching = False
        # Slots whose Deferred fired during the loop follow the batch in line order.
        while fifo and fifo[0].reply is not None:
            batch.append(cast("bytes", fifo.popleft().reply))
        if batch:
            record.lines_out += len(batch)
            self._write(batch)
        if len(fifo) >= self._settings.max_pending and not self._paused:
            self._paused = True
            cast("Any", self.transport).pauseProducing()

    def _dispatch_events(self, events: list[Event], batch: list[bytes]) -> None:
        """Call the handler for each event; ready replies go to ``batch`` or the FIFO."""
        handle = self._handler.handle_line
        info = self._settings.info_line
        fifo = self._fifo
        record = self.record
        for event in events:
            self._line_no += 1
            record.lines_in += 1
            if type(event) is bytes:
                if info is not None and len(event) <= len(info) + 2 and self._is_info(event):
                    self._queue_reply(self._info_reply(event), batch)
                    continue
                try:
                    result = handle(event)
                except Exception:
                    reply: bytes = self._handler_failed(event, Failure())
                else:
                    if type(result) is bytes:
                        reply = result
                    elif isinstance(result, Deferred):
                        fifo.append(self._await(event, result))
                        continue
                    else:
                        reply = self._handler_failed(
                            event,
                            Failure(TypeError(f"handler returned {type(result).__name__}")),
                        )
            else:
                record.overlong_lines += 1
                self.log.info(
                    "line {line_no} on connection {conn_id} exceeded {limit} bytes",
                    event="line_too_long",
                    conn_id=record.conn_id,
                    line_no=self._line_no,
                    limit=self._settings.max_line_length,
                )
                # Its terminator may not have come yet: the reply ends with LF.
                reply = error_reply(
                    LINE_TOO_LONG, f"line exceeds {self._settings.max_line_length} bytes", LF
                )
            if fifo:
                fifo.append(_Slot(reply))
            else:
                batch.append(reply)

    def _await(self, line: bytes, deferred: Deferred[bytes]) -> _Slot:
        """Put a Deferred reply in the FIFO, with its timeout and error handling."""
        slot = _Slot(None, deferred)
        line_no = self._line_no
        deferred.addTimeout(self._settings.handler_timeout, self._clock)

        def done(result: object) -> None:
            slot.deferred = None
            if self._lost:
                return
            if isinstance(result, Failure):
                slot.reply = self._handler_failed(line, result, line_no)
            elif type(result) is bytes:
                slot.reply = result
            else:
                slot.reply = self._handler_failed(
                    line,
                    Failure(TypeError(f"handler returned {type(result).__name__}")),
                    line_no,
                )
            if not self._dispatching:
                self._flush_ready()

        deferred.addBoth(done)
        return slot

    def _is_info(self, line: bytes) -> bool:
        """True if ``line``'s content is exactly the configured info line."""
        return line[: len(line) - len(terminator_of(line))] == self._settings.info_line

    def _queue_reply(self, reply: bytes, batch: list[bytes]) -> None:
        """A ready reply: into the batch, or behind the waiting ones (state rule 1)."""
        if self._fifo:
            self._fifo.append(_Slot(reply))
        else:
            batch.append(reply)

    def _info_reply(self, line: bytes) -> bytes:
        """One JSON line describing the connection, ended like ``line``."""
        text = json.dumps(self.record.info(), separators=(",", ":"), sort_keys=True)
        return text.encode() + (terminator_of(line) or LF)

    def _flush_ready(self) -> None:
        """Write every reply at the head of the FIFO that is ready (state rule 1)."""
        fifo = self._fifo
        batch: list[bytes] = []
        while fifo and fifo[0].reply is not None:
            batch.append(cast("bytes", fifo.popleft().reply))
        if batch:
            self.record.lines_out += len(batch)
            self._write(batch)
        if self._paused and len(fifo) <= self._settings.max_pending // 2:
            self._paused = False
            cast("Any", self.transport).resumeProducing()
        self._close_if_done()

    def _handler_failed(self, line: bytes, failure: Failure, line_no: int | None = None) -> bytes:
        """Log a handler failure and return the error reply for its line."""
        record = self.record
        record.handler_errors += 1
        terminator = terminator_of(line)
        number = self._line_no if line_no is None else line_no
        if failure.check(TimeoutError):
            self.log.warn(
                "handler for line {line_no} on connection {conn_id} timed out after {timeout} s",
                event="handler_timeout",
                conn_id=record.conn_id,
                line_no=number,
                timeout=self._settings.handler_timeout,
            )
            return error_reply(
                HANDLER_TIMEOUT,
                f"no reply within {self._settings.handler_timeout:g} s",
                terminator,
            )
        self.log.failure(
            "handler failed for line {line_no} on connection {conn_id}",
            failure,
            LogLevel.error,
            event="handler_failed",
            conn_id=record.conn_id,
            line_no=number,
            error=failure.getErrorMessage(),
            error_type=failure.type.__name__ if failure.type else None,
        )
        return error_reply(HANDLER_FAILED, "the line handler failed", terminator)

    def _write(self, batch: list[bytes]) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        if len(batch) == 1:
            transport.write(batch[0])
        else:
            transport.write(b"".join(batch))

    def _close_if_done(self) -> None:
        """State rule 5: close once input ended and every reply went out."""
        if self._input_ended and not self._fifo and not self._lost:
            transport = self.transport
            if transport is not None:
                transport.loseConnection()


class LineFactory:
    """Builds :class:`LineProtocol`\\ s for the TLS transport."""

    def __init__(self, handler: ILineHandler, settings: LineSettings, clock: IReactorTime) -> None:
        self.handler = handler
        self.settings = settings
        self.clock = clock

    def build(self, record: LineRecord) -> LineProtocol:
        """Make the protocol for one connection."""
        return LineProtocol(self.handler, self.settings, self.clock, record)
