"""Tests for :mod:`secure_echo.line.protocol`: ordering, errors, timeouts, backpressure, close."""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from secure_echo.line.handler import EchoHandler, IBatchLineHandler, ILineHandler
from secure_echo.line.protocol import (
    HANDLER_FAILED,
    HANDLER_TIMEOUT,
    LINE_TOO_LONG,
    OUTPUT_PER_STEP,
    LineFactory,
    LineProtocol,
    LineSettings,
    error_reply,
)
from secure_echo.tls.record import ConnectionRecord

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.logger import LogEvent
    from twisted.trial.unittest import TestCase

#: Hypothesis budget for protocol properties: each example runs a whole connection.
PROPERTY = settings(max_examples=200, deadline=None, database=None)

FAILED = b"-ERR handler-failed the line handler failed"
TIMED_OUT = b"-ERR handler-timeout no reply within 5 s"
TOO_LONG = b"-ERR line-too-long line exceeds 8 bytes"


class RecordingTransport(StringTransport):
    """A StringTransport that also keeps each write and each producer call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.producer_calls: list[str] = []

    def write(self, data: bytes) -> None:
        """Record the write as one call, then store it."""
        self.writes.append(data)
        super().write(data)

    def pauseProducing(self) -> None:
        """Record the pause, then pause."""
        self.producer_calls.append("pause")
        super().pauseProducing()

    def resumeProducing(self) -> None:
        """Record the resume, then resume."""
        self.producer_calls.append("resume")
        super().resumeProducing()


@implementer(ILineHandler)
class DeferredHandler:
    """Answers each line with a Deferred the test fires; records cancellations."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.deferreds: list[Deferred[bytes]] = []
        self.cancelled: list[bytes] = []

    def handle_line(self, line: bytes) -> Deferred[bytes]:
        """Return a new unfired Deferred whose cancellation is recorded."""

        def cancel(_: Deferred[bytes]) -> None:
            self.cancelled.append(line)

        deferred: Deferred[bytes] = Deferred(cancel)
        self.lines.append(line)
        self.deferreds.append(deferred)
        return deferred

    def echo(self, index: int) -> None:
        """Fire the Deferred of line ``index`` with the line itself."""
        self.deferreds[index].callback(self.lines[index])


@implementer(ILineHandler)
class CallHandler:
    """Delegates to a function, so a test can return anything at all."""

    def __init__(self, function: Callable[[bytes], object]) -> None:
        self.function = function
        self.lines: list[bytes] = []

    def handle_line(self, line: bytes) -> bytes | Deferred[bytes]:
        """Record the line and return whatever the function returns, unchecked."""
        self.lines.append(line)
        return self.function(line)  # type: ignore[return-value]


def connect(
    handler: ILineHandler,
    *,
    max_line_length: int = 8,
    max_pending: int = 256,
    handler_timeout: float = 5.0,
    info_line: bytes | None = None,
) -> tuple[LineProtocol, RecordingTransport, Clock]:
    """A LineProtocol connected to a recording transport, with a test clock."""
    clock = Clock()
    settings = LineSettings(
        max_line_length=max_line_length,
        max_pending=max_pending,
        handler_timeout=handler_timeout,
        info_line=info_line,
    )
    protocol = LineProtocol(handler, settings, clock, ConnectionRecord(7, "peer", "local", 0.0))
    transport = RecordingTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def capture_log(test: SynchronousTestCase) -> EventLoggingObserver:
    """Capture the global log publisher's events until ``test`` ends.

    ``createWithCleanup`` only needs ``addCleanup``, which SynchronousTestCase has;
    its annotation names trial's asynchronous ``TestCase`` alone.
    """
    return EventLoggingObserver.createWithCleanup(cast("TestCase", test), globalLogPublisher)


def events_named(observer: EventLoggingObserver, name: str) -> list[LogEvent]:
    """The captured log events whose ``event`` field is ``name``."""
    return [event for event in observer if event.get("event") == name]


class EchoTests(SynchronousTestCase):
    """Lines go out as the handler returns them, batched per read."""

    def test_echo_byte_exact(self) -> None:
        """Every line comes back byte for byte: LF, CRLF, lone CR, NUL, non-UTF-8."""
        protocol, transport, _ = connect(EchoHandler(), max_line_length=100)
        data = b"hello\r\n\x00\xff\xfe\n a\rb \n\n\r\n"
        protocol.dataReceived(data)
        self.assertEqual(transport.value(), data)

    def test_many_lines_one_write(self) -> None:
        """All lines completed by one read are written with a single write."""
        protocol, transport, _ = connect(EchoHandler())
        data = b"".join(b"line%d\n" % i for i in range(50))
        protocol.dataReceived(data)
        self.assertEqual(transport.writes, [data])

    def test_partial_line_waits(self) -> None:
        """Nothing is written until a line's LF arrives."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"abc")
        self.assertEqual(transport.writes, [])
        protocol.dataReceived(b"de\nf")
        self.assertEqual(transport.writes, [b"abcde\n"])

    def test_handler_sees_whole_lines(self) -> None:
        """The handler is called once per line, with its terminator."""
        handler = CallHandler(lambda line: line)
        protocol, _, _ = connect(handler)
        protocol.dataReceived(b"a\r\nb\n")
        protocol.dataReceived(b"c")
        protocol.readConnectionLost()
        self.assertEqual(handler.lines, [b"a\r\n", b"b\n", b"c"])


class OrderingTests(SynchronousTestCase):
    """Replies leave in line order whatever order handlers finish in."""

    def test_reverse_order_deferreds(self) -> None:
        """Deferreds fired last-first still give replies first-first, in one write."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler)
        protocol.dataReceived(b"one\ntwo\nthree\n")
        handler.echo(2)
        handler.echo(1)
        self.assertEqual(transport.value(), b"")
        handler.echo(0)
        self.assertEqual(transport.writes, [b"one\ntwo\nthree\n"])

    def test_head_written_as_soon_as_ready(self) -> None:
        """A ready head is written at once; a later reply waits for those before it."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler)
        protocol.dataReceived(b"a\nb\nc\n")
        handler.echo(0)
        self.assertEqual(transport.writes, [b"a\n"])
        handler.echo(2)
        self.assertEqual(transport.writes, [b"a\n"])
        handler.echo(1)
        self.assertEqual(transport.writes, [b"a\n", b"b\nc\n"])

    def test_sync_reply_waits_behind_pending(self) -> None:
        """A synchronous reply after a pending one is held until the pending one is."""
        slow: list[Deferred[bytes]] = []

        def handle(line: bytes) -> bytes | Deferred[bytes]:
            if line.startswith(b"slow"):
                slow.append(Deferred())
                return slow[-1]
            return line

        protocol, transport, _ = connect(CallHandler(handle))
        protocol.dataReceived(b"first\nslow\nfast\n")
        self.assertEqual(transport.value(), b"first\n")
        protocol.dataReceived(b"later\n")
        self.assertEqual(transport.value(), b"first\n")
        slow[0].callback(b"SLOW\n")
        self.assertEqual(transport.value(), b"first\nSLOW\nfast\nlater\n")

    def test_already_fired_deferreds(self) -> None:
        """Deferreds that have already fired are written, in order, in the read's write."""
        handler = CallHandler(lambda line: succeed(line.upper()))
        protocol, transport, _ = connect(handler)
        protocol.dataReceived(b"a\nb\n")
        self.assertEqual(transport.writes, [b"A\nB\n"])
        protocol.dataReceived(b"c\n")
        self.assertEqual(transport.writes, [b"A\nB\n", b"C\n"])
        self.assertEqual(protocol.record.lines_out, 3)

    def test_already_fired_between_sync_replies(self) -> None:
        """Sync, fired-Deferred and sync replies from one read keep their order."""

        def handle(line: bytes) -> bytes | Deferred[bytes]:
            return succeed(line) if line.startswith(b"d") else line

        protocol, transport, _ = connect(CallHandler(handle))
        protocol.dataReceived(b"s1\nd2\ns3\nd4\n")
        self.assertEqual(transport.writes, [b"s1\nd2\ns3\nd4\n"])

    def test_deferred_fired_by_later_line(self) -> None:
        """A pending Deferred fired from inside a later handler call keeps its place.

        The earlier synchronous reply (still in the read's batch) goes out first.
        """
        pending: list[tuple[bytes, Deferred[bytes]]] = []

        def handle(line: bytes) -> bytes | Deferred[bytes]:
            if line == b"go\n":
                for waiting, deferred in pending:
                    deferred.callback(waiting)
                return line
            if line.startswith(b"wait"):
                pending.append((line, Deferred()))
                return pending[-1][1]
            return line

        protocol, transport, _ = connect(CallHandler(handle))
        protocol.dataReceived(b"a\nwait\ngo\nz\n")
        self.assertEqual(transport.writes, [b"a\nwait\ngo\nz\n"])


class HandlerFailureTests(SynchronousTestCase):
    """A failing handler yields ``-ERR handler-failed`` in its slot and a log event."""

    def setUp(self) -> None:
        self.observer = capture_log(self)

    def assert_failed_event(self, line_no: int, error_type: str, error: str) -> None:
        """Exactly one ``handler_failed`` event, at error level, for ``line_no``."""
        [event] = events_named(self.observer, "handler_failed")
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual(event["conn_id"], 7)
        self.assertEqual(event["line_no"], line_no)
        self.assertEqual(event["error_type"], error_type)
        self.assertIn(error, event["error"])
        self.assertIsInstance(event["log_failure"], Failure)

    def test_handler_raises(self) -> None:
        """A raising handler gets an error reply in its slot; the next line is echoed."""

        def handle(line: bytes) -> bytes:
            if line.startswith(b"boom"):
                raise ValueError("kaput")
            return line

        protocol, transport, _ = connect(CallHandler(handle))
        protocol.dataReceived(b"a\nboom\nb\n")
        self.assertEqual(transport.value(), b"a\n" + FAILED + b"\nb\n")
        self.assert_failed_event(2, "ValueError", "kaput")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        protocol.dataReceived(b"c\n")
        self.assertEqual(transport.value(), b"a\n" + FAILED + b"\nb\nc\n")
        self.assertEqual(protocol.record.handler_errors, 1)
        self.assertFalse(transport.disconnecting)

    def test_deferred_fails(self) -> None:
        """A failed Deferred gets an error reply in its slot, after the lines before it."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler)
        protocol.dataReceived(b"a\nb\nc\n")
        handler.echo(2)
        handler.deferreds[1].errback(RuntimeError("backend down"))
        self.assertEqual(transport.value(), b"")
        handler.echo(0)
        self.assertEqual(transport.value(), b"a\n" + FAILED + b"\nc\n")
        self.assert_failed_event(2, "RuntimeError", "backend down")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(protocol.record.handler_errors, 1)

    def test_already_failed_deferred(self) -> None:
        """A Deferred that has already failed gets its error reply at once."""
        protocol, transport, _ = connect(CallHandler(lambda _: fail(KeyError("k"))))
        protocol.dataReceived(b"x\r\n")
        self.assertEqual(transport.value(), FAILED + b"\r\n")
        self.assert_failed_event(1, "KeyError", "k")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_non_bytes_reply(self) -> None:
        """A handler returning something other than bytes (here str) has failed."""
        protocol, transport, _ = connect(CallHandler(lambda line: line.decode()))
        protocol.dataReceived(b"text\n")
        self.assertEqual(transport.value(), FAILED + b"\n")
        self.assert_failed_event(1, "TypeError", "handler returned str")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_non_bytes_from_deferred(self) -> None:
        """A Deferred firing with something other than bytes has failed too."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler)
        protocol.dataReceived(b"a\nb\n")
        handler.deferreds[0].callback(None)  # type: ignore[arg-type]
        handler.echo(1)
        self.assertEqual(transport.value(), FAILED + b"\nb\n")
        self.assert_failed_event(1, "TypeError", "handler returned NoneType")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_error_reply_terminators(self) -> None:
        """Error replies end like their line: CRLF, LF, or LF for a final line."""

        def handle(_: bytes) -> bytes:
            raise ValueError

        protocol, transport, _ = connect(CallHandler(handle))
        protocol.dataReceived(b"crlf\r\nlf\nfinal")
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), FAILED + b"\r\n" + FAILED + b"\n" + FAILED + b"\n")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 3)


class TimeoutTests(SynchronousTestCase):
    """A handler that does not answer within ``handler_timeout`` is cancelled."""

    def setUp(self) -> None:
        self.observer = capture_log(self)

    def test_timeout(self) -> None:
        """After exactly the timeout, the Deferred is cancelled and the slot times out."""
        handler = DeferredHandler()
        protocol, transport, clock = connect(handler, handler_timeout=5)
        protocol.dataReceived(b"slow\r\n")
        clock.advance(4.999)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(handler.cancelled, [])
        clock.advance(0.001)
        self.assertEqual(handler.cancelled, [b"slow\r\n"])
        self.assertEqual(transport.value(), TIMED_OUT + b"\r\n")
        [event] = events_named(self.observer, "handler_timeout")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual((event["conn_id"], event["line_no"], event["timeout"]), (7, 1, 5))
        self.assertEqual(events_named(self.observer, "handler_failed"), [])
        self.assertEqual(protocol.record.handler_errors, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connection_usable_after_timeout(self) -> None:
        """After a timeout the next line is handled normally."""
        handler = DeferredHandler()
        protocol, transport, clock = connect(handler)
        protocol.dataReceived(b"a\n")
        clock.advance(5)
        protocol.dataReceived(b"b\n")
        handler.echo(1)
        self.assertEqual(transport.value(), TIMED_OUT + b"\nb\n")

    def test_timeout_keeps_order(self) -> None:
        """Lines answered in time wait behind a head that then times out."""
        handler = DeferredHandler()
        protocol, transport, clock = connect(handler)
        protocol.dataReceived(b"a\n")
        clock.advance(2)
        protocol.dataReceived(b"b\n")
        handler.echo(1)
        self.assertEqual(transport.value(), b"")
        clock.advance(3)
        self.assertEqual(transport.value(), TIMED_OUT + b"\nb\n")

    def test_each_line_has_its_own_timer(self) -> None:
        """The timeout runs from each line's arrival, not from the first's."""
        handler = DeferredHandler()
        protocol, transport, clock = connect(handler)
        protocol.dataReceived(b"a\n")
        clock.advance(3)
        protocol.dataReceived(b"b\n")
        clock.advance(2)
        self.assertEqual(handler.cancelled, [b"a\n"])
        self.assertEqual(transport.value(), TIMED_OUT + b"\n")
        clock.advance(3)
        self.assertEqual(handler.cancelled, [b"a\n", b"b\n"])
        self.assertEqual(transport.value(), TIMED_OUT + b"\n" + TIMED_OUT + b"\n")

    def test_reply_in_time_cancels_timer(self) -> None:
        """A reply before the timeout leaves no timer behind and nothing more to write."""
        handler = DeferredHandler()
        protocol, transport, clock = connect(handler)
        protocol.dataReceived(b"a\n")
        clock.advance(4)
        handler.echo(0)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)
        self.assertEqual(transport.value(), b"a\n")
        self.assertEqual(handler.cancelled, [])
        self.assertEqual(protocol.record.handler_errors, 0)

    def test_fractional_timeout_text(self) -> None:
        """The error text states the configured timeout compactly."""
        protocol, transport, clock = connect(DeferredHandler(), handler_timeout=0.25)
        protocol.dataReceived(b"a\n")
        clock.advance(0.25)
        self.assertEqual(transport.value(), b"-ERR handler-timeout no reply within 0.25 s\n")

    def test_sync_handler_never_times_out(self) -> None:
        """Synchronous replies start no timer."""
        protocol, _, clock = connect(EchoHandler())
        protocol.dataReceived(b"a\nb\n")
        self.assertEqual(clock.getDelayedCalls(), [])


class OverlongTests(SynchronousTestCase):
    """An overlong line yields ``-ERR line-too-long`` in its slot and a log event.

    The reply is due as soon as the line crosses the limit; the rest of the line
    is dropped up to its LF.
    """

    def setUp(self) -> None:
        self.observer = capture_log(self)

    def test_overlong_in_pipeline(self) -> None:
        """An overlong line between pending ones keeps its place; the handler never sees it."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler)
        protocol.dataReceived(b"a\n" + b"x" * 20 + b"\nb\n")
        self.assertEqual(handler.lines, [b"a\n", b"b\n"])
        handler.echo(1)
        self.assertEqual(transport.value(), b"")
        handler.echo(0)
        self.assertEqual(transport.value(), b"a\n" + TOO_LONG + b"\nb\n")
        [event] = events_named(self.observer, "line_too_long")
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual((event["conn_id"], event["line_no"], event["limit"]), (7, 2, 8))
        self.assertNotIn("length", event)
        self.assertEqual(protocol.record.overlong_lines, 1)

    def test_overlong_sync(self) -> None:
        """With a synchronous handler the error reply joins the read's single write."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"a\n" + b"x" * 9 + b"\nb\n")
        self.assertEqual(transport.writes, [b"a\n" + TOO_LONG + b"\nb\n"])

    def test_reply_before_the_terminator(self) -> None:
        """The reply goes out with the read that crosses the limit, not with the LF."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"12345678")
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"9")
        self.assertEqual(transport.value(), TOO_LONG + b"\n")
        self.assertEqual(protocol.record.overlong_lines, 1)
        protocol.dataReceived(b"y" * 100)
        protocol.dataReceived(b"\r\nok\r\n")
        self.assertEqual(transport.value(), TOO_LONG + b"\nok\r\n")
        self.assertEqual(protocol.record.overlong_lines, 1)
        self.assertEqual(protocol.record.lines_in, 2)

    def test_reply_always_ends_with_lf(self) -> None:
        """The error reply ends with LF even when the line ends with CRLF."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"y" * 100)
        protocol.dataReceived(b"\r\nok\r\n")
        self.assertEqual(transport.value(), TOO_LONG + b"\nok\r\n")

    def test_batch_read_ending_in_overlong_start(self) -> None:
        """A read of short lines and then the start of an overlong line answers both."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"a\n" + b"x" * 9)
        self.assertEqual(transport.value(), b"a\n" + TOO_LONG + b"\n")
        protocol.dataReceived(b"x\nb\n")
        self.assertEqual(transport.value(), b"a\n" + TOO_LONG + b"\nb\n")
        self.assertEqual(
            (protocol.record.lines_in, protocol.record.lines_out, protocol.record.overlong_lines),
            (3, 3, 1),
        )

    def test_waits_behind_a_pending_reply(self) -> None:
        """Crossing the limit behind a pending asynchronous reply keeps the order."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler)
        protocol.dataReceived(b"a\n" + b"x" * 30)
        self.assertEqual(transport.value(), b"")
        handler.echo(0)
        self.assertEqual(transport.value(), b"a\n" + TOO_LONG + b"\n")

    def test_counted_when_the_terminator_never_comes(self) -> None:
        """A line cut off by the connection's loss is counted and was answered."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"x" * 30)
        protocol.connectionLost(None)
        self.assertEqual(transport.value(), TOO_LONG + b"\n")
        self.assertEqual(protocol.record.overlong_lines, 1)
        self.assertEqual(len(events_named(self.observer, "line_too_long")), 1)

    def test_split_after_cr_at_the_limit(self) -> None:
        """Limit bytes and a CR in one read, a non-LF byte in the next: one error reply."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"12345678\r")
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"x\r")
        self.assertEqual(transport.value(), TOO_LONG + b"\n")
        protocol.dataReceived(b"\nok\n")
        self.assertEqual(transport.value(), TOO_LONG + b"\nok\n")

    def test_limit_is_exact(self) -> None:
        """Content of exactly the limit is echoed; one byte more is refused."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"12345678\r\n123456789\n")
        self.assertEqual(transport.value(), b"12345678\r\n" + TOO_LONG + b"\n")
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"12345678\r")
        protocol.dataReceived(b"\n")
        self.assertEqual(transport.value(), b"12345678\r\n")

    def test_overlong_final_line(self) -> None:
        """An overlong unterminated final line is refused, then the connection closes."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"12345678\r")
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), TOO_LONG + b"\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(events_named(self.observer, "line_too_long")), 1)

    def test_overlong_then_end_of_input(self) -> None:
        """A line answered when it crossed the limit gets no second reply at the end."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"z" * 20)
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), TOO_LONG + b"\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.record.lines_in, 1)


def info_reply_size() -> int:
    """The length of one info reply of :func:`connect`'s record (LF-terminated)."""
    protocol, transport, _ = connect(EchoHandler(), info_line=b"I")
    protocol.dataReceived(b"I\n")
    return len(transport.value())


class FillingTransport(RecordingTransport):
    """A transport whose send buffer fills: it pauses its producer past ``size`` unsent.

    ``drain()`` plays the client reading everything: the buffer empties and the
    producer is resumed, as Twisted's stream transports do.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.unsent = 0
        self.full = False

    def write(self, data: bytes) -> None:
        """Store the write; past ``size`` unsent bytes, pause the producer once."""
        super().write(data)
        self.unsent += len(data)
        if self.unsent > self.size and not self.full and self.producer is not None:
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        """Everything written was sent: resume the producer if it was paused."""
        self.unsent = 0
        if self.full and self.producer is not None:
            self.full = False
            self.producer.resumeProducing()


class OutputBoundTests(SynchronousTestCase):
    """State rule 7: one read cannot make more than a step's worth of replies at once."""

    def setUp(self) -> None:
        self.reply = info_reply_size()
        # Enough info lines for more than three steps.
        self.count = 3 * OUTPUT_PER_STEP // self.reply + 10
        self.protocol, self.transport, self.clock = connect(EchoHandler(), info_line=b"I")

    def assert_steps(self, writes: list[bytes]) -> None:
        """Every write but the last is one step: the budget plus less than one reply."""
        for write in writes[:-1]:
            self.assertGreaterEqual(len(write), OUTPUT_PER_STEP)
            self.assertLess(len(write), OUTPUT_PER_STEP + self.reply)
        self.assertLess(len(writes[-1]), OUTPUT_PER_STEP + self.reply)

    def run_steps(self, clock: Clock | None = None) -> None:
        """Run the reactor turns until no step is scheduled."""
        clock = clock or self.clock
        while clock.getDelayedCalls():
            clock.advance(0)

    def test_read_of_info_lines_is_answered_in_steps(self) -> None:
        """A read asking for 3+ steps of output gets one step now, the rest on later turns."""
        self.protocol.dataReceived(b"I\n" * self.count)
        self.assertEqual(len(self.transport.writes), 1)
        self.assert_steps([*self.transport.writes, b""])
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(self.protocol.pending, 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.run_steps()
        self.assertEqual(len(self.transport.writes), 4)
        self.assert_steps(self.transport.writes)
        self.assertEqual(len(self.transport.value()), self.count * self.reply)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.transport.producer_calls, ["pause", "resume"])
        self.assertEqual(self.protocol.pending, 0)
        record = self.protocol.record
        self.assertEqual((record.lines_in, record.lines_out), (self.count, self.count))

    def test_full_send_buffer_holds_the_next_step(self) -> None:
        """While the transport's send buffer is full no step runs; one runs per drain."""
        settings = LineSettings(max_line_length=8, info_line=b"I")
        protocol = LineProtocol(
            EchoHandler(), settings, self.clock, ConnectionRecord(7, "peer", "local", 0.0)
        )
        transport = FillingTransport(65536)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"I\n" * self.count)
        for steps in range(1, 4):
            self.assertEqual(len(transport.writes), steps)
            self.run_steps()
            self.assertEqual(len(transport.writes), steps)
            self.assertEqual(transport.producerState, "paused")
            transport.drain()
            self.assertEqual(len(transport.writes), steps, "the step waits for a reactor turn")
            self.run_steps()
        self.assert_steps(transport.writes)
        self.assertEqual(len(transport.value()), self.count * self.reply)
        self.assertEqual(transport.producerState, "producing")

    def test_drain_signal_without_held_input(self) -> None:
        """A send buffer that drains with nothing held schedules nothing."""
        producer = self.transport.producer
        assert producer is not None
        producer.pauseProducing()
        producer.resumeProducing()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.protocol.dataReceived(b"I\n" * self.count)
        producer.resumeProducing()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_full_send_buffer_after_scheduling(self) -> None:
        """A buffer that fills after the next step was scheduled still holds it."""
        producer = self.transport.producer
        assert producer is not None
        self.protocol.dataReceived(b"I\n" * self.count)
        written = len(self.transport.value())
        producer.pauseProducing()
        self.clock.advance(0)
        self.assertEqual(len(self.transport.value()), written)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        producer.resumeProducing()
        self.run_steps()
        self.assertEqual(len(self.transport.value()), self.count * self.reply)

    def test_later_reads_wait_their_turn(self) -> None:
        """A read that arrives while input is held is answered after it, in order."""
        self.protocol.dataReceived(b"I\n" * self.count)
        self.protocol.dataReceived(b"after\n")
        self.protocol.dataReceived(b"I\nlast\n")
        self.run_steps()
        value = self.transport.value()
        self.assertEqual(len(value), (self.count + 1) * self.reply + len(b"after\nlast\n"))
        self.assertTrue(value.endswith(b"after\n" + value[: self.reply] + b"last\n"))
        self.assertEqual(self.protocol.record.lines_in, self.count + 3)

    def test_end_of_input_while_held(self) -> None:
        """The final unterminated line is answered after the held lines, then it closes."""
        self.protocol.dataReceived(b"I\n" * self.count)
        self.protocol.dataReceived(b"tail")
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        while self.clock.getDelayedCalls():
            self.assertFalse(self.transport.disconnecting)
            self.clock.advance(0)
        self.assertTrue(self.transport.value().endswith(b"}\ntail"))
        self.assertEqual(len(self.transport.value()), self.count * self.reply + 4)
        self.assertTrue(self.transport.disconnecting)

    def test_drain_while_held(self) -> None:
        """A drain answers the held lines, not an unfinished one, then closes."""
        self.protocol.dataReceived(b"I\n" * self.count + b"unfin")
        self.protocol.drain()
        self.assertFalse(self.transport.disconnecting)
        self.run_steps()
        self.assertEqual(len(self.transport.value()), self.count * self.reply)
        self.assertTrue(self.transport.disconnecting)

    def test_connection_lost_while_held(self) -> None:
        """A lost connection drops held input and its next step."""
        self.protocol.dataReceived(b"I\n" * self.count)
        written = len(self.transport.value())
        self.protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.protocol.pending, 0)
        self.protocol.send_buffer_full(full=False)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.protocol.dataReceived(b"I\n")
        self.assertEqual(len(self.transport.value()), written)

    def test_reads_within_budget_take_no_step(self) -> None:
        """A read whose replies fit the budget schedules nothing and never pauses."""
        self.protocol.dataReceived(b"I\n" * 100 + b"x" * 7)
        self.protocol.dataReceived(b"\n" + b"echo\n" * 1000)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.transport.producer_calls, [])
        self.assertEqual(len(self.transport.writes), 2)

    def test_budget_spans_reads_of_one_step(self) -> None:
        """Held reads handled in one step share its budget: one write per step."""
        half = OUTPUT_PER_STEP // 2 // self.reply + 1
        self.protocol.dataReceived(b"I\n" * self.count)
        self.protocol.dataReceived(b"I\n" * half)
        self.protocol.dataReceived(b"I\n" * half)
        self.run_steps()
        total = self.count + 2 * half
        per_step = -(-OUTPUT_PER_STEP // self.reply)
        self.assertEqual(len(self.transport.value()), total * self.reply)
        self.assertEqual(len(self.transport.writes), -(-total // per_step))
        self.assert_steps(self.transport.writes)

    def test_pending_async_reply_and_budget(self) -> None:
        """Replies queued behind a pending asynchronous one count against the step too."""
        handler = DeferredHandler()
        protocol, transport, clock = connect(handler, info_line=b"I")
        protocol.dataReceived(b"a\n" + b"I\n" * self.count)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(protocol.pending, 2 + -(-OUTPUT_PER_STEP // self.reply))
        handler.echo(0)
        self.assertTrue(transport.value().startswith(b"a\n"))
        self.assertLess(len(transport.value()), OUTPUT_PER_STEP + self.reply + 2)
        self.run_steps(clock)
        self.assertEqual(len(transport.value()), 2 + self.count * self.reply)

    def replies_per_step(self, size: int) -> list[int]:
        """How many replies of ``size`` bytes each step writes, for 12 short lines."""
        protocol, transport, clock = connect(CallHandler(lambda _: b"r" * size))
        protocol.dataReceived(b"x\n" * 12)
        self.run_steps(clock)
        return [len(write) // size for write in transport.writes]

    def test_step_ends_when_the_budget_is_spent_exactly(self) -> None:
        """Replies that spend the budget exactly end the step; the next line waits."""
        self.assertEqual(self.replies_per_step(OUTPUT_PER_STEP // 4), [4, 4, 4])

    def test_step_goes_on_while_a_byte_is_left(self) -> None:
        """A budget with one byte left still takes the next reply."""
        self.assertEqual(self.replies_per_step(OUTPUT_PER_STEP - 1), [2, 2, 2, 2, 2, 2])

    def test_read_answered_with_a_byte_left_holds_nothing(self) -> None:
        """A read whose replies leave one byte of the budget needs no further step."""
        protocol, transport, clock = connect(CallHandler(lambda _: b"r" * (OUTPUT_PER_STEP - 1)))
        protocol.dataReceived(b"x\n")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(transport.producer_calls, [])
        self.assertEqual(protocol.pending, 0)

    def test_producer_ignores_stop(self) -> None:
        """``stopProducing`` changes nothing: ``connectionLost`` does the cleanup."""
        producer = self.transport.producer
        assert producer is not None
        self.protocol.dataReceived(b"I\n" * self.count)
        producer.stopProducing()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)


class InfoLineTests(SynchronousTestCase):
    """The info line's reply, and what counts as the info line."""

    def test_behind_a_pending_reply(self) -> None:
        """An info reply waits behind a pending asynchronous reply, in line order."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler, info_line=b"I")
        protocol.dataReceived(b"a\nI\n")
        self.assertEqual(transport.value(), b"")
        handler.echo(0)
        value = transport.value()
        self.assertTrue(value.startswith(b"a\n{"), value)
        self.assertTrue(value.endswith(b"}\n"), value)
        self.assertEqual(value.count(b"\n"), 2)

    def test_only_exact_content(self) -> None:
        """Only the exact content with LF, CRLF or no terminator is the info line.

        The reply ends with the line's terminator, LF for a final line without one.
        """
        protocol, transport, _ = connect(EchoHandler(), info_line=b"INFO")
        protocol.dataReceived(b"INFOX\nINF\nXINFO\nINFO\rx\n")
        self.assertEqual(transport.value(), b"INFOX\nINF\nXINFO\nINFO\rx\n")
        protocol.dataReceived(b"INFO\r\n")
        self.assertTrue(transport.value().endswith(b"}\r\n"))
        protocol.dataReceived(b"INFO")
        protocol.readConnectionLost()
        replies = transport.value().split(b"INFO\rx\n", 1)[1]
        first, second = replies.split(b"}\r\n")
        self.assertTrue(first.startswith(b"{"), first)
        self.assertTrue(second.startswith(b"{"), second)
        self.assertTrue(second.endswith(b"}\n"), "LF ends the reply to a final line")
        self.assertFalse(second.endswith(b"\r\n"))


class MessageTests(SynchronousTestCase):
    """What the log says and counts in words, and the info reply's exact form."""

    def setUp(self) -> None:
        self.observer = capture_log(self)

    def rendered(self, name: str) -> list[str]:
        """The text-log rendering of each captured event called ``name``."""
        return [formatEvent(event) for event in events_named(self.observer, name)]

    def test_overlong_lines_counted_and_told(self) -> None:
        """Each overlong line adds one to the count and one readable log line."""
        protocol, _, _ = connect(EchoHandler())
        protocol.dataReceived(b"x" * 20 + b"\nok\n" + b"y" * 20 + b"\n")
        self.assertEqual(protocol.record.overlong_lines, 2)
        self.assertEqual(
            self.rendered("line_too_long"),
            [
                "line 1 on connection 7 exceeded 8 bytes",
                "line 3 on connection 7 exceeded 8 bytes",
            ],
        )

    def test_handler_messages(self) -> None:
        """A timeout and a failure each read as a sentence naming line and connection."""
        handler = DeferredHandler()
        protocol, _, clock = connect(handler, handler_timeout=2.0)
        protocol.dataReceived(b"a\nb\n")
        handler.deferreds[1].callback(42)  # type: ignore[arg-type]
        clock.advance(2)
        self.assertEqual(
            self.rendered("handler_timeout"),
            ["handler for line 1 on connection 7 timed out after 2.0 s"],
        )
        self.assertEqual(
            self.rendered("handler_failed")[0].splitlines()[0],
            "handler failed for line 2 on connection 7",
        )
        [failed] = events_named(self.observer, "handler_failed")
        self.assertEqual(failed["error"], "handler returned int")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_info_reply_is_compact_with_sorted_keys(self) -> None:
        """The info reply is one compact JSON object whose keys are in sorted order."""
        protocol, transport, _ = connect(EchoHandler(), info_line=b"I")
        protocol.dataReceived(b"I\n")
        reply = transport.value()
        self.assertNotIn(b", ", reply)
        self.assertNotIn(b": ", reply)
        keys = list(json.loads(reply))
        self.assertEqual(keys, sorted(keys))
        self.assertEqual(len(keys), len(protocol.record.info()))

    def test_step_budget_is_256_kib(self) -> None:
        """The budget docs/protocol.md states."""
        self.assertEqual(OUTPUT_PER_STEP, 262144)


class BackpressureTests(SynchronousTestCase):
    """Reading pauses when ``max_pending`` replies wait and resumes at half."""

    def test_pause_and_resume_at_half(self) -> None:
        """Paused at 4 waiting replies, still paused at 3, resumed at 2."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler, max_pending=4)
        protocol.dataReceived(b"a\nb\nc\n")
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"d\n")
        self.assertEqual(transport.producerState, "paused")
        handler.echo(0)
        self.assertEqual(transport.producerState, "paused")
        handler.echo(1)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(transport.producer_calls, ["pause", "resume"])

    def test_replies_behind_pending_head_count(self) -> None:
        """Ready replies stuck behind a pending head count as waiting."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler, max_pending=4)
        protocol.dataReceived(b"a\nb\nc\nd\n")
        for index in (3, 2, 1):
            handler.echo(index)
            self.assertEqual(transport.producerState, "paused")
        handler.echo(0)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(transport.value(), b"a\nb\nc\nd\n")

    def test_pause_once(self) -> None:
        """More lines while paused do not pause again; one resume follows."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler, max_pending=2)
        protocol.dataReceived(b"a\nb\n")
        protocol.dataReceived(b"c\nd\ne\n")
        self.assertEqual(transport.producer_calls, ["pause"])
        for index in range(5):
            handler.echo(index)
        self.assertEqual(transport.producer_calls, ["pause", "resume"])
        self.assertEqual(transport.value(), b"a\nb\nc\nd\ne\n")

    def test_sync_replies_never_pause(self) -> None:
        """Replies written at once never count as waiting."""
        protocol, transport, _ = connect(EchoHandler(), max_pending=1)
        protocol.dataReceived(b"a\n" * 10)
        self.assertEqual(transport.producer_calls, [])


class EndOfInputTests(SynchronousTestCase):
    """``readConnectionLost``: answer everything, then close."""

    def test_final_line_answered_then_closed(self) -> None:
        """A final unterminated line is echoed as it is, then the connection closes."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.dataReceived(b"a\nfinal")
        self.assertFalse(transport.disconnecting)
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), b"a\nfinal")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.record.lines_in, 2)

    def test_close_waits_for_pending(self) -> None:
        """The connection closes only once every pending reply is written."""
        handler = DeferredHandler()
        protocol, transport, _ = connect(handler)
        protocol.dataReceived(b"a\nb")
        protocol.readConnectionLost()
        self.assertEqual(handler.lines, [b"a\n", b"b"])
        handler.echo(1)
        self.assertFalse(transport.disconnecting)
        handler.echo(0)
        self.assertEqual(transport.value(), b"a\nb")
        self.assertTrue(transport.disconnecting)

    def test_close_after_timeout(self) -> None:
        """A handler that never answers delays the close only until its timeout."""
        protocol, transport, clock = connect(DeferredHandler())
        protocol.dataReceived(b"a\n")
        protocol.readConnectionLost()
        clock.advance(4)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertEqual(transport.value(), TIMED_OUT + b"\n")
        self.assertTrue(transport.disconnecting)

    def test_nothing_pending_closes_at_once(self) -> None:
        """With every line answered and no final bytes, the close is immediate."""
        handler = CallHandler(lambda line: line)
        protocol, transport, _ = connect(handler)
        protocol.dataReceived(b"a\n")
        protocol.readConnectionLost()
        self.assertEqual(handler.lines, [b"a\n"])
        self.assertEqual(transport.value(), b"a\n")
        self.assertTrue(transport.disconnecting)

    def test_write_connection_lost_is_harmless(self) -> None:
        """``writeConnectionLost`` changes nothing."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.writeConnectionLost()
        protocol.dataReceived(b"a\n")
        self.assertEqual(transport.value(), b"a\n")
        self.assertFalse(transport.disconnecting)


class ConnectionLostTests(SynchronousTestCase):
    """After ``connectionLost`` nothing is written and pending work is cancelled."""

    def setUp(self) -> None:
        self.observer = capture_log(self)

    def test_cancels_pending(self) -> None:
        """Every pending Deferred is cancelled, quietly, and its timer stopped."""
        handler = DeferredHandler()
        protocol, transport, clock = connect(handler)
        protocol.dataReceived(b"a\nb\nc\n")
        handler.echo(1)
        protocol.connectionLost(None)
        self.assertEqual(handler.cancelled, [b"a\n", b"c\n"])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(events_named(self.observer, "handler_timeout"), [])
        self.assertEqual(protocol.record.handler_errors, 0)

    def test_late_reply_not_written(self) -> None:
        """A handler answering after the loss writes nothing."""
        late: list[Deferred[bytes]] = []

        def handle(_: bytes) -> Deferred[bytes]:
            late.append(Deferred())  # no canceller: cancel() just errbacks it
            return late[-1]

        protocol, transport, _ = connect(CallHandler(handle))
        protocol.dataReceived(b"a\n")
        protocol.connectionLost(None)
        late[0].callback(b"too late\n")
        self.assertEqual(transport.value(), b"")

    def test_nothing_written_for_later_reads(self) -> None:
        """Lines read after the loss get no reply and no close."""
        protocol, transport, _ = connect(EchoHandler())
        protocol.connectionLost(None)
        protocol.dataReceived(b"a\nb")
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_without_transport(self) -> None:
        """A protocol never connected writes and closes nothing (and does not crash)."""
        protocol = LineProtocol(
            EchoHandler(), LineSettings(), Clock(), ConnectionRecord(1, "p", "l", 0.0)
        )
        protocol.dataReceived(b"a\n")
        protocol.readConnectionLost()
        self.assertEqual(protocol.record.lines_in, 1)


class RecordTests(SynchronousTestCase):
    """The protocol keeps the ConnectionRecord's line counters."""

    def test_counters(self) -> None:
        """lines_in, lines_out, overlong_lines and handler_errors count what happened."""

        def handle(line: bytes) -> bytes | Deferred[bytes]:
            if line.startswith(b"boom"):
                raise ValueError
            if line.startswith(b"slow"):
                return Deferred()
            return line

        protocol, _, clock = connect(CallHandler(handle))
        record = protocol.record
        protocol.dataReceived(b"ok\nboom\n" + b"x" * 9 + b"\nslow\nok\n")
        self.assertEqual(
            (record.lines_in, record.lines_out, record.overlong_lines, record.handler_errors),
            (5, 3, 1, 1),
        )
        clock.advance(5)
        self.assertEqual(
            (record.lines_in, record.lines_out, record.overlong_lines, record.handler_errors),
            (5, 5, 1, 2),
        )
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class FactoryTests(SynchronousTestCase):
    """LineFactory, LineSettings and error_reply."""

    def test_build(self) -> None:
        """Each build is a fresh protocol with the given record and the shared settings."""
        handler = DeferredHandler()
        settings = LineSettings(max_line_length=3, max_pending=2, handler_timeout=1)
        clock = Clock()
        factory = LineFactory(handler, settings, clock)
        first = factory.build(ConnectionRecord(1, "p", "l", 0.0))
        second = factory.build(ConnectionRecord(2, "p", "l", 0.0))
        self.assertIsNot(first, second)
        self.assertEqual((first.record.conn_id, second.record.conn_id), (1, 2))
        transport = StringTransport()
        first.makeConnection(transport)
        first.dataReceived(b"abcd\nab\n")
        self.assertEqual(handler.lines, [b"ab\n"])
        clock.advance(1)
        self.assertEqual(
            transport.value(),
            b"-ERR line-too-long line exceeds 3 bytes\n-ERR handler-timeout no reply within 1 s\n",
        )

    def test_settings_defaults(self) -> None:
        """Defaults: 64 KiB lines, 256 waiting replies, 30 s handler timeout."""
        settings = LineSettings()
        self.assertEqual(
            (settings.max_line_length, settings.max_pending, settings.handler_timeout),
            (65536, 256, 30.0),
        )

    def test_error_reply(self) -> None:
        """``-ERR <token> <text>`` plus the terminator it is given."""
        self.assertEqual(error_reply(LINE_TOO_LONG, "t", b"\r\n"), b"-ERR line-too-long t\r\n")
        self.assertEqual(error_reply(HANDLER_FAILED, "t", b"\n"), b"-ERR handler-failed t\n")
        self.assertEqual(error_reply(HANDLER_TIMEOUT, "t", b""), b"-ERR handler-timeout t")


@st.composite
def split_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """Bytes rich in LF and CR, and the same bytes cut at arbitrary points."""
    atoms = st.one_of(st.sampled_from([b"\n", b"\r\n", b"\r", b"\x00"]), st.binary(max_size=6))
    data = b"".join(draw(st.lists(atoms, max_size=40)))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=10))))
    points = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(points)]


class PropertyTests(SynchronousTestCase):
    """Hypothesis: whole connections, any input."""

    @PROPERTY
    @given(split_streams())
    def test_echo_is_identity(self, stream: tuple[bytes, list[bytes]]) -> None:
        """Any bytes, cut anywhere, then end of input: the output is the input; closed."""
        data, pieces = stream
        protocol, transport, _ = connect(EchoHandler(), max_line_length=max(1, len(data)))
        for piece in pieces:
            protocol.dataReceived(piece)
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), data)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.record.lines_in, protocol.record.lines_out)

    @PROPERTY
    @given(
        st.lists(
            st.tuples(st.binary(max_size=4).map(lambda b: b.replace(b"\n", b"")), st.booleans()),
            min_size=1,
            max_size=30,
        ),
        st.integers(min_value=1, max_value=5),
        st.data(),
    )
    def test_interleavings_keep_order(
        self, lines: list[tuple[bytes, bool]], max_pending: int, data: st.DataObject
    ) -> None:
        """However handlers finish, replies are in line order and backpressure holds.

        A model client sends one line per read while the transport is producing;
        between reads (and whenever it is paused) a randomly chosen pending
        handler finishes.  Some lines are answered synchronously.  At no point
        are more than ``max_pending`` replies waiting, and reading is paused
        only while more than half of that are.
        """
        sync = {index for index, (_, now) in enumerate(lines) if now}
        pending: dict[int, tuple[bytes, Deferred[bytes]]] = {}

        def handle(line: bytes) -> bytes | Deferred[bytes]:
            index = len(seen)
            seen.append(line)
            if index in sync:
                return line
            deferred: Deferred[bytes] = Deferred()
            pending[index] = (line, deferred)
            return deferred

        seen: list[bytes] = []
        protocol, transport, _ = connect(
            CallHandler(handle), max_line_length=10, max_pending=max_pending
        )
        wire = [content + b"\n" for content, _ in lines]
        sent = 0
        while sent < len(wire) or pending:
            can_send = sent < len(wire) and transport.producerState == "producing"
            if can_send and (not pending or data.draw(st.booleans())):
                protocol.dataReceived(wire[sent])
                sent += 1
                if sent == len(wire):
                    protocol.readConnectionLost()
            else:
                index = data.draw(st.sampled_from(sorted(pending)))
                line, deferred = pending.pop(index)
                deferred.callback(line)
            waiting = len(protocol._fifo)
            self.assertLessEqual(waiting, max_pending)
            if transport.producerState == "paused":
                self.assertGreater(waiting, max_pending // 2)
        self.assertEqual(transport.value(), b"".join(wire))
        self.assertEqual(transport.producerState, "producing")
        self.assertTrue(transport.disconnecting)


@implementer(IBatchLineHandler)
class RecordingBatchHandler(EchoHandler):
    """An echo handler that records which of its methods answered what."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def handle_line(self, line: bytes) -> bytes:
        """Record and echo one line."""
        self.calls.append(("line", line))
        return line

    def handle_batch(self, lines: bytes, count: int) -> bytes:
        """Record (with its line count) and echo a batch."""
        self.calls.append((f"batch {count}", lines))
        return lines


class BatchPathTests(SynchronousTestCase):
    """The batch path of a batch-capable handler changes nothing on the wire."""

    def make(
        self, limit: int = 64, handler: object | None = None
    ) -> tuple[LineProtocol, StringTransport]:
        record = ConnectionRecord(1, "peer", "local", 0.0)
        protocol = LineProtocol(
            cast("ILineHandler", handler or EchoHandler()),
            LineSettings(max_line_length=limit),
            Clock(),
            record,
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_one_write_and_counts(self) -> None:
        """A read of whole lines is answered by one write; the counters still count lines."""
        protocol, transport = self.make()
        protocol.dataReceived(b"a\nbb\r\nccc\n")
        self.assertEqual(transport.value(), b"a\nbb\r\nccc\n")
        self.assertEqual((protocol.record.lines_in, protocol.record.lines_out), (3, 3))

    def test_batch_handler_is_used(self) -> None:
        """A batch-capable handler answers a read of whole lines in one call.

        With an info line configured the per-line path is taken instead, since
        each line must be looked at.
        """
        handler = RecordingBatchHandler()
        protocol, transport = self.make(handler=handler)
        protocol.dataReceived(b"a\nb\n")
        self.assertEqual(handler.calls, [("batch 2", b"a\nb\n")])
        self.assertEqual(transport.value(), b"a\nb\n")
        handler = RecordingBatchHandler()
        protocol = LineProtocol(
            handler,
            LineSettings(info_line=b"I"),
            Clock(),
            ConnectionRecord(1, "peer", "local", 0.0),
        )
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"a\nb\n")
        self.assertEqual(handler.calls, [("line", b"a\n"), ("line", b"b\n")])

    def test_tail_is_held(self) -> None:
        """An unfinished line after the last LF waits for its end, as on the line path."""
        protocol, transport = self.make()
        protocol.dataReceived(b"one\ntw")
        protocol.dataReceived(b"o\nthree\n")
        self.assertEqual(transport.value(), b"one\ntwo\nthree\n")

    def test_long_reads_take_the_line_path(self) -> None:
        """When a line may exceed the limit the per-line path decides (and refuses it)."""
        protocol, transport = self.make(limit=8)
        protocol.dataReceived(b"short\n" + b"x" * 20 + b"\nok\n")
        self.assertEqual(
            transport.value(), b"short\n-ERR line-too-long line exceeds 8 bytes\nok\n"
        )

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        data=st.binary(max_size=400),
        cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    )
    def test_same_output_as_line_path(self, data: bytes, cuts: list[int]) -> None:
        """Any bytes split anywhere: the batch path writes what the line path writes."""
        chunks = [
            data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)
        ]
        fast, fast_out = self.make(limit=16)
        slow, slow_out = self.make(limit=16, handler=LineOnlyEcho())
        for chunk in chunks:
            if chunk:
                fast.dataReceived(chunk)
                slow.dataReceived(chunk)
        fast.readConnectionLost()
        slow.readConnectionLost()
        self.assertEqual(fast_out.value(), slow_out.value())
        self.assertEqual(fast.record.lines_in, slow.record.lines_in)
        self.assertEqual(fast.record.lines_out, slow.record.lines_out)


@implementer(ILineHandler)
class LineOnlyEcho:
    """An echo handler without the batch form: forces the per-line path."""

    def handle_line(self, line: bytes) -> bytes:
        return line
