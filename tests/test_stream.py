"""The TCP transport that reads into the shared input buffer (:mod:`secure_echo.tls.stream`).

The TLS connection's own suites run again with every read delivered through the
buffer (``received_into``), as :class:`TLSStreamServer` delivers it; ``doRead`` is
tested on real sockets, and :func:`use_stream_transport` on real ports.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

from twisted.internet import main, tcp, unix
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from secure_echo.edge.addresses import format_address
from secure_echo.tls import recordio
from secure_echo.tls.connection import TLSServerConnection
from secure_echo.tls.recordio import READ_SIZE, input_bytes
from secure_echo.tls.stream import NoDelayStreamServer, TLSStreamServer, use_stream_transport
from tests import test_transport
from tests.helpers import make_pki
from tests.tlspair import TLSPair, server_factory


class BufferedEchoOverTLSTests(test_transport.EchoOverTLSTests):
    """The echo, close and error cases with reads delivered through the buffer."""

    def setUp(self) -> None:
        self.patch(TLSPair, "via_buffer", True)
        super().setUp()


class BufferedHandshakeTests(test_transport.HandshakeTests):
    """The handshake cases with reads delivered through the buffer."""

    def setUp(self) -> None:
        self.patch(TLSPair, "via_buffer", True)
        super().setUp()


class BufferedPublicEchoTests(test_transport.EchoOverTLSTests):
    """The same through the buffer into the public-API record I/O (its feed_input)."""

    def setUp(self) -> None:
        self.patch(TLSPair, "via_buffer", True)
        self.patch(recordio, "use_fast", False)
        super().setUp()


class BufferedFlowControlTests(test_transport.FlowControlTests):
    """Flow control with reads delivered through the buffer."""

    def setUp(self) -> None:
        self.patch(TLSPair, "via_buffer", True)
        super().setUp()


class _Counting(Protocol):
    """Takes reads by count, as the TLS connection does."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []

    def received_into(self, count: int) -> None:
        self.reads.append(input_bytes(count))


class _Plain(Protocol):
    """Takes reads as bytes, as every other protocol does."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)


class DoReadTests(SynchronousTestCase):
    """``doRead`` on a connected socket pair, one call at a time."""

    def server(self, protocol: Protocol) -> tuple[TLSStreamServer, socket.socket]:
        ours, peer = socket.socketpair()
        self.addCleanup(peer.close)
        self.addCleanup(ours.close)
        no_port: Any = None
        transport = TLSStreamServer(ours, protocol, ("127.0.0.1", 1), no_port, 1, MemoryReactor())
        protocol.makeConnection(transport)
        return transport, peer

    def test_by_count(self) -> None:
        """A protocol with ``received_into`` gets the count; the buffer holds the bytes."""
        protocol = _Counting()
        transport, peer = self.server(protocol)
        peer.sendall(b"first read")
        self.assertIsNone(transport.doRead())
        peer.sendall(b"2nd")
        self.assertIsNone(transport.doRead())
        self.assertEqual(protocol.reads, [b"first read", b"2nd"])

    def test_as_bytes(self) -> None:
        """Any other protocol gets ``bytes`` of exactly what arrived."""
        protocol = _Plain()
        transport, peer = self.server(protocol)
        peer.sendall(b"hello")
        self.assertIsNone(transport.doRead())
        self.assertEqual(protocol.reads, [b"hello"])
        self.assertIs(type(protocol.reads[0]), bytes)

    def test_at_most_one_buffer(self) -> None:
        """One read takes at most the buffer; the rest is the next read's."""
        protocol = _Plain()
        transport, peer = self.server(protocol)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * READ_SIZE)
        data = bytes(range(256)) * (READ_SIZE // 256 + 4)
        peer.sendall(data)
        while transport.doRead() is None and sum(map(len, protocol.reads)) < len(data):
            pass
        self.assertTrue(all(len(r) <= READ_SIZE for r in protocol.reads))
        self.assertEqual(b"".join(protocol.reads), data)

    def test_end_of_input(self) -> None:
        """A FIN is CONNECTION_DONE (then readConnectionLost or connectionLost)."""
        transport, peer = self.server(_Plain())
        peer.shutdown(socket.SHUT_WR)
        self.assertIs(transport.doRead(), main.CONNECTION_DONE)

    def test_nothing_to_read(self) -> None:
        """EWOULDBLOCK is not an error: nothing happens."""
        protocol = _Plain()
        transport, _ = self.server(protocol)
        self.assertIsNone(transport.doRead())
        self.assertEqual(protocol.reads, [])

    def test_socket_error(self) -> None:
        """Any other error (a reset) is CONNECTION_LOST."""
        transport, _ = self.server(_Plain())
        failing: Any = _FailingSocket(errno.ECONNRESET)
        transport.socket = failing
        self.assertIs(transport.doRead(), main.CONNECTION_LOST)


class _FailingSocket:
    def __init__(self, code: int) -> None:
        self.code = code

    def recv_into(self, view: Any, size: int) -> int:  # noqa: ARG002
        raise OSError(self.code, "failed")

    def fileno(self) -> int:
        return -1


class AddressTextsTests(SynchronousTestCase):
    """``address_texts`` writes what ``format_address`` writes of getPeer and getHost."""

    def accepted(self, family: socket.AddressFamily, host: str) -> TLSStreamServer:
        listener = socket.socket(family)
        self.addCleanup(listener.close)
        try:
            listener.bind((host, 0))
        except OSError:  # pragma: no cover - a machine without IPv6 on loopback
            raise SkipTest(f"no {host} here") from None
        listener.listen()
        client = socket.create_connection(listener.getsockname()[:2])
        self.addCleanup(client.close)
        accepted, address = listener.accept()
        self.addCleanup(accepted.close)
        # As Twisted's port builds it: IPv6 hosts through getnameinfo.
        peer = tcp._getrealname(address)
        no_port: Any = None
        return TLSStreamServer(accepted, _Plain(), peer, no_port, 1, MemoryReactor())

    def check(self, transport: TLSStreamServer) -> None:
        expected = (format_address(transport.getPeer()), format_address(transport.getHost()))
        self.assertEqual(transport.address_texts(), expected)

    def test_ipv4(self) -> None:
        """IPv4: host:port, both ends."""
        transport = self.accepted(socket.AF_INET, "127.0.0.1")
        self.check(transport)
        self.assertTrue(transport.address_texts()[1].startswith("127.0.0.1:"))

    def test_ipv6(self) -> None:
        """IPv6: [host]:port, both ends."""
        transport = self.accepted(socket.AF_INET6, "::1")
        self.check(transport)
        self.assertTrue(transport.address_texts()[1].startswith("[::1]:"))


class UseStreamTransportTests(SynchronousTestCase):
    """Which listening ports get the stream transport."""

    def test_tcp_port(self) -> None:
        """Twisted's TCP port builds TLSStreamServers from then on."""
        port = tcp.Port(0, Factory(), reactor=MemoryReactor())
        self.assertTrue(use_stream_transport(port))
        self.assertIs(port.transport, TLSStreamServer)
        self.assertFalse(use_stream_transport(port), "already done")

    def test_listening_socket_gets_no_delay(self) -> None:
        """A listening port's socket gets TCP_NODELAY, and what it accepts has it at once."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = tcp.Port(0, Factory(), reactor=MemoryReactor())
        port.socket = listener
        self.assertTrue(use_stream_transport(port))
        if not sys.platform.startswith("linux"):  # pragma: no cover - Linux runs the suite
            self.assertIs(port.transport, TLSStreamServer)
            return
        self.assertIs(port.transport, NoDelayStreamServer)
        self.assertTrue(NoDelayStreamServer.no_delay_inherited)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        self.assertEqual(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    def test_other_ports(self) -> None:
        """UNIX ports, TCP port subclasses and other objects are left alone."""

        class OwnPort(tcp.Port):
            pass

        unix_port = unix.Port(b"/nonexistent", Factory(), reactor=MemoryReactor())
        own = OwnPort(0, Factory(), reactor=MemoryReactor())
        for port in (unix_port, own, object()):
            self.assertFalse(use_stream_transport(port))
        self.assertIs(unix_port.transport, unix.Server)
        self.assertIs(own.transport, tcp.Server)


class _TextsTransport(StringTransport):
    """A transport that writes its own address texts, as the stream transport does."""

    def address_texts(self) -> tuple[str, str]:
        return "client-text", "local-text"


class FactoryAddressTests(SynchronousTestCase):
    """A direct client's record takes its addresses from the stream transport."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())

    def test_direct_client(self) -> None:
        """The factory's connection asks the transport, not Twisted's address objects."""
        factory = server_factory(self.pki, Clock())
        address = IPv4Address("TCP", "192.0.2.7", 4000)
        protocol = factory.buildProtocol(address)
        assert isinstance(protocol, TLSServerConnection)
        transport = _TextsTransport(peerAddress=address)
        protocol.makeConnection(transport)
        self.assertEqual(
            (protocol.record.peer, protocol.record.local), ("client-text", "local-text")
        )
        self.assertEqual(protocol.getPeer(), address)
        protocol.connectionLost(None)
