"""Tests for :mod:`secure_echo.edge.proxyreader` and the PROXY phase of the TLS factory."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import ssl
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from secure_echo.edge.addresses import format_address
from secure_echo.edge.limits import ConnectionLimiter
from secure_echo.edge.proxyreader import ProxyHeaderReader, ProxySettings, is_trusted
from secure_echo.tls.connection import TLSServerConnection
from secure_echo.wire.proxy import (
    LOCAL,
    PP2_TYPE_ALPN,
    PROXY_MALFORMED,
    PROXY_MISSING,
    PROXY_TIMEOUT,
    PROXY_UNTRUSTED,
    build_v1_header,
    build_v2_header,
)
from tests.helpers import make_pki
from tests.tlspair import capture_events, client_context, named, server_factory

if TYPE_CHECKING:
    from collections.abc import Sequence

    from twisted.internet.interfaces import IAddress, IReactorTime, ITransport

#: A TLS 1.x ClientHello record header: what a client that skips the balancer sends.
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32
BALANCER = IPv4Address("TCP", "127.0.0.1", 40000)
STRANGER = IPv4Address("TCP", "198.51.100.9", 40001)
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def v2_tcp4(**kwargs: Any) -> bytes:
    """A v2 PROXY header for 203.0.113.7:51234 -> 192.0.2.1:443."""
    return build_v2_header(("203.0.113.7", 51234), ("192.0.2.1", 443), **kwargs)


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Split ``data`` at the given offsets (any order, repeats and ends allowed)."""
    points = [0, *sorted({c for c in cuts if 0 <= c <= len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- the reader ---------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """The owner's protocol: records what reaches it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.made = 0
        self.read_lost = 0
        self.write_lost = 0
        self.lost: list[Failure | None] = []

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.read_lost += 1

    def writeConnectionLost(self) -> None:
        self.write_lost += 1

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.append(reason)


class FakeOwner:
    """An owner that records what its readers report, and can refuse the client."""

    def __init__(self, clock: Clock, *, refuse: bool = False) -> None:
        self.clock: IReactorTime = clock
        self.refuse = refuse
        self.addresses: list[IAddress] = []
        self.protocols: list[Recorder] = []
        self.rejected: list[dict[str, str]] = []
        self.closed: list[ProxyHeaderReader] = []

    def header_read(self, reader: ProxyHeaderReader, address: IAddress) -> Recorder | None:
        self.assertIsReader(reader)
        self.addresses.append(address)
        if self.refuse:
            return None
        protocol = Recorder()
        self.protocols.append(protocol)
        return protocol

    def header_rejected(self, reader: ProxyHeaderReader, reason: str, detail: str) -> None:
        transport = reader.transport
        assert transport is not None
        self.rejected.append(
            {"reason": reason, "detail": detail, "peer": format_address(transport.getPeer())}
        )

    def reader_closed(self, reader: ProxyHeaderReader) -> None:
        self.closed.append(reader)

    @staticmethod
    def assertIsReader(reader: object) -> None:
        assert isinstance(reader, ProxyHeaderReader)


class Stream(StringTransport):
    """A StringTransport that, like Twisted's TCP, dispatches through ``protocol``."""

    protocol: Any

    def __init__(self, peer: IAddress) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
            peerAddress=peer,
        )
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def receive(self, *pieces: bytes) -> None:
        """Deliver each piece as one read, to whatever protocol is current."""
        for piece in pieces:
            self.protocol.dataReceived(piece)


class ReaderCase(SynchronousTestCase):
    """Readers over a fake owner and a clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.owner = FakeOwner(self.clock)

    def settings(
        self, mode: Any = "required", trusted: Sequence[Any] = LOOPBACK, timeout: float = 5.0
    ) -> ProxySettings:
        return ProxySettings(mode, tuple(trusted), timeout)

    def connect(self, settings: ProxySettings, peer: IAddress = BALANCER) -> Stream:
        """Accept a connection from ``peer`` as the factory does, with a reader."""
        stream = Stream(peer)
        _, trusted = settings.reads_header(peer)
        reader = ProxyHeaderReader(settings, self.owner, "key", trusted=trusted)
        stream.protocol = reader
        reader.makeConnection(stream)
        return stream

    def rejections(self) -> list[dict[str, str]]:
        return self.owner.rejected

    def assert_rejected(self, stream: Stream, reason: str, text: str) -> dict[str, str]:
        """One rejection with ``reason``; aborted; never handed over; closed once."""
        [event] = self.rejections()
        self.assertEqual(event["reason"], reason)
        self.assertIn(text, event["detail"])
        self.assertEqual(event["peer"], format_address(stream.getPeer()))
        self.assertTrue(stream.aborted)
        self.assertEqual(self.owner.addresses, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        stream.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.owner.closed, [stream.protocol])
        return event

    def assert_spliced(self, stream: Stream, address: IAddress, data: bytes) -> Recorder:
        """The owner got ``address``; its protocol is spliced and got ``data``."""
        self.assertEqual(self.owner.addresses, [address])
        [inner] = self.owner.protocols
        self.assertIs(stream.protocol, inner)
        self.assertEqual(inner.made, 1)
        self.assertIs(inner.transport, stream)
        self.assertEqual(b"".join(inner.received), data)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.rejections(), [])
        self.assertFalse(stream.disconnecting)
        return inner


class ReaderTests(ReaderCase):
    """Reading the header and handing the connection over."""

    def test_split_header_then_tls(self) -> None:
        """A header in three reads, then TLS bytes: the real address and every byte."""
        stream = self.connect(self.settings())
        data = v2_tcp4(tlvs=[(PP2_TYPE_ALPN, b"h2")]) + CLIENT_HELLO[:5]
        stream.receive(data[:7], data[7:20], data[20:])
        self.assertEqual(stream.value(), b"")
        inner = self.assert_spliced(
            stream, IPv4Address("TCP", "203.0.113.7", 51234), CLIENT_HELLO[:5]
        )
        self.assertEqual(len(inner.received), 1, "the rest is handed over in one call")
        stream.receive(CLIENT_HELLO[5:])
        self.assertEqual(b"".join(inner.received), CLIENT_HELLO)

    def test_every_split(self) -> None:
        """Any two cuts of header + payload give the same address and payload."""
        data = build_v1_header(("2001:db8::7", 51234), ("2001:db8::1", 443)) + CLIENT_HELLO
        for first, second in itertools.combinations(range(1, len(data)), 2):
            self.owner = FakeOwner(self.clock)
            stream = self.connect(self.settings())
            stream.receive(*split_at(data, [first, second]))
            self.assert_spliced(stream, IPv6Address("TCP", "2001:db8::7", 51234), CLIENT_HELLO)

    def test_header_alone(self) -> None:
        """A header with nothing after it splices without a data call."""
        stream = self.connect(self.settings())
        stream.receive(v2_tcp4())
        inner = self.assert_spliced(stream, IPv4Address("TCP", "203.0.113.7", 51234), b"")
        self.assertEqual(inner.received, [])

    def test_local_uses_socket_peer(self) -> None:
        """LOCAL (a health check), UNKNOWN and UNSPEC leave the socket's own peer."""
        for data in (build_v2_header(command=LOCAL), build_v1_header(), build_v2_header()):
            self.owner = FakeOwner(self.clock)
            stream = self.connect(self.settings())
            stream.receive(data + b"x")
            self.assert_spliced(stream, BALANCER, b"x")

    def test_unix_source(self) -> None:
        """A UNIX source becomes a UNIXAddress."""
        stream = self.connect(self.settings())
        stream.receive(build_v2_header(b"/run/client", b"/run/server"))
        self.assert_spliced(stream, UNIXAddress(b"/run/client"), b"")

    def test_half_close_reaches_inner(self) -> None:
        """After the splice, the transport's half-close and close go to the inner."""
        stream = self.connect(self.settings())
        stream.receive(v2_tcp4())
        half = IHalfCloseableProtocol(stream.protocol)
        half.readConnectionLost()
        half.writeConnectionLost()
        stream.protocol.connectionLost(Failure(ConnectionDone()))
        [inner] = self.owner.protocols
        self.assertEqual((inner.read_lost, inner.write_lost, len(inner.lost)), (1, 1, 1))

    def test_forwarding_fallback(self) -> None:
        """A transport that keeps calling the reader still reaches the inner protocol."""
        stream = self.connect(self.settings())
        reader = stream.protocol
        stream.receive(v2_tcp4())
        [inner] = self.owner.protocols
        reader.dataReceived(b"late")
        reader.readConnectionLost()
        reader.writeConnectionLost()
        reader.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(inner.received, [b"late"])
        self.assertEqual((inner.read_lost, inner.write_lost, len(inner.lost)), (1, 1, 1))

    def test_forwarding_fallback_plain_inner(self) -> None:
        """Forwarding a half-close to an inner that cannot half-close closes instead."""
        stream = self.connect(self.settings())
        reader: ProxyHeaderReader = stream.protocol
        reader.inner = Protocol()
        reader.readConnectionLost()
        reader.writeConnectionLost()
        self.assertTrue(stream.disconnecting)

    def test_refused_by_owner(self) -> None:
        """When the owner refuses the client (a limit), the connection is aborted."""
        self.owner.refuse = True
        stream = self.connect(self.settings())
        stream.receive(v2_tcp4() + CLIENT_HELLO)
        self.assertEqual(self.owner.addresses, [IPv4Address("TCP", "203.0.113.7", 51234)])
        self.assertTrue(stream.aborted)
        self.assertIsInstance(stream.protocol, ProxyHeaderReader)
        self.assertEqual(self.rejections(), [])

    def test_bad_settings(self) -> None:
        """An unknown mode or a negative timeout is refused."""
        self.assertRaises(ValueError, self.settings, mode="sometimes")
        self.assertRaises(ValueError, self.settings, timeout=-1)

    def test_drain_before_header(self) -> None:
        """A drain closes a socket still waiting for its header, at once."""
        stream = self.connect(self.settings())
        stream.receive(b"PROXY TCP4")
        stream.protocol.drain()
        self.assertTrue(stream.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        stream.protocol.drain_expired()
        stream.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.owner.closed), 1)

    def test_drain_after_hand_over_is_not_ours(self) -> None:
        """A reader that handed over leaves the drain to the connection it handed to."""
        stream = self.connect(self.settings())
        reader = stream.protocol
        stream.receive(v2_tcp4())
        reader.drain()
        self.assertFalse(stream.aborted)


class RejectionTests(ReaderCase):
    """Every way a header can be refused, each logged once."""

    def test_timeout(self) -> None:
        """No complete header within the timeout: ``proxy_timeout``."""
        stream = self.connect(self.settings(timeout=3.0))
        stream.receive(v2_tcp4()[:10])
        self.clock.advance(2.9)
        self.assertEqual(self.rejections(), [])
        self.clock.advance(0.2)
        self.assert_rejected(stream, PROXY_TIMEOUT, "within 3 s (10 bytes received)")
        stream.receive(b"more")  # data after the abort is ignored
        self.assertEqual(len(self.rejections()), 1)

    def test_no_timeout(self) -> None:
        """A timeout of 0 arms no timer."""
        self.connect(self.settings(timeout=0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_untrusted_required(self) -> None:
        """In ``required`` mode an untrusted source is rejected at once."""
        stream = self.connect(self.settings(), STRANGER)
        self.assert_rejected(stream, PROXY_UNTRUSTED, "not trusted")

    def test_untrusted_sends_header(self) -> None:
        """A reader for an untrusted source, in ``optional`` mode, refuses a header.

        The factory gives such a source no reader at all; this is the reader's own
        guard should one be made.
        """
        for data in (v2_tcp4(), b"PROXY TCP4 1.2.3.4"):
            self.owner = FakeOwner(self.clock)
            stream = self.connect(self.settings("optional"), STRANGER)
            stream.receive(data[:3], data[3:])
            self.assert_rejected(stream, PROXY_UNTRUSTED, "untrusted source sent a PROXY header")

    def test_missing(self) -> None:
        """In ``required`` mode a ClientHello first is ``proxy_missing``."""
        stream = self.connect(self.settings())
        stream.receive(CLIENT_HELLO)
        self.assert_rejected(stream, PROXY_MISSING, "TLS handshake record (0x16)")

    def test_malformed(self) -> None:
        """A malformed header is ``proxy_malformed``, with what was wrong."""
        stream = self.connect(self.settings("optional"))
        stream.receive(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n")
        self.assert_rejected(stream, PROXY_MALFORMED, "port '99999'")

    def test_half_close_before_header(self) -> None:
        """End of input before the header completes: a quiet close."""
        stream = self.connect(self.settings())
        stream.receive(b"PROXY TCP4")
        stream.protocol.readConnectionLost()
        self.assertTrue(stream.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.rejections(), [])
        self.assertEqual(self.owner.addresses, [])

    def test_lost_before_header(self) -> None:
        """A connection lost before the header cancels the deadline; nothing is logged."""
        stream = self.connect(self.settings())
        stream.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.rejections(), [])


class OptionalModeTests(ReaderCase):
    """``optional``: a header is read if one comes; otherwise nothing changes."""

    def test_without_header(self) -> None:
        """A trusted source's ClientHello first passes through with the socket's peer."""
        stream = self.connect(self.settings("optional"), BALANCER)
        stream.receive(CLIENT_HELLO[:1], CLIENT_HELLO[1:])
        self.assert_spliced(stream, BALANCER, CLIENT_HELLO)

    def test_untrusted_gets_no_reader(self) -> None:
        """An untrusted source gets no reader: it goes straight to TLS."""
        settings = self.settings("optional")
        self.assertEqual(settings.reads_header(STRANGER), (False, False))
        self.assertEqual(settings.reads_header(BALANCER), (True, True))
        self.assertEqual(settings.reads_header(None), (False, False))

    def test_required_reads_every_peer(self) -> None:
        """In ``required`` mode every socket gets a reader, trusted or not."""
        settings = self.settings("required")
        self.assertEqual(settings.reads_header(STRANGER), (True, False))
        self.assertEqual(settings.reads_header(BALANCER), (True, True))

    def test_with_header(self) -> None:
        """A trusted source's header is read."""
        stream = self.connect(self.settings("optional"))
        stream.receive(v2_tcp4()[:12], v2_tcp4()[12:] + b"\x16")
        self.assert_spliced(stream, IPv4Address("TCP", "203.0.113.7", 51234), b"\x16")

    def test_near_miss(self) -> None:
        """Bytes that start like the v2 signature and then differ pass through whole."""
        stream = self.connect(self.settings("optional"))
        stream.receive(b"\r\n", b"\r\nhello\n")
        self.assert_spliced(stream, BALANCER, b"\r\n\r\nhello\n")


class TrustTests(SynchronousTestCase):
    """Which socket peers may send headers."""

    def test_networks(self) -> None:
        """IPv4, IPv6 and IPv4-mapped IPv6 peers match their networks; UNIX never."""
        trusted = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
        cases: list[tuple[IAddress, bool]] = [
            (IPv4Address("TCP", "10.1.2.3", 1), True),
            (IPv4Address("TCP", "11.1.2.3", 1), False),
            (IPv6Address("TCP", "2001:db8::5", 1), True),
            (IPv6Address("TCP", "2001:db8::5%eth0", 1), True),
            (IPv6Address("TCP", "::ffff:10.0.0.1", 1), True),
            (IPv6Address("TCP", "2001:db9::5", 1), False),
            (IPv6Address("TCP", "not-an-ip", 1), False),
            (UNIXAddress(b"/run/lb.sock"), False),
        ]
        for address, expected in cases:
            self.assertEqual(is_trusted(address, trusted), expected, address)


class WithTLSFactoryTests(SynchronousTestCase):
    """The reader in front of the real TLS factory: the record and limits see the client."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pki = make_pki(self.mktemp())
        self.events = capture_events(self)
        self.limiter = ConnectionLimiter(max_total=3, max_per_ip=1)
        self.factory = server_factory(
            self.pki,
            self.clock,
            limiter=self.limiter,
            proxy=ProxySettings("required", LOOPBACK, 5.0),
        )

    def accept(self, peer: IAddress = BALANCER) -> Stream | None:
        """Accept a socket from ``peer`` as a port does; None if it was refused."""
        stream = Stream(peer)
        protocol = self.factory.buildProtocol(peer)
        if protocol is None:
            return None
        stream.protocol = protocol
        protocol.makeConnection(stream)
        return stream

    def open(self, header: bytes) -> tuple[Stream, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        """Connect through the reader, send ``header`` + the ClientHello in one read."""
        stream = self.accept()
        assert stream is not None
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context(self.pki).wrap_bio(incoming, outgoing, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        stream.receive(header + outgoing.read())
        return stream, client, incoming, outgoing

    def pump(self, stream: Stream, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        for _ in range(20):
            data = stream.value()
            stream.clear()
            incoming.write(data)
            sent = outgoing.read()
            if sent:
                stream.receive(sent)
            if not data and not sent:
                return

    def test_echo_and_record(self) -> None:
        """TLS after the header works, and ``connection_closed`` names the real client."""
        stream, client, incoming, outgoing = self.open(v2_tcp4(crc=True))
        for _ in range(10):
            self.pump(stream, incoming, outgoing)
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                continue
        client.write(b"hello\n")
        self.pump(stream, incoming, outgoing)
        self.assertEqual(client.read(100), b"hello\n")
        transport: ITransport = stream
        self.assertEqual(stream.protocol.getPeer(), IPv4Address("TCP", "203.0.113.7", 51234))
        self.assertIs(stream.protocol.transport, transport)
        stream.protocol.connectionLost(Failure(ConnectionDone()))
        [closed] = named(self.events, "connection_closed")
        self.assertEqual(closed["peer"], "203.0.113.7:51234")

    def test_limits_count_the_client(self) -> None:
        """Per-IP limits count the PROXY source: one balancer, two clients, one refused."""
        first, *_ = self.open(v2_tcp4())
        other = build_v2_header(("203.0.113.8", 1), ("192.0.2.1", 443))
        second, *_ = self.open(other)
        third, *_ = self.open(v2_tcp4())
        self.assertFalse(first.aborted or second.aborted)
        self.assertTrue(third.aborted)
        [refused] = named(self.events, "connection_refused")
        self.assertEqual(refused["peer"], "203.0.113.7:51234")
        self.assertEqual(refused["reason"], "limit_per_ip")
        for stream in (first, second):
            stream.protocol.connectionLost(Failure(ConnectionDone()))

    def test_waiting_for_header_counts(self) -> None:
        """Sockets waiting for their header count against the total and as open.

        Only the total refuses them (a burst through one balancer is not one
        client); once a header names a client, that client's per-IP count applies.
        """
        waiting = [self.accept() for _ in range(3)]
        self.assertTrue(all(isinstance(w and w.protocol, ProxyHeaderReader) for w in waiting))
        self.assertEqual(self.limiter.total, 3)
        self.assertEqual(self.limiter.count("127.0.0.1"), 3)
        self.assertEqual(len(self.factory.connections), 3)
        self.assertIsNone(self.accept(), "the fourth socket is over --max-connections")
        [refused] = named(self.events, "connection_refused")
        self.assertEqual(refused["reason"], "limit_total")
        first, second, third = waiting
        assert first is not None and second is not None and third is not None
        first.receive(v2_tcp4())
        self.assertEqual(self.limiter.count("127.0.0.1"), 2)
        self.assertEqual(self.limiter.count("203.0.113.7"), 1)
        self.assertIsInstance(first.protocol, TLSServerConnection)
        second.receive(v2_tcp4())
        self.assertTrue(second.aborted, "the same client twice is over its per-IP limit")
        second.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limiter.total, 2)
        third.protocol.connectionLost(Failure(ConnectionDone()))
        first.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limiter.total, 0)
        self.assertEqual(self.factory.connections, set())

    def test_drain_closes_sockets_waiting_for_header(self) -> None:
        """A drain aborts sockets still waiting for their header; the drain then finishes."""
        stream = self.accept()
        assert stream is not None
        drained = self.factory.drain(10)
        self.assertTrue(stream.aborted)
        self.assertNoResult(drained)
        stream.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(drained))
        self.assertEqual(self.limiter.total, 0)

    def test_optional_untrusted_goes_straight_to_tls(self) -> None:
        """With ``optional``, a peer outside --proxy-trusted gets TLS at once."""
        factory = server_factory(
            self.pki, self.clock, proxy=ProxySettings("optional", LOOPBACK, 5.0)
        )
        self.assertIsInstance(factory.buildProtocol(STRANGER), TLSServerConnection)
        self.assertIsInstance(factory.buildProtocol(BALANCER), ProxyHeaderReader)

    def test_rejections_warn_once_then_sum_up(self) -> None:
        """A flood of bad headers: one warning per reason, then a summary per window."""
        for _ in range(2):
            stream = self.accept(STRANGER)
            assert stream is not None
            self.assertTrue(stream.aborted)
            stream.protocol.connectionLost(Failure(ConnectionDone()))
        warned = named(self.events, "proxy_rejected")
        self.assertEqual(len(warned), 2)
        self.assertEqual([e["log_level"].name for e in warned], ["warn", "info"])
        self.assertEqual(self.limiter.total, 0)
        self.clock.advance(10)
        [summary] = named(self.events, "proxy_rejections")
        self.assertEqual(summary["counts"], {"proxy_untrusted": 1})
        self.assertEqual(summary["top_peers"], {"198.51.100.9": 1})
