"""Tests for :mod:`secure_echo.tls.connection`: TLS over a simulated stream."""

from __future__ import annotations

import contextlib
import gc
import ssl
import weakref
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.edge.addresses import format_address
from secure_echo.line.protocol import LineSettings
from secure_echo.tls.connection import ssl_error_text
from secure_echo.tls.factory import emit_fields
from secure_echo.tls.lifecycle import Phase
from secure_echo.tls.notes import HandshakeNotes
from secure_echo.tls.policy import ClientAuth, TLSSettings, load_and_validate
from tests.helpers import PKI, make_pki
from tests.tlspair import (
    CountingTransport,
    HeldHandler,
    TLSPair,
    client_context,
    server_factory,
)

if TYPE_CHECKING:
    from secure_echo.tls.record import ConnectionRecord


class NoDelayTransport(CountingTransport):
    """A stream accepted from a listening socket that had TCP_NODELAY on."""

    no_delay_inherited = True


class TransportTestsMixin:
    """Common set-up: a PKI, a clock and a log observer."""

    pki: PKI
    clock: Clock
    events: EventLoggingObserver

    def set_up(self, case: SynchronousTestCase) -> None:
        self.pki = make_pki(case.mktemp())
        self.clock = Clock()
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        case.addCleanup(globalLogPublisher.removeObserver, self.events)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [dict(e) for e in self.events if e.get("event") == name]


class EchoOverTLSTests(TransportTestsMixin, SynchronousTestCase):
    """Lines over a real TLS session in memory."""

    def setUp(self) -> None:
        self.set_up(self)
        self.factory = server_factory(self.pki, self.clock)
        self.pair = TLSPair(self.factory, client_context(self.pki))

    def test_echo_byte_exact(self) -> None:
        """Every line, whatever its bytes, comes back exactly."""
        self.pair.handshake()
        data = b"hello\r\n\x00\xff\xfe binary\n\nlast line\n"
        self.pair.send(data)
        self.pair.pump()
        self.assertEqual(self.pair.received, data)

    def test_nodelay(self) -> None:
        """TCP_NODELAY is switched on at accept."""
        self.assertTrue(self.pair.transport.nodelay)

    def test_nodelay_inherited_not_set_again(self) -> None:
        """A socket that has TCP_NODELAY from its listening socket is not asked again."""
        transport = NoDelayTransport()
        pair = TLSPair(self.factory, client_context(self.pki), transport=transport)
        self.assertFalse(pair.transport.nodelay)
        pair.handshake()
        pair.send(b"ping\n")
        pair.pump()
        self.assertEqual(pair.received, b"ping\n")

    def test_one_write_per_read(self) -> None:
        """The replies to all lines of one read leave in one stream write."""
        self.pair.handshake()
        self.pair.send(b"".join(b"line %d\n" % i for i in range(100)))
        before = self.pair.transport.writes
        self.pair.to_server()
        self.assertEqual(self.pair.transport.writes - before, 1)
        self.pair.pump()
        self.assertEqual(self.pair.received.count(b"\n"), 100)

    def _client_finished(self) -> None:
        """Run the handshake until the client has written its Finished (not yet sent)."""
        for _ in range(20):
            try:
                self.pair.client.do_handshake()
            except ssl.SSLWantReadError:
                self.pair.to_server()
                self.pair.to_client()
            else:
                return
        self.fail("the handshake did not complete")

    def test_tickets_leave_with_first_reply(self) -> None:
        """Finished and the first line in one read: one write has tickets and reply."""
        self._client_finished()
        self.pair.send(b"first\n")
        before = self.pair.transport.writes
        self.pair.to_server()
        self.assertEqual(self.pair.transport.writes - before, 1)
        self.pair.pump()
        self.assertEqual(self.pair.received, b"first\n")
        session = self.pair.client.session
        assert session is not None
        self.assertTrue(session.has_ticket)

    def test_tickets_sent_without_data(self) -> None:
        """Finished alone: the tickets still go out in that read."""
        self._client_finished()
        before = self.pair.transport.writes
        self.pair.to_server()
        self.assertEqual(self.pair.transport.writes - before, 1)
        self.pair.to_client()
        self.pair.read_client()
        session = self.pair.client.session
        assert session is not None
        self.assertTrue(session.has_ticket)

    def test_client_hello_recorded(self) -> None:
        """The record carries what the client offered and its JA4; off, neither."""
        self.pair.handshake()
        self.pair.server.loseConnection()
        self.pair.finish_stream()
        (closed,) = self.named("connection_closed")
        hello = closed["client_hello"].value()
        self.assertEqual(hello["sni"], "localhost")
        self.assertIn("TLS 1.3", hello["supported_versions"])
        self.assertRegex(closed["ja4"], r"^t13d\d{4}00_[0-9a-f]{12}_[0-9a-f]{12}$")
        self.factory.read_client_hello = False
        other = TLSPair(self.factory, client_context(self.pki))
        other.handshake()
        other.server.loseConnection()
        other.finish_stream()
        (_, closed) = self.named("connection_closed")
        self.assertIsNone(closed["client_hello"])
        self.assertIsNone(closed["ja4"])

    def test_tls_facts_recorded(self) -> None:
        """The handshake's version, cipher and group reach connection_closed."""
        self.pair.handshake()
        self.pair.server.loseConnection()
        self.pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["tls_version"], "TLSv1.3")
        self.assertIn(closed["cipher"], {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"})
        self.assertIsNotNone(closed["group"])
        self.assertEqual(closed["sni"], "localhost")
        self.assertEqual(closed["peer"], "127.0.0.1:50000")
        self.assertEqual(closed["close_reason"], "server_closed")

    def test_lines_with_close_notify_all_echoed(self) -> None:
        """Lines that arrive in the same chunk as close_notify are all answered."""
        self.pair.handshake()
        self.pair.send(b"a\nb\r\nc\nfinal without newline")
        with contextlib.suppress(ssl.SSLWantReadError):
            self.pair.client.unwrap()
        # Lines and close_notify reach the server in one dataReceived.
        self.pair.to_server()
        self.assertTrue(self.pair.transport.disconnecting)
        self.pair.to_client()
        self.pair.read_client()
        self.assertEqual(self.pair.received, b"a\nb\r\nc\nfinal without newline")
        self.assertTrue(self.pair.client_closed, "the server sent close_notify")
        self.pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "eof")
        self.assertEqual(closed["lines_in"], 4)
        self.assertEqual(closed["lines_out"], 4)

    def test_lines_with_fin_all_echoed(self) -> None:
        """Lines followed by a bare TCP FIN (no close_notify) are all answered."""
        self.pair.handshake()
        self.pair.send(b"one\ntwo\nthree")
        self.pair.to_server()
        self.pair.server.readConnectionLost()
        self.assertTrue(self.pair.transport.disconnecting)
        self.pair.to_client()
        self.pair.read_client()
        self.assertEqual(self.pair.received, b"one\ntwo\nthree")
        self.pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "client_closed")

    def test_close_waits_for_pending_replies(self) -> None:
        """After the client's close, the server closes only once every reply is out."""
        handler = HeldHandler()
        factory = server_factory(self.pki, self.clock, handler=handler)
        pair = TLSPair(factory, client_context(self.pki))
        pair.handshake()
        pair.send(b"x\ny\n")
        pair.to_server()
        pair.server.readConnectionLost()
        self.assertFalse(pair.transport.disconnecting)
        handler.pending[1][1].callback(b"Y\n")
        self.assertFalse(pair.transport.disconnecting)
        handler.pending[0][1].callback(b"X\n")
        self.assertTrue(pair.transport.disconnecting)
        pair.to_client()
        pair.read_client()
        self.assertEqual(pair.received, b"X\nY\n")

    def test_writes_after_read_go_out_at_once(self) -> None:
        """A reply produced outside a read (a Deferred firing) is sent immediately."""
        handler = HeldHandler()
        factory = server_factory(self.pki, self.clock, handler=handler)
        pair = TLSPair(factory, client_context(self.pki))
        pair.handshake()
        pair.send(b"later\n")
        pair.to_server()
        handler.pending[0][1].callback(b"later\n")
        pair.to_client()
        pair.read_client()
        self.assertEqual(pair.received, b"later\n")

    def test_server_close_sends_close_notify(self) -> None:
        """LoseConnection sends close_notify before closing the stream."""
        self.pair.handshake()
        self.pair.server.loseConnection()
        self.pair.to_client()
        self.pair.read_client()
        self.assertTrue(self.pair.client_closed)
        self.assertTrue(self.pair.transport.disconnecting)

    def test_server_shutdown_reason(self) -> None:
        """A drain that closes cleanly records server_shutdown in connection_closed."""
        self.pair.handshake()
        self.pair.server.drain()
        self.assertTrue(self.pair.transport.disconnecting)
        self.pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "server_shutdown")

    def test_connection_lost_midway(self) -> None:
        """A stream that breaks after the handshake is recorded as reset."""
        self.pair.handshake()
        self.pair.finish_stream(Failure(ConnectionLost()))
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "reset")
        self.assertNotIn(self.pair.server, self.factory.connections)

    def test_garbage_after_handshake(self) -> None:
        """A corrupt record after the handshake is a logged TLS error."""
        self.pair.handshake()
        self.pair.server.dataReceived(b"\x17\x03\x03\x00\x05hello")
        self.assertTrue(self.pair.transport.disconnecting)
        self.pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "tls_error")
        self.assertTrue(closed["tls_error"])
        self.assertEqual(len(self.named("tls_error")), 1)

    def test_writes_after_close_are_dropped(self) -> None:
        """Nothing is written once a close has started."""
        self.pair.handshake()
        self.pair.server.loseConnection()
        self.pair.transport.clear()
        self.pair.server.write(b"late\n")
        self.assertEqual(self.pair.transport.value(), b"")

    def test_counters(self) -> None:
        """bytes_in/out and lines_in/out count application data."""
        self.pair.handshake()
        self.pair.send(b"12345\n")
        self.pair.pump()
        self.pair.server.loseConnection()
        self.pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual((closed["bytes_in"], closed["bytes_out"]), (6, 6))
        self.assertEqual((closed["lines_in"], closed["lines_out"]), (1, 1))
        self.assertGreaterEqual(closed["handshake_ms"], 0)


class HandshakeTests(TransportTestsMixin, SynchronousTestCase):
    """What happens before and instead of a completed handshake."""

    def setUp(self) -> None:
        self.set_up(self)
        self.factory = server_factory(self.pki, self.clock, handshake_timeout=5)

    def test_failures_warn_once_then_sum_up(self) -> None:
        """Failed handshakes: one warning per reason, the rest as records and a summary.

        Every failure is one handshake_failed event (so a record of each stays), but
        only the first of its reason in a window is a warning; the window's summary,
        handshake_failures, counts the rest.
        """
        garbage = b"\x16\x03\x01\x00\x05hello"
        for _ in range(3):
            pair = TLSPair(self.factory, client_context(self.pki))
            pair.server.dataReceived(garbage)
            pair.finish_stream()
        failed = self.named("handshake_failed")
        self.assertEqual([e["log_level"].name for e in failed], ["warn", "info", "info"])
        self.assertEqual(self.named("handshake_failures"), [])
        self.clock.advance(10)
        [summary] = self.named("handshake_failures")
        self.assertEqual(summary["total"], 2)
        self.assertEqual(summary["counts"], {"other": 2})
        self.assertEqual(summary["top_peers"], {"127.0.0.1": 2})
        self.clock.advance(10)
        self.assertEqual(len(self.named("handshake_failures")), 1)
        pair = TLSPair(self.factory, client_context(self.pki))
        pair.server.dataReceived(garbage)
        self.assertEqual(self.named("handshake_failed")[-1]["log_level"].name, "warn")

    def test_plaintext_client(self) -> None:
        """A client speaking plaintext gets a one-line hint and is closed."""
        pair = TLSPair(self.factory, client_context(self.pki))
        pair.server.dataReceived(b"hello there\n")
        reply = pair.transport.value()
        self.assertTrue(reply.startswith(b"-ERR tls-required this port speaks TLS; try: "))
        self.assertTrue(reply.endswith(b"\n"))
        self.assertEqual(reply.count(b"\n"), 1)
        self.assertTrue(pair.transport.disconnecting)
        pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "plaintext_client")

    def test_http_client_gets_400_with_the_hint(self) -> None:
        """An HTTP request on the TLS port gets an HTTP/1.0 400 whose body is the hint."""
        pair = TLSPair(self.factory, client_context(self.pki))
        pair.server.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost:8443\r\n\r\n")
        reply = pair.transport.value()
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.0 400 Bad Request")
        self.assertIn(b"Content-Length: %d" % len(body), lines)
        self.assertIn(b"Connection: close", lines)
        self.assertTrue(body.startswith(b"-ERR tls-required this port speaks TLS; try: "))
        self.assertTrue(pair.transport.disconnecting)
        pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "plaintext_client")

    def test_handshake_timeout(self) -> None:
        """A client that does not finish the handshake in time is aborted."""
        pair = TLSPair(self.factory, client_context(self.pki))
        self.clock.advance(4.9)
        self.assertFalse(pair.transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(pair.transport.aborted)
        pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "handshake_timeout")

    def test_half_client_hello_times_out(self) -> None:
        """Half a ClientHello does not stop the handshake timer."""
        pair = TLSPair(self.factory, client_context(self.pki))
        with contextlib.suppress(ssl.SSLWantReadError):
            pair.client.do_handshake()
        hello = pair.outgoing.read()
        pair.server.dataReceived(hello[: len(hello) // 2])
        self.clock.advance(5.1)
        self.assertTrue(pair.transport.aborted)

    def test_timer_cancelled_after_handshake(self) -> None:
        """A completed handshake cancels the timer."""
        pair = TLSPair(self.factory, client_context(self.pki))
        pair.handshake()
        self.clock.advance(6)
        self.assertFalse(pair.transport.aborted)
        self.assertFalse(pair.transport.disconnecting)

    def test_old_protocol_refused(self) -> None:
        """A TLS 1.1 client fails the handshake, and the failure is logged with a reason."""
        context = client_context(self.pki)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("ALL:@SECLEVEL=0")
        pair = TLSPair(self.factory, context)
        with self.assertRaises(ssl.SSLError):
            pair.handshake()
        pair.finish_stream()
        (failed,) = self.named("handshake_failed")
        self.assertEqual(failed["peer"], "127.0.0.1:50000")
        self.assertTrue(failed["reason"])
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "handshake_failed")

    def test_client_leaves_during_handshake(self) -> None:
        """A FIN during the handshake is a handshake failure, not a crash."""
        pair = TLSPair(self.factory, client_context(self.pki))
        with contextlib.suppress(ssl.SSLWantReadError):
            pair.client.do_handshake()
        self.assertTrue(pair.to_server())
        pair.server.readConnectionLost()
        self.assertTrue(pair.transport.disconnecting)
        pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "handshake_failed")
        self.assertEqual(closed["tls_error"], "client closed the connection during the handshake")
        self.assertEqual(len(self.named("handshake_failed")), 1)

    def test_connection_lost_during_handshake(self) -> None:
        """A stream lost after the first bytes is a failed handshake."""
        pair = TLSPair(self.factory, client_context(self.pki))
        with contextlib.suppress(ssl.SSLWantReadError):
            pair.client.do_handshake()
        self.assertTrue(pair.to_server())
        pair.finish_stream(Failure(ConnectionLost()))
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "handshake_failed")
        self.assertEqual(closed["tls_error"], "connection closed before the handshake")

    def test_fin_before_any_byte_is_no_data(self) -> None:
        """A TCP connection closed before its first byte is no_data, without a warning.

        That is what a load balancer's TCP health check does.
        """
        pair = TLSPair(self.factory, client_context(self.pki))
        pair.server.readConnectionLost()
        self.assertTrue(pair.transport.disconnecting)
        self.assertEqual(pair.transport.value(), b"")
        pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "no_data")
        self.assertIsNone(closed["tls_error"])
        self.assertEqual(self.named("handshake_failed"), [])

    def test_connection_lost_before_any_byte(self) -> None:
        """A TCP connection reset before its first byte is no_data, without a warning."""
        pair = TLSPair(self.factory, client_context(self.pki))
        pair.finish_stream(Failure(ConnectionLost()))
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["close_reason"], "no_data")
        self.assertIsNone(closed["tls_error"])
        self.assertEqual(self.named("handshake_failed"), [])
        self.assertEqual(self.factory.connections, set())


class ClientCertificateTests(TransportTestsMixin, SynchronousTestCase):
    """Mutual TLS through the transport."""

    def setUp(self) -> None:
        self.set_up(self)
        settings = TLSSettings(
            self.pki.server_cert, self.pki.server_key, self.pki.ca_cert, ClientAuth.REQUIRED
        )
        self.factory = server_factory(self.pki, self.clock, settings=settings)

    def test_client_certificate_recorded(self) -> None:
        """A verified client certificate's subject and SHA-256 are logged."""
        pair = TLSPair(
            self.factory,
            client_context(self.pki, cert=self.pki.client_cert, key=self.pki.client_key),
        )
        pair.handshake()
        pair.send(b"hi\n")
        pair.pump()
        self.assertEqual(pair.received, b"hi\n")
        pair.server.loseConnection()
        pair.finish_stream()
        (closed,) = self.named("connection_closed")
        self.assertEqual(closed["client_cert_subject"], "CN=test client")
        self.assertRegex(closed["client_cert_sha256"], "^[0-9a-f]{64}$")

    def test_unknown_client_refused_with_reason(self) -> None:
        """A client certificate from another CA is refused; the log says why."""
        pair = TLSPair(
            self.factory,
            client_context(
                self.pki, cert=self.pki.other_client_cert, key=self.pki.other_client_key
            ),
        )
        try:
            pair.handshake()
            pair.send(b"x\n")
            pair.pump()
        except ssl.SSLError:
            pass
        (failed,) = self.named("handshake_failed")
        self.assertIn("unable to get local issuer certificate", failed["reason"])

    def test_missing_client_certificate_refused(self) -> None:
        """With client auth required, a client without a certificate is refused."""
        pair = TLSPair(self.factory, client_context(self.pki))
        try:
            pair.handshake()
            pair.send(b"x\n")
            pair.pump()
        except ssl.SSLError:
            pass
        self.assertEqual(pair.received, b"")
        (failed,) = self.named("handshake_failed")
        self.assertIn("certificate", failed["reason"])


class FlowControlTests(TransportTestsMixin, SynchronousTestCase):
    """Reading pauses when the client does not read or replies pile up."""

    def setUp(self) -> None:
        self.set_up(self)

    def test_stream_buffer_full_pauses_reading(self) -> None:
        """When the stream transport's buffer is full, reading stops until it drains."""
        factory = server_factory(self.pki, self.clock)
        pair = TLSPair(factory, client_context(self.pki))
        pair.handshake()
        write_side = pair.transport.producer
        assert write_side is not None
        write_side.pauseProducing()
        self.assertEqual(pair.transport.producerState, "paused")
        write_side.resumeProducing()
        self.assertEqual(pair.transport.producerState, "producing")

    def test_both_reasons_must_clear(self) -> None:
        """Reading resumes only when neither the buffer nor the app objects."""
        factory = server_factory(self.pki, self.clock)
        pair = TLSPair(factory, client_context(self.pki))
        pair.handshake()
        write_side = pair.transport.producer
        assert write_side is not None
        write_side.pauseProducing()
        pair.server.pauseProducing()
        write_side.resumeProducing()
        self.assertEqual(pair.transport.producerState, "paused")
        pair.server.resumeProducing()
        self.assertEqual(pair.transport.producerState, "producing")

    def test_pending_replies_pause_reading(self) -> None:
        """Too many unanswered lines pause reading through the transport."""
        handler = HeldHandler()
        factory = server_factory(
            self.pki, self.clock, handler=handler, line_settings=LineSettings(max_pending=4)
        )
        pair = TLSPair(factory, client_context(self.pki))
        pair.handshake()
        pair.send(b"1\n2\n3\n4\n")
        pair.to_server()
        self.assertEqual(pair.transport.producerState, "paused")
        for line, deferred in handler.pending:
            deferred.callback(line)
        self.assertEqual(pair.transport.producerState, "producing")


class ReloadTests(TransportTestsMixin, SynchronousTestCase):
    """Each connection uses the context current at its accept."""

    def setUp(self) -> None:
        self.set_up(self)

    def test_new_context_for_new_connections_only(self) -> None:
        """After a context swap, old connections keep theirs and new ones get the new."""
        factory = server_factory(self.pki, self.clock)
        old = TLSPair(factory, client_context(self.pki))
        other = make_pki(self.mktemp())
        factory.contexts.replace(
            load_and_validate(TLSSettings(other.server_cert, other.server_key))
        )
        old.handshake()
        old.send(b"old\n")
        old.pump()
        self.assertEqual(old.received, b"old\n")
        new = TLSPair(factory, client_context(self.pki))
        with self.assertRaises(ssl.SSLCertVerificationError):
            new.handshake()
        fresh = TLSPair(factory, client_context(other))
        fresh.handshake()


class HelperTests(SynchronousTestCase):
    """Small pure helpers."""

    def test_format_address(self) -> None:
        """Addresses render as host:port, [v6]:port and unix:path."""
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress  # noqa: PLC0415

        self.assertEqual(format_address(IPv4Address("TCP", "10.0.0.1", 5)), "10.0.0.1:5")
        self.assertEqual(format_address(IPv6Address("TCP", "::1", 5)), "[::1]:5")
        self.assertEqual(format_address(UNIXAddress(b"/run/x.sock")), "unix:/run/x.sock")
        self.assertEqual(format_address(UNIXAddress(None)), "unix:-")

    def test_ssl_error_text(self) -> None:
        """PyOpenSSL errors become their reason strings."""
        from OpenSSL import SSL  # noqa: PLC0415

        error = SSL.Error([("SSL routines", "", "no shared cipher")])
        self.assertEqual(ssl_error_text(error), "no shared cipher")
        self.assertEqual(ssl_error_text(SSL.SysCallError(-1, "Unexpected EOF")), "unexpected EOF")


class EmitFieldsTests(SynchronousTestCase):
    """The per-connection record is the event ``Logger.info`` would have made."""

    def test_same_event_as_info(self) -> None:
        """Same keys in the same order and the same values, but for the time."""
        events: list[dict[str, object]] = []
        logger = Logger(
            "secure_echo.test", source=self, observer=cast("ILogObserver", events.append)
        )
        fields = {"conn_id": 7, "peer": "192.0.2.1:9", "close_reason": "eof", "message": "x"}
        logger.info("closed: {close_reason}", event="connection_closed", **fields)
        emit_fields(logger, "closed: {close_reason}", "connection_closed", dict(fields))
        made, ours = events
        self.assertEqual(sorted(made), sorted(ours))
        self.assertEqual(list(ours)[:4], list(fields))
        for key in made:
            if key != "log_time":
                self.assertEqual(ours[key], made[key], key)
        self.assertIs(ours["log_level"], LogLevel.info)
        self.assertLess(abs(cast("float", ours["log_time"]) - cast("float", made["log_time"])), 5)


class FreedAtEndTests(TransportTestsMixin, SynchronousTestCase):
    """An ended connection is freed by reference counting, not left to the cyclic GC."""

    def setUp(self) -> None:
        self.set_up(self)
        self.factory = server_factory(self.pki, self.clock)

    def check_freed(self, pair: TLSPair) -> None:
        was_enabled = gc.isenabled()
        gc.disable()
        self.addCleanup(lambda: gc.enable() if was_enabled else None)
        ended = weakref.ref(pair.server)
        app = weakref.ref(pair.server._app)
        pair.server.loseConnection()
        pair.pump()
        pair.finish_stream()
        self.assertIs(pair.server.phase, Phase.CLOSED)
        del pair.server
        self.assertIsNone(ended())
        self.assertIsNone(app())

    def test_after_echo(self) -> None:
        """A connection that echoed a line and closed leaves nothing behind."""
        pair = TLSPair(self.factory, client_context(self.pki))
        pair.handshake()
        pair.send(b"hello\n")
        pair.pump()
        self.assertEqual(pair.received, b"hello\n")
        self.check_freed(pair)

    def test_with_a_reply_pending(self) -> None:
        """Nor does one closed while its reply was still held by the handler."""
        handler = HeldHandler()
        pair = TLSPair(
            server_factory(self.pki, self.clock, handler=handler), client_context(self.pki)
        )
        pair.handshake()
        pair.send(b"held\n")
        pair.pump()
        self.assertEqual(len(handler.pending), 1)
        self.check_freed(pair)
        handler.pending[0][1].callback(b"late\n")


class HelloAfterFlightTests(TransportTestsMixin, SynchronousTestCase):
    """The ClientHello is read after the server's flight has left, never before."""

    def setUp(self) -> None:
        self.set_up(self)
        self.factory = server_factory(self.pki, self.clock)

    def test_flight_first(self) -> None:
        """When the notes read the hello, the server's reply to it is already written."""
        pair = TLSPair(self.factory, client_context(self.pki))
        written_when_read: list[int] = []
        original = HandshakeNotes.feed

        def feed(notes: HandshakeNotes, data: bytes, record: ConnectionRecord) -> None:
            written_when_read.append(len(pair.transport.value()))
            original(notes, data, record)

        self.patch(HandshakeNotes, "feed", feed)
        pair.handshake()
        pair.send(b"x\n")
        pair.pump()
        self.assertEqual(pair.received, b"x\n")
        self.assertGreater(written_when_read[0], 0)
        self.assertIsNotNone(pair.server.record.ja4)
