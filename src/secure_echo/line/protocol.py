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
   cancelled and held input is dropped.
7. Output is bounded per step, not only per reply: one read of short lines can
   ask for far more output than it holds (an ``--info-line`` reply is ~65 times
   its line).  A step handles lines until the replies it made ready pass
   :data:`OUTPUT_PER_STEP`; the rest of the read (and any read that follows) is
   held, reading pauses, and the next step runs on a later reactor turn, only
   while the transport's send buffer is not full.  The transport says so by
   pausing and resuming the producer the protocol registers with it
   (``IConsumer.registerProducer``), as Twisted's stream transports do; with a
   transport that cannot, the steps still take turns, but nothing stops them
   filling its buffer.  Held input is at most one read.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from secure_echo.line.framing import LF, LineFramer, count_lines, terminator_of
from secure_echo.line.handler import IBatchLineHandler

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from secure_echo.line.framing import Event
    from secure_echo.line.handler import ILineHandler

#: Stable reason tokens of ``-ERR`` replies (docs/protocol.md).
LINE_TOO_LONG: Final = "line-too-long"
HANDLER_FAILED: Final = "handler-failed"
HANDLER_TIMEOUT: Final = "handler-timeout"

#: Replies one step may make ready before the rest of the input waits (state
#: rule 7): four times the largest socket read, so an echo never waits for it.
OUTPUT_PER_STEP: Final = 256 * 1024
#: What may follow the info line's content in a line that asks for it.
_ENDINGS: Final = (b"\n", b"\r\n", b"")


def error_reply(token: str, text: str, terminator: bytes) -> bytes:
    """Format an error reply: ``-ERR <token> <text>`` and ``terminator``."""
    return f"-ERR {token} {text}".encode() + terminator


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

    __slots__ = ("handler_timeout", "info_fields", "info_line", "max_line_length", "max_pending")

    def __init__(
        self,
        *,
        max_line_length: int = 65536,
        max_pending: int = 256,
        handler_timeout: float = 30.0,
        info_line: bytes | None = None,
        info_fields: Mapping[str, Any] | None = None,
    ) -> None:
        self.max_line_length = max_line_length
        self.max_pending = max_pending
        self.handler_timeout = handler_timeout
        #: Opt-in: a line with exactly this content gets :meth:`info_reply`
        #: instead of the handler's reply (off, so echo stays byte-exact).
        self.info_line = info_line
        #: Fields the info reply adds to the connection's own (a pool's ``worker``).
        self.info_fields: Mapping[str, Any] = dict(info_fields or {})


@implementer(IPushProducer)
class _SendBuffer:
    """Hears from the transport when its send buffer fills and drains (state rule 7).

    Registered as the transport's streaming producer, as Twisted's own stream
    transports expect: ``pauseProducing`` when what we wrote piles up unsent,
    ``resumeProducing`` when it has drained.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: LineProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        """The client is not taking what we send: handle no more input for now."""
        self._protocol.send_buffer_full(full=True)

    def resumeProducing(self) -> None:
        """What we sent has drained: go on with the input held back."""
        self._protocol.send_buffer_full(full=False)

    def stopProducing(self) -> None:
        """The transport is going away; ``connectionLost`` follows."""


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
        # Lists, not deques: an empty deque holds a 64-slot block (~760 bytes) for
        # the whole connection, an empty list 56 bytes; both stay short (the FIFO
        # is bounded by max_pending, held reads by the paused transport).
        self._fifo: list[_Slot] = []
        # Input held back by state rule 7: the events of a read not handled yet,
        # and the reads that came after it.
        self._events: Iterator[Event] | None = None
        self._unread: list[bytes] = []
        self._step_call: IDelayedCall | None = None
        self._send_full = False
        self._paused = False
        self._input_ended = False
        self._eof = False
        self._lost = False
        self._line_no = 0
        # True while _step runs: a Deferred that fires meanwhile (one returned
        # already fired, or fired by a later handler call) only marks its slot
        # ready, and _step writes it after the batch that precedes it.
        self._dispatching = False

    @override
    def connectionMade(self) -> None:
        # Only a transport that takes a producer can say when its buffer is full.
        transport: Any = self.transport
        if IConsumer.providedBy(transport):
            transport.registerProducer(_SendBuffer(self), True)

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._events is not None:
            # Earlier input is still held back (it arrived before reading paused).
            self._unread.append(data)
            return
        batch = self._batch
        if batch is not None and not self._fifo and not self._framer.holding:
            # Fast path (see IBatchLineHandler): every complete line of this read
            # is at most as long as the limit when the last LF lies within it.
            # Its replies are its lines, as long as the read: no budget needed.
            last = data.rfind(LF)
            if 0 <= last < self._settings.max_line_length:
                end = last + 1
                whole = data if end == len(data) else data[:end]
                count = count_lines(data, end)
                self._line_no += count
                record = self.record
                record.lines_in += count
                record.lines_out += count
                self._write([batch(whole, count)])
                if end == len(data):
                    return
                # The tail may already prove its line too long.
                data = data[end:]
        self._events = self._framer.events(data)
        self._step()

    def readConnectionLost(self) -> None:
        """The client sent all it will send: answer the rest, then close."""
        self._input_ended = True
        self._eof = True
        if self._events is None:
            self._step()

    def writeConnectionLost(self) -> None:
        """Not used: the transport never half-closes our side."""

    @property
    def pending(self) -> int:
        """Lines whose replies are not written yet (held input counts as one)."""
        return len(self._fifo) + (self._events is not None)

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
        if self._step_call is not None:
            self._step_call.cancel()
            self._step_call = None
        self._events = None
        self._unread.clear()
        fifo = self._fifo
        self._fifo = []
        for slot in fifo:
            if slot.deferred is not None:
                slot.deferred.cancel()

    def send_buffer_full(self, *, full: bool) -> None:
        """The transport's send buffer filled or drained (from :class:`_SendBuffer`)."""
        self._send_full = full
        if not full and self._events is not None:
            self._schedule_step()

    # -- the per-line path ------------------------------------------------------

    def _schedule_step(self) -> None:
        """Go on with held input on the next reactor turn (state rule 7)."""
        if self._step_call is None and not self._lost:
            self._step_call = self._clock.callLater(0, self._next_step)

    def _next_step(self) -> None:
        self._step_call = None
        if not self._send_full:
            self._step()

    def _step(self) -> None:
        """Handle input until its replies pass the budget; write the ready ones.

        State rules 1 and 7: replies ready in order go out as one write; input
        left over stays held, reading pauses, and the next step comes on a later
        reactor turn once the transport's send buffer is not full.
        """
        batch: list[bytes] = []
        self._dispatching = True
        try:
            held = self._handle_input(batch)
        finally:
            self._dispatching = False
        # Slots whose Deferred fired during the loop follow the batch in line order.
        self._write_ready(batch)
        if held:
            self._schedule_step()
        self._update_reading()
        self._close_if_done()

    def _handle_input(self, batch: list[bytes]) -> bool:
        """Handle held events and reads in order; True if the budget ran out first."""
        budget = OUTPUT_PER_STEP
        while True:
            events = self._events
            if events is None:
                if not self._unread:
                    break
                events = self._events = self._framer.events(self._unread.pop(0))
            budget = self._dispatch_events(events, batch, budget)
            if budget <= 0:
                return True
            self._events = None
        if self._eof:
            # Every read is handled: the final unterminated line's turn.
            self._dispatch_events(iter(self._framer.end()), batch, budget)
        return False

    def _dispatch_events(self, events: Iterator[Event], batch: list[bytes], budget: int) -> int:
        """Call the handler for each event; ready replies go to ``batch`` or the FIFO.

        Stops, with events left, once the replies made ready have spent
        ``budget`` bytes; returns what is left of it (<= 0: spent).
        """
        handle = self._handler.handle_line
        info = self._settings.info_line
        fifo = self._fifo
        record = self.record
        for event in events:
            self._line_no += 1
            record.lines_in += 1
            if type(event) is not bytes:
                reply = self._line_too_long()
            elif info is not None and event.startswith(info) and event[len(info) :] in _ENDINGS:
                reply = self._info_reply(event)
            else:
                try:
                    result = handle(event)
                except Exception:
                    reply = self._handler_failed(event, Failure())
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
            if fifo:
                fifo.append(_Slot(reply))
            else:
                batch.append(reply)
            budget -= len(reply)
            if budget <= 0:
                break
        return budget

    def _line_too_long(self) -> bytes:
        """Count and log an overlong line; return its error reply (state rule 3)."""
        record = self.record
        record.overlong_lines += 1
        limit = self._settings.max_line_length
        self.log.info(
            "line {line_no} on connection {conn_id} exceeded {limit} bytes",
            event="line_too_long",
            conn_id=record.conn_id,
            line_no=self._line_no,
            limit=limit,
        )
        # Its terminator may not have come yet: the reply ends with LF.
        return error_reply(LINE_TOO_LONG, f"line exceeds {limit} bytes", LF)

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

    def _info_reply(self, line: bytes) -> bytes:
        """One JSON line describing the connection, ended like ``line``."""
        info = {**self.record.info(), **self._settings.info_fields}
        text = json.dumps(info, separators=(",", ":"), sort_keys=True)
        return text.encode() + (terminator_of(line) or LF)

    def _flush_ready(self) -> None:
        """A Deferred fired outside a step: write what became ready (state rule 1)."""
        self._write_ready([])
        self._update_reading()
        self._close_if_done()

    def _write_ready(self, batch: list[bytes]) -> None:
        """Write ``batch`` and then every ready reply at the head of the FIFO."""
        fifo = self._fifo
        ready = 0
        for slot in fifo:
            reply = slot.reply
            if reply is None:
                break
            batch.append(reply)
            ready += 1
        if ready:
            del fifo[:ready]
        if batch:
            self.record.lines_out += len(batch)
            self._write(batch)

    def _update_reading(self) -> None:
        """Pause reading while input is held or the FIFO is full (rules 4 and 7).

        Once paused by a full FIFO, reading resumes only when it is down to half,
        so that a client is not paused and resumed on every reply.
        """
        held = self._events is not None
        pending = len(self._fifo)
        max_pending = self._settings.max_pending
        transport: Any = self.transport
        if self._paused:
            if not held and 2 * pending <= max_pending:
                self._paused = False
                transport.resumeProducing()
        elif held or pending >= max_pending:
            self._paused = True
            transport.pauseProducing()

    def _handler_failed(self, line: bytes, failure: Failure, line_no: int | None = None) -> bytes:
        """Log a handler failure and return the error reply for its line."""
        record = self.record
        record.handler_errors += 1
        # Ended like its line; LF for a final line without a terminator.
        terminator = terminator_of(line) or LF
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
            error_type=type(failure.value).__name__,
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
        if self._input_ended and self._events is None and not self._fifo and not self._lost:
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
