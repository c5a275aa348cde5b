"""Deadlines of an established connection: idle, age and write stall (transport rules 7, 8)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.line.protocol import LineSettings
from secure_echo.tls import writer as writer_module
from tests.helpers import make_pki
from tests.tlspair import (
    HeldHandler,
    StreamTransport,
    TLSPair,
    capture_events,
    client_context,
    named,
    server_factory,
)

if TYPE_CHECKING:
    from secure_echo.tls.factory import TLSServerFactory


class IdleTimeoutTests(SynchronousTestCase):
    """A client silent for ``idle_timeout`` after the handshake is closed gracefully."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)

    def pair(self, idle_timeout: float) -> TLSPair:
        factory = server_factory(self.pki, self.clock, idle_timeout=idle_timeout)
        pair = TLSPair(factory, client_context(self.pki))
        pair.handshake()
        return pair

    def test_silent_client_closed_with_close_notify(self) -> None:
        """No data for the idle timeout: close_notify, then close (idle_timeout)."""
        pair = self.pair(30)
        self.clock.advance(29.9)
        self.assertFalse(pair.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(pair.transport.disconnecting)
        self.assertFalse(pair.transport.aborted, "an idle close is graceful, not an abort")
        pair.to_client()
        pair.read_client()
        self.assertTrue(pair.client_closed, "the client got close_notify")
        pair.finish_stream()
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual(closed["close_reason"], "idle_timeout")

    def test_counted_from_handshake_end(self) -> None:
        """The idle clock starts when the handshake completes, not at accept."""
        factory = server_factory(self.pki, self.clock, idle_timeout=30, handshake_timeout=20)
        pair = TLSPair(factory, client_context(self.pki))
        self.clock.advance(15)
        pair.handshake()
        self.clock.advance(29.9)
        self.assertFalse(pair.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(pair.transport.disconnecting)

    def test_data_pushes_deadline_back(self) -> None:
        """Each line from the client restarts the idle period, however often it comes."""
        pair = self.pair(30)
        for step in range(5):
            self.clock.advance(20)
            pair.send(b"ping %d\n" % step)
            pair.pump()
            self.assertFalse(pair.transport.disconnecting, f"closed after step {step}")
        self.assertEqual(pair.received, b"".join(b"ping %d\n" % i for i in range(5)))
        self.clock.advance(29.9)
        self.assertFalse(pair.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(pair.transport.disconnecting)
        pair.finish_stream()
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual(closed["close_reason"], "idle_timeout")

    def test_zero_is_off(self) -> None:
        """An idle timeout of 0 never closes a silent client and arms no timer."""
        pair = self.pair(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10**6)
        self.assertFalse(pair.transport.disconnecting)
        pair.send(b"still here\n")
        pair.pump()
        self.assertEqual(pair.received, b"still here\n")


class MaxConnectionAgeTests(SynchronousTestCase):
    """At ``max_connection_age`` the connection drains and closes."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)

    def factory(
        self,
        handler: HeldHandler | None = None,
        *,
        idle_timeout: float,
        max_connection_age: float = 0.0,
    ) -> TLSServerFactory:
        return server_factory(
            self.pki,
            self.clock,
            handler=handler,
            line_settings=LineSettings(handler_timeout=1000),
            idle_timeout=idle_timeout,
            max_connection_age=max_connection_age,
        )

    def test_pending_reply_delivered_then_closed(self) -> None:
        """At the age, reading stops, the pending reply still goes out, then close_notify."""
        handler = HeldHandler()
        pair = TLSPair(
            self.factory(handler, idle_timeout=0, max_connection_age=60),
            client_context(self.pki),
        )
        pair.handshake()
        self.clock.advance(10)
        pair.send(b"slow\n")
        pair.pump()
        self.clock.advance(49.9)
        self.assertEqual(pair.transport.producerState, "producing")
        self.clock.advance(0.2)
        self.assertEqual(pair.transport.producerState, "paused", "reading stops at the age")
        self.assertFalse(pair.transport.disconnecting, "the pending reply is awaited")
        handler.pending[0][1].callback(b"SLOW\n")
        self.assertTrue(pair.transport.disconnecting)
        pair.to_client()
        pair.read_client()
        self.assertEqual(pair.received, b"SLOW\n")
        self.assertTrue(pair.client_closed, "close_notify follows the reply")
        pair.finish_stream()
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual(closed["close_reason"], "max_connection_age")
        self.assertEqual(closed["lines_out"], 1)

    def test_busy_client_closed_at_age(self) -> None:
        """A client that keeps the idle timer from firing is still closed at the age."""
        pair = TLSPair(
            self.factory(idle_timeout=30, max_connection_age=100), client_context(self.pki)
        )
        pair.handshake()
        for _ in range(4):
            self.clock.advance(20)
            pair.send(b"x\n")
            pair.pump()
        self.assertFalse(pair.transport.disconnecting)
        self.clock.advance(19.9)
        self.assertFalse(pair.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(pair.transport.disconnecting)
        pair.to_client()
        pair.read_client()
        self.assertTrue(pair.client_closed)
        pair.finish_stream()
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual(closed["close_reason"], "max_connection_age")

    def test_zero_is_off(self) -> None:
        """A max connection age of 0 lets a connection live for ever."""
        pair = TLSPair(self.factory(idle_timeout=0), client_context(self.pki))
        pair.handshake()
        self.clock.advance(10**6)
        self.assertFalse(pair.transport.disconnecting)


class WriteStallTests(SynchronousTestCase):
    """A client that stops reading is dropped once unsent output stops shrinking."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)
        factory = server_factory(self.pki, self.clock, idle_timeout=0, write_stall_timeout=10)
        self.stream = StreamTransport()
        self.pair = TLSPair(factory, client_context(self.pki), transport=self.stream)
        self.pair.handshake()

    def pause_write_side(self) -> None:
        producer = self.stream.producer
        assert producer is not None
        producer.pauseProducing()

    def test_no_progress_aborts(self) -> None:
        """Unsent bytes that do not shrink for the timeout: abort, slow_reader."""
        self.stream.set_unsent(1000)
        self.pause_write_side()
        self.clock.advance(9.9)
        self.assertFalse(self.stream.aborted)
        self.clock.advance(0.2)
        self.assertTrue(self.stream.aborted)
        (slow,) = named(self.events, "slow_reader")
        self.assertEqual(slow["unsent"], 1000)
        self.assertEqual(slow["timeout"], 10)
        self.pair.finish_stream()
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual(closed["close_reason"], "slow_reader")

    def test_progress_keeps_connection(self) -> None:
        """Unsent bytes that shrink within each period keep the connection open."""
        self.stream.set_unsent(1000)
        self.pause_write_side()
        for sent in (200, 400, 600):
            self.clock.advance(5)
            self.stream.offset = sent
            self.clock.advance(5.1)
            self.assertFalse(self.stream.aborted, f"aborted with {sent} bytes sent")
        self.assertEqual(named(self.events, "slow_reader"), [])
        # Progress then stops: one more full period without it is a stall.
        self.clock.advance(10)
        self.assertTrue(self.stream.aborted)
        (slow,) = named(self.events, "slow_reader")
        self.assertEqual(slow["unsent"], 400)

    def test_resume_cancels_check(self) -> None:
        """When the send buffer drains (resumeProducing), the stall check is off."""
        self.stream.set_unsent(1000)
        self.pause_write_side()
        self.clock.advance(5)
        producer = self.stream.producer
        assert producer is not None
        producer.resumeProducing()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertFalse(self.stream.aborted)
        self.assertEqual(named(self.events, "slow_reader"), [])

    def test_close_that_cannot_flush_is_aborted(self) -> None:
        """A close whose output never drains is aborted: close_stalled, with what was lost."""
        self.stream.set_unsent(5000)
        self.pair.server.loseConnection()
        # Output not yet acknowledged: the close lingers (FIN after it, then wait).
        self.assertTrue(self.stream.write_closed)
        self.clock.advance(9.9)
        self.assertFalse(self.stream.aborted)
        self.clock.advance(0.2)
        self.assertTrue(self.stream.aborted)
        self.assertEqual(len(named(self.events, "slow_reader")), 1)
        self.pair.finish_stream(Failure(ConnectionAborted()))
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual(closed["close_reason"], "close_stalled")
        # The 5000 bytes held, less the close_notify record itself (not a reply).
        self.assertTrue(4900 < closed["unsent_bytes"] < 5000, closed["unsent_bytes"])

    def test_close_that_flushes_is_not_aborted(self) -> None:
        """A close whose output drains and whose stream then ends is never aborted."""
        self.stream.set_unsent(5000)
        self.pair.server.loseConnection()
        self.clock.advance(5)
        self.stream.set_unsent(0)
        self.pair.finish_stream()
        self.clock.advance(100)
        self.assertFalse(self.stream.aborted)
        self.assertEqual(named(self.events, "slow_reader"), [])

    def test_close_with_nothing_held_still_watched(self) -> None:
        """A close with Twisted's buffer empty is still watched for a stall.

        Twisted closes the socket once it is writable; a kernel send buffer that a
        client stopped reading may never make it so.  Here the kernel keeps 5000
        unacknowledged bytes that never shrink: the close is aborted as a slow reader.
        """

        def kernel_count(_sock: object, request: int) -> int:
            return 5000 if request == writer_module._SIOCOUTQ else 0

        self.patch(writer_module, "kernel_count", kernel_count)
        self.pair.server.loseConnection()
        self.assertTrue(self.stream.write_closed)
        self.clock.advance(10.1)
        self.assertTrue(self.stream.aborted)
        self.assertEqual(len(named(self.events, "slow_reader")), 1)

    def test_close_with_nothing_left_is_not_watched(self) -> None:
        """A close with nothing held, queued or unacknowledged closes outright.

        Nothing is left to send, so the socket is writable and the close cannot
        stall: no half-close, and no stall timer left behind (the idle and age
        deadlines are off here, so none at all).
        """
        self.patch(writer_module, "kernel_count", lambda _sock, _request: 0)
        self.pair.server.loseConnection()
        self.assertFalse(self.stream.write_closed)
        self.assertTrue(self.stream.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class IdleWithPendingReplyTests(SynchronousTestCase):
    """The idle timeout does not cut off a reply the server still owes."""

    def test_pending_reply_defers_idle_close(self) -> None:
        """A handler slower than the idle timeout still gets its reply delivered."""
        pki = make_pki(self.mktemp())
        clock = Clock()
        handler = HeldHandler()
        factory = server_factory(
            pki,
            clock,
            handler=handler,
            idle_timeout=5,
            line_settings=LineSettings(handler_timeout=60),
        )
        pair = TLSPair(factory, client_context(pki))
        pair.handshake()
        pair.send(b"slow\n")
        pair.to_server()
        clock.advance(6)
        self.assertFalse(pair.transport.disconnecting)
        handler.pending[0][1].callback(b"slow\n")
        pair.pump()
        self.assertEqual(pair.received, b"slow\n")
        clock.advance(6)
        self.assertTrue(pair.transport.disconnecting)
