"""An in-memory TLS client wired to a :class:`TLSServerConnection`.

The server side runs on a ``StringTransport`` (so time and I/O are simulated); the
client is the stdlib ``ssl.SSLObject`` over memory BIOs, an independent TLS
implementation's view of what the server sends.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from secure_echo.handler import EchoHandler, ILineHandler
from secure_echo.protocol import LineFactory, LineSettings
from secure_echo.tls import ContextHolder, TLSSettings, load_and_validate
from secure_echo.transport import TLSServerFactory

if TYPE_CHECKING:
    from pathlib import Path

    from twisted.internet.task import Clock

    from tests.helpers import PKI


class CountingTransport(StringTransport):
    """A StringTransport that counts writes and accepts TCP_NODELAY."""

    def __init__(self) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
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


def server_factory(
    pki: PKI,
    clock: Clock,
    *,
    settings: TLSSettings | None = None,
    handler: ILineHandler | None = None,
    line_settings: LineSettings | None = None,
    handshake_timeout: float = 10.0,
) -> TLSServerFactory:
    """A TLS server factory for ``pki``'s server certificate, echoing lines."""
    tls = load_and_validate(settings or TLSSettings(pki.server_cert, pki.server_key))
    return TLSServerFactory(
        ContextHolder(tls),
        LineFactory(handler or EchoHandler(), line_settings or LineSettings(), clock),
        clock,
        handshake_timeout=handshake_timeout,
    )


class TLSPair:
    """One server connection and one stdlib client, pumped by hand."""

    def __init__(
        self,
        factory: TLSServerFactory,
        client_context: ssl.SSLContext,
        server_hostname: str | None = "localhost",
    ) -> None:
        self.transport = CountingTransport()
        self.server = factory.buildProtocol(self.transport.getPeer())
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
        if data and not self.server._lost:
            self.server.dataReceived(data)
        return bool(data)

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
