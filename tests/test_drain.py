"""The factory's admission and shutdown: limits, refusals and drain (transport rules 9, 10)."""

from __future__ import annotations

import contextlib
import ssl
from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.edge.limits import ConnectionLimiter
from secure_echo.line.protocol import LineSettings
from secure_echo.tls.connection import TLSServerConnection
from tests.helpers import make_pki
from tests.tlspair import (
    CountingTransport,
    HeldHandler,
    TLSPair,
    capture_events,
    client_context,
    named,
    server_factory,
)

if TYPE_CHECKING:
    from secure_echo.tls.factory import TLSServerFactory


class DrainTests(SynchronousTestCase):
    """``factory.drain(timeout)`` finishes what was read, then closes everything."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)
        self.handler = HeldHandler()
        self.factory = server_factory(
            self.pki,
            self.clock,
            handler=self.handler,
            line_settings=LineSettings(handler_timeout=1000, max_pending=4),
        )

    def connected(self) -> TLSPair:
        pair = TLSPair(self.factory, client_context(self.pki))
        pair.handshake()
        return pair

    def test_idle_connections_close_at_once(self) -> None:
        """Idle connections get close_notify at once; reason server_shutdown."""
        pairs = [self.connected() for _ in range(3)]
        drained = self.factory.drain(30)
        (started,) = named(self.events, "drain_started")
        self.assertEqual(started["connections"], 3)
        self.assertEqual(started["timeout"], 30)
        for pair in pairs:
            self.assertTrue(pair.transport.disconnecting)
            self.assertFalse(pair.transport.aborted)
            pair.to_client()
            pair.read_client()
            self.assertTrue(pair.client_closed, "close_notify was sent")
        self.assertNoResult(drained)
        self.assertEqual(named(self.events, "drain_finished"), [])
        for pair in pairs:
            pair.finish_stream()
        self.assertIsNone(self.successResultOf(drained))
        self.assertEqual(len(named(self.events, "drain_finished")), 1)
        reasons = [closed["close_reason"] for closed in named(self.events, "connection_closed")]
        self.assertEqual(reasons, ["server_shutdown"] * 3)

    def test_no_connections_fires_at_once(self) -> None:
        """With nothing open, the drain finishes at once and arms no timer."""
        drained = self.factory.drain(30)
        self.assertIsNone(self.successResultOf(drained))
        self.assertEqual(len(named(self.events, "drain_finished")), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pending_reply_delivered_then_closed(self) -> None:
        """A pending handler reply is written before the close; a partial line is not answered."""
        pair = self.connected()
        pair.send(b"first\nunfinished")
        pair.pump()
        drained = self.factory.drain(30)
        self.assertFalse(pair.transport.disconnecting, "the pending reply is awaited")
        self.assertEqual(pair.transport.producerState, "paused", "reading stops")
        self.handler.pending[0][1].callback(b"FIRST\n")
        self.assertTrue(pair.transport.disconnecting)
        pair.to_client()
        pair.read_client()
        self.assertEqual(pair.received, b"FIRST\n")
        self.assertTrue(pair.client_closed)
        self.assertEqual([line for line, _ in self.handler.pending], [b"first\n"])
        pair.finish_stream()
        self.successResultOf(drained)
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual(closed["close_reason"], "server_shutdown")
        self.assertEqual((closed["lines_in"], closed["lines_out"]), (1, 1))

    def test_handshaking_connection_aborted(self) -> None:
        """A connection still in its handshake is aborted at once."""
        pair = TLSPair(self.factory, client_context(self.pki))
        with contextlib.suppress(ssl.SSLWantReadError):
            pair.client.do_handshake()
        pair.to_server()
        drained = self.factory.drain(30)
        self.assertTrue(pair.transport.aborted)
        pair.finish_stream()
        self.successResultOf(drained)
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual(closed["close_reason"], "server_shutdown")

    def test_timeout_aborts_the_rest(self) -> None:
        """After the timeout, open connections are aborted; the Deferred waits for their end."""
        quick = self.connected()
        slow = self.connected()
        slow.send(b"never answered\n")
        slow.pump()
        drained = self.factory.drain(5)
        quick.finish_stream()
        self.clock.advance(4.9)
        self.assertFalse(slow.transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(slow.transport.aborted)
        (timed_out,) = named(self.events, "drain_timeout")
        self.assertEqual(timed_out["remaining"], 1)
        self.assertNoResult(drained)
        slow.finish_stream()
        self.successResultOf(drained)
        self.assertEqual(len(named(self.events, "drain_finished")), 1)

    def test_finished_drain_cancels_timer(self) -> None:
        """A drain that finishes early leaves no timer behind."""
        pair = self.connected()
        drained = self.factory.drain(5)
        pair.finish_stream()
        self.successResultOf(drained)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refuses_while_draining(self) -> None:
        """During a drain buildProtocol returns None and the refusal log says 'draining'."""
        pair = self.connected()
        self.factory.drain(30)
        self.assertIsNone(self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 4000)))
        self.assertEqual(self.factory.refusals.refused["draining"], 1)
        (refused,) = named(self.events, "connection_refused")
        self.assertEqual(refused["reason"], "draining")
        self.assertEqual(refused["peer"], "10.0.0.9:4000")
        pair.finish_stream()

    def test_drain_twice_same_deferred(self) -> None:
        """A second drain returns the same Deferred and logs no second start."""
        pair = self.connected()
        first = self.factory.drain(5)
        self.assertIs(self.factory.drain(5), first)
        self.assertEqual(len(named(self.events, "drain_started")), 1)
        pair.finish_stream()

    def test_reading_stays_paused_when_app_resumes(self) -> None:
        """Reading stays stopped during a drain even when the app's backlog shrinks."""
        pair = self.connected()
        pair.send(b"1\n2\n3\n4\n")
        pair.pump()
        self.assertEqual(pair.transport.producerState, "paused", "max_pending reached")
        self.factory.drain(30)
        # Two replies bring the backlog to half of max_pending: the app asks to read again.
        self.handler.pending[0][1].callback(b"1\n")
        self.handler.pending[1][1].callback(b"2\n")
        self.assertEqual(pair.transport.producerState, "paused")
        self.handler.pending[2][1].callback(b"3\n")
        self.handler.pending[3][1].callback(b"4\n")
        self.assertTrue(pair.transport.disconnecting)
        pair.to_client()
        pair.read_client()
        self.assertEqual(pair.received, b"1\n2\n3\n4\n")

    def test_idle_deadline_does_not_cut_drain(self) -> None:
        """The idle deadline does not close a draining connection before its replies."""
        factory = server_factory(
            self.pki,
            self.clock,
            handler=self.handler,
            idle_timeout=10,
            line_settings=LineSettings(handler_timeout=1000),
        )
        pair = TLSPair(factory, client_context(self.pki))
        pair.handshake()
        self.clock.advance(5)
        pair.send(b"late\n")
        pair.pump()
        self.clock.advance(4)
        factory.drain(30)
        # Reading is paused by the drain, so the client cannot look alive; the
        # idle deadline (t=15) must not drop the reply still owed.
        self.clock.advance(7)
        self.assertFalse(pair.transport.disconnecting)
        self.handler.pending[0][1].callback(b"LATE\n")
        pair.to_client()
        pair.read_client()
        self.assertEqual(pair.received, b"LATE\n")
        self.assertTrue(pair.client_closed)
        pair.finish_stream()
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual(closed["close_reason"], "server_shutdown")


class FactoryLimitTests(SynchronousTestCase):
    """``buildProtocol`` applies the ConnectionLimiter and logs refusals sparingly."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)
        self.limiter = ConnectionLimiter(2, 1)
        self.factory: TLSServerFactory = server_factory(self.pki, self.clock, limiter=self.limiter)

    def connect(self, host: str, port: int = 40000) -> TLSServerConnection | None:
        address = IPv4Address("TCP", host, port)
        connection = self.factory.buildProtocol(address)
        if connection is None:
            return None
        assert isinstance(connection, TLSServerConnection)
        connection.makeConnection(CountingTransport(peer=address))
        return connection

    def test_per_ip_and_total_limits(self) -> None:
        """A second connection from one IP and a third overall are refused."""
        self.assertIsNotNone(self.connect("10.0.0.1"))
        self.assertIsNone(self.connect("10.0.0.1", 40001))
        self.assertIsNotNone(self.connect("10.0.0.2"))
        self.assertIsNone(self.connect("10.0.0.3"))
        refused = named(self.events, "connection_refused")
        self.assertEqual(
            [(event["reason"], event["peer"]) for event in refused],
            [("limit_per_ip", "10.0.0.1:40001"), ("limit_total", "10.0.0.3:40000")],
        )
        self.assertEqual(self.limiter.total, 2)
        self.assertEqual(len(self.factory.connections), 2)

    def test_refusals_logged_once_then_summed(self) -> None:
        """The first refusal of a reason is logged; the rest come as one summary."""
        self.connect("10.0.0.1")
        for port in range(5):
            self.assertIsNone(self.connect("10.0.0.1", 41000 + port))
        self.assertEqual(len(named(self.events, "connection_refused")), 1)
        self.assertEqual(named(self.events, "connections_refused"), [])
        self.clock.advance(10)
        (summary,) = named(self.events, "connections_refused")
        self.assertEqual(summary["total"], 4)
        self.assertEqual(summary["counts"], {"limit_per_ip": 4})
        self.assertEqual(summary["top_peers"], {"10.0.0.1": 4})
        self.assertEqual(self.factory.refusals.refused["limit_per_ip"], 5)

    def test_closing_frees_the_slot(self) -> None:
        """ConnectionLost of an accepted connection frees its per-IP and total slot."""
        first = self.connect("10.0.0.1")
        assert first is not None
        self.connect("10.0.0.2")
        self.assertIsNone(self.connect("10.0.0.1", 40001))
        first.connectionLost(None)
        self.assertEqual(self.limiter.count("10.0.0.1"), 0)
        self.assertIsNotNone(self.connect("10.0.0.1", 40002))
        self.assertIsNone(self.connect("10.0.0.3"))
        self.assertEqual(self.limiter.total, 2)

    def test_refused_connection_takes_no_slot(self) -> None:
        """A refused connection is never counted, so it frees nothing either."""
        self.connect("10.0.0.1")
        self.connect("10.0.0.1", 40001)
        self.connect("10.0.0.1", 40002)
        self.assertEqual(self.limiter.total, 1)
        self.assertEqual(self.limiter.count("10.0.0.1"), 1)
