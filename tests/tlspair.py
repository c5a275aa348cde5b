"""An in-memory TLS client wired to a :class:`TLSServerConnection`.

The server side runs on a ``StringTransport`` (so time and I/O are simulated); the
client is the stdlib ``ssl.SSLObject`` over memory BIOs, an independent TLS
implementation's view of what the server sends.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from secure_echo.line.handler import EchoHandler, ILineHandler
from secure_echo.line.protocol import LineFactory, LineSettings
from secure_echo.tls.connection import TLSServerConnection
from secure_echo.tls.factory import TLSServerFactory
from secure_echo.tls.lifecycle import Phase
from secure_echo.tls.policy import ContextHolder, TLSSettings, load_and_validate
from secure_echo.tls.recordio import READ_SIZE, read_view

if TYPE_CHECKING:
    from pathlib import Path

    from twisted.internet.task import Clock
    from twisted.trial.unittest import SynchronousTestCase

    from secure_echo.edge.limits import ConnectionLimiter, RefusalLog
    from secure_echo.edge.proxyreader import ProxySettings
    from tests.helpers import PKI


class CountingTransport(StringTransport):
    """A StringTransport that counts writes and accepts TCP_NODELAY."""

    def __init__(self, peer: IPv4Address | None = None) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
            peerAddress=peer or IPv4Address("TCP", "127.0.0.1", 50000),
        )
        self.writes = 0
        self.nodelay = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class StreamTransport(CountingTransport):
    """A CountingTransport that reports unsent bytes the way Twisted's TCP does.

    ``dataBuffer``, ``offset`` and ``_tempDataLen`` are the attributes of
    ``twisted.internet.abstract.FileDescriptor`` that the transport's write-stall
    check reads; tests set them to simulate a send buffer that is (not) draining.
    ``unregisterProducer`` is as lenient as ``FileDescriptor``'s: a close followed
    by an abort unregisters twice.
    """

    def __init__(self, peer: IPv4Address | None = None) -> None:
        super().__init__(peer)
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.write_closed = False

    def loseWriteConnection(self) -> None:
        """Half-close, as Twisted's TCP transport does for a lingering close."""
        self.write_closed = True

    def set_unsent(self, count: int) -> None:
        """Pretend ``count`` bytes wait in the send buffer."""
        self.dataBuffer = b"x" * count
        self.offset = 0
        self._tempDataLen = 0

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


@implementer(ILineHandler)
class HeldHandler:
    """Returns a Deferred per line that the test fires."""

    def __init__(self) -> None:
        self.pending: list[tuple[bytes, Deferred[bytes]]] = []

    def handle_line(self, line: bytes) -> Deferred[bytes]:
        """Hold the line; the test fires ``pending[i][1]`` with the reply."""
        deferred: Deferred[bytes] = Deferred()
        self.pending.append((line, deferred))
        return deferred


def server_factory(
    pki: PKI,
    clock: Clock,
    *,
    settings: TLSSettings | None = None,
    handler: ILineHandler | None = None,
    line_settings: LineSettings | None = None,
    handshake_timeout: float = 10.0,
    idle_timeout: float = 300.0,
    write_stall_timeout: float = 30.0,
    max_connection_age: float = 0.0,
    limiter: ConnectionLimiter | None = None,
    refusals: RefusalLog | None = None,
    contexts: ContextHolder | None = None,
    proxy: ProxySettings | None = None,
) -> TLSServerFactory:
    """A TLS server factory for ``pki``'s server certificate, echoing lines.

    ``contexts`` replaces the holder made from ``settings`` (e.g. one shared with a
    reloader).
    """
    if contexts is None:
        tls = load_and_validate(settings or TLSSettings(pki.server_cert, pki.server_key))
        contexts = ContextHolder(tls)
    return TLSServerFactory(
        contexts,
        LineFactory(handler or EchoHandler(), line_settings or LineSettings(), clock),
        clock,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
        write_stall_timeout=write_stall_timeout,
        max_connection_age=max_connection_age,
        limiter=limiter,
        refusals=refusals,
        proxy=proxy,
    )


class TLSPair:
    """One server connection and one stdlib client, pumped by hand.

    ``via_buffer``: deliver the client's bytes as :class:`TLSStreamServer` does, through
    the shared input buffer and ``received_into``, instead of ``dataReceived``.
    """

    via_buffer = False

    def __init__(
        self,
        factory: TLSServerFactory,
        client_context: ssl.SSLContext,
        server_hostname: str | None = "localhost",
        transport: CountingTransport | None = None,
    ) -> None:
        self.transport = transport if transport is not None else CountingTransport()
        server = factory.buildProtocol(self.transport.getPeer())
        assert isinstance(server, TLSServerConnection), "the factory refused the connection"
        self.server = server
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.client = client_context.wrap_bio(
            self.incoming, self.outgoing, server_side=False, server_hostname=server_hostname
        )
        self.received = b""
        self.client_closed = False
        self.server.makeConnection(self.transport)

    def to_server(self) -> bool:
        """Move client ciphertext to the server; True if any moved."""
        data = self.outgoing.read()
        if data and self.server.phase is not Phase.CLOSED:
            if self.via_buffer:
                self._through_buffer(data)
            else:
                self.server.dataReceived(data)
        return bool(data)

    def _through_buffer(self, data: bytes) -> None:
        """Deliver ``data`` read by read into the shared input buffer, as the stream does."""
        view = read_view()
        assert view is not None, "no shared input buffer without pyOpenSSL's handles"
        for start in range(0, len(data), READ_SIZE):
            piece = data[start : start + READ_SIZE]
            # Bytes beyond the read are stale (an earlier read's): they must not be taken.
            guard = min(len(view), len(piece) + 16)
            view[:guard] = piece + b"\xee" * (guard - len(piece))
            self.server.received_into(len(piece))
            if self.server.phase is Phase.CLOSED:
                return

    def to_client(self) -> bool:
        """Move server ciphertext to the client; True if any moved."""
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.incoming.write(data)
        return bool(data)

    def handshake(self) -> None:
        """Run the handshake to completion (raises the client's ssl error if any)."""
        for _ in range(20):
            try:
                self.client.do_handshake()
            except ssl.SSLWantReadError:
                pass
            else:
                self.pump()
                return
            moved = self.to_server()
            moved = self.to_client() or moved
            if not moved:
                break
        self.client.do_handshake()

    def read_client(self) -> None:
        """Read all plaintext the client can decrypt now."""
        while not self.client_closed:
            try:
                chunk = self.client.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self.client_closed = True
                return
            if not chunk:
                self.client_closed = True
                return
            self.received += chunk

    def pump(self) -> None:
        """Exchange bytes until neither side has anything to send."""
        for _ in range(100):
            moved = self.to_server()
            moved = self.to_client() or moved
            self.read_client()
            if not moved:
                return

    def send(self, data: bytes) -> None:
        """Encrypt ``data`` on the client side (not yet delivered)."""
        self.client.write(data)

    def finish_stream(self, reason: Failure | None = None) -> None:
        """Tell the server its stream transport is gone, if it asked to close."""
        self.server.connectionLost(reason or Failure(ConnectionDone()))


def client_context(
    pki: PKI, *, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A verifying stdlib client context trusting ``pki``'s CA."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def capture_events(case: SynchronousTestCase) -> EventLoggingObserver:
    """Record every log event for the duration of ``case``."""
    events = EventLoggingObserver()
    globalLogPublisher.addObserver(events)
    case.addCleanup(globalLogPublisher.removeObserver, events)
    return events


def named(events: EventLoggingObserver, name: str) -> list[dict[str, Any]]:
    """The recorded events whose ``event`` field is ``name``."""
    return [dict(event) for event in events if event.get("event") == name]
