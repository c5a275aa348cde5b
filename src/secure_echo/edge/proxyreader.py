"""The PROXY protocol reader in front of TLS (the parser is :mod:`secure_echo.wire.proxy`).

A :class:`ProxyHeaderReader` is the stream's protocol from accept until the
header is read; its owner (the TLS server factory) admits the socket first, so
a socket waiting for its header already counts against the limits, is counted
as an open connection and is closed by a drain.

State rules of a :class:`ProxyHeaderReader` (everything that changes them lives in
this module):

1. Accept: :meth:`ProxySettings.reads_header` decides whether a socket gets a
   reader at all.  A peer is *trusted* inside one of the ``trusted`` networks
   (IPv4-mapped IPv6 peers count as IPv4; UNIX peers never are).  In ``optional``
   mode an untrusted peer gets no reader: it goes straight to TLS with its own
   address, exactly as if the PROXY protocol were off.  In ``required`` mode an
   untrusted peer is rejected at once (``proxy_untrusted``).  Otherwise the
   header deadline starts.
2. First bytes, ``optional`` mode (a trusted peer): bytes that cannot start a
   header (a TLS ClientHello starts with 0x16) hand the connection over with the
   socket's own peer.  Deciding takes at most 12 bytes, in practice the first one.
3. First bytes, ``required`` mode: anything but a header is ``proxy_missing``.
4. Header: bytes are buffered across reads until the header is complete.  A
   malformed one is ``proxy_malformed``; no complete header within ``timeout`` is
   ``proxy_timeout``; an end of input before it is a silent close.
5. Hand-over: the owner's ``header_read`` gets the real client address (the
   socket's own peer for LOCAL, v1 UNKNOWN and v2 UNSPEC), so its limits and logs
   count the client, not the balancer.  ``None`` (a limit refused the client; the
   owner logged that) aborts the connection.  Else the protocol it returns
   becomes the stream transport's ``protocol`` (Twisted's TCP and UNIX transports
   dispatch every read, half-close and close through that attribute), is
   connected, and gets the bytes that followed the header.  From then on this
   reader is out of the path.
6. Each rejection is reported to the owner (``reason``, ``detail``) and aborts the
   connection.  A reader that ends without a hand-over (rejected, timed out,
   closed, drained) tells the owner so once, through ``reader_closed``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol as TwistedProtocol
from typing_extensions import override
from zope.interface import implementer

from secure_echo.wire.proxy import (
    PROXY_TIMEOUT,
    PROXY_UNTRUSTED,
    ProxyHeader,
    ProxyProtocolError,
    looks_like_proxy,
    parse_header,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime
    from twisted.python.failure import Failure


Mode = Literal["optional", "required"]
OPTIONAL: Final = "optional"
REQUIRED: Final = "required"
MODES: Final = (OPTIONAL, REQUIRED)
TrustedNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_trusted(address: IAddress, trusted: Sequence[TrustedNetwork]) -> bool:
    """Whether ``address`` (a socket's peer) lies in one of the ``trusted`` networks."""
    if not isinstance(address, IPv4Address | IPv6Address):
        return False
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted)


@dataclass(frozen=True)
class ProxySettings:
    """``--proxy-protocol``, ``--proxy-trusted`` and ``--proxy-timeout``.

    ``mode``: ``required`` (every connection must start with a header from a
    trusted source) or ``optional`` (a trusted source's header is read if one
    comes).  ``timeout``: seconds for the whole header to arrive (0: no deadline).
    """

    mode: Mode = REQUIRED
    trusted: tuple[TrustedNetwork, ...] = ()
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            msg = f"mode must be one of {', '.join(MODES)}, not {self.mode!r}"
            raise ValueError(msg)
        if self.timeout < 0:
            msg = f"timeout must not be negative, not {self.timeout}"
            raise ValueError(msg)

    def reads_header(self, peer: IAddress | None) -> tuple[bool, bool]:
        """Whether a socket from ``peer`` gets a reader, and whether ``peer`` is trusted."""
        trusted = peer is not None and is_trusted(peer, self.trusted)
        return self.mode == REQUIRED or trusted, trusted


class ReaderOwner(Protocol):
    """What a reader reports to the factory that admitted its socket."""

    clock: IReactorTime

    def header_read(self, reader: ProxyHeaderReader, address: IAddress) -> IProtocol | None:
        """The header names ``address``: the protocol to hand over to, or None (refused)."""
        ...

    def header_rejected(self, reader: ProxyHeaderReader, reason: str, detail: str) -> None:
        """The header (or its absence) was refused: log it."""

    def reader_closed(self, reader: ProxyHeaderReader) -> None:
        """The socket ended without a hand-over (its admission is over)."""


@implementer(IHalfCloseableProtocol)
class ProxyHeaderReader(TwistedProtocol):
    """The stream's protocol until the header is read; see the module's state rules."""

    def __init__(
        self, settings: ProxySettings, owner: ReaderOwner, peer_key: str, *, trusted: bool
    ) -> None:
        self.settings = settings
        self.owner = owner
        #: The key the owner admitted the socket under (the socket's own peer).
        self.peer_key = peer_key
        self.trusted = trusted
        #: The protocol the connection was handed to (state rule 5).
        self.inner: IProtocol | None = None
        self._buffer = bytearray()
        self._timer: IDelayedCall | None = None
        self._finished = False

    @override
    def connectionMade(self) -> None:
        settings = self.settings
        if settings.mode == REQUIRED and not self.trusted:
            self._reject(PROXY_UNTRUSTED, "the source is not trusted to send PROXY headers")
            return
        if settings.timeout > 0:
            self._timer = self.owner.clock.callLater(settings.timeout, self._timed_out)

    @override
    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            # Only for a transport that does not dispatch through ``protocol``.
            self.inner.dataReceived(data)
            return
        if self._finished:
            return
        buffer = self._buffer
        buffer += data
        if self.settings.mode == OPTIONAL:
            looks = looks_like_proxy(buffer)
            if looks is None:
                return
            if not looks:
                transport = self.transport
                assert transport is not None
                self._hand_over(transport.getPeer(), bytes(buffer))
                return
            if not self.trusted:
                # ProxySettings.reads_header gives untrusted peers no reader in this
                # mode; should one get here all the same, it may not claim an address.
                self._reject(
                    PROXY_UNTRUSTED,
                    "an untrusted source sent a PROXY header; only --proxy-trusted "
                    "networks may claim another client's address",
                )
                return
        try:
            header = parse_header(buffer)
        except ProxyProtocolError as error:
            self._reject(error.reason, error.text)
            return
        if header is not None:
            self._hand_over(self._source_address(header), bytes(buffer[header.consumed :]))

    def readConnectionLost(self) -> None:
        """End of input: before the header, just close; after it, the inner's business."""
        inner = self.inner
        if inner is not None:
            if IHalfCloseableProtocol.providedBy(inner):
                cast("IHalfCloseableProtocol", inner).readConnectionLost()
            else:
                cast("Any", self.transport).loseConnection()
            return
        self._finish()
        transport = self.transport
        if transport is not None:
            transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Our write side closed."""
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            cast("IHalfCloseableProtocol", inner).writeConnectionLost()

    @override
    def connectionLost(self, reason: Failure | None = None) -> None:
        self._finish()
        inner = self.inner
        if inner is not None:
            inner.connectionLost(reason)  # type: ignore[arg-type]
        else:
            self.owner.reader_closed(self)

    def drain(self) -> None:
        """The server is stopping: no client byte was answered yet, so close at once."""
        if self.inner is None:
            self._finish()
            transport = self.transport
            if transport is not None:
                cast("Any", transport).abortConnection()

    def drain_expired(self) -> None:
        """Nothing to do: a drain closed this socket at once."""

    # -- internals ------------------------------------------------------------------

    def _source_address(self, header: ProxyHeader) -> IAddress:
        """The address the owner is told: the client's, as far as known."""
        if header.source_path is not None:
            return UNIXAddress(header.source_path)
        if header.source is None:
            # LOCAL (the balancer's own health check), v1 UNKNOWN, v2 UNSPEC: the
            # spec says to use the connection's real endpoints.
            transport = self.transport
            assert transport is not None
            return transport.getPeer()
        host, port = header.source
        if header.family == "TCP6":
            return IPv6Address("TCP", host, port)
        return IPv4Address("TCP", host, port)

    def _hand_over(self, address: IAddress, rest: bytes) -> None:
        """State rule 5: splice the owner's protocol into the stream."""
        self._finish()
        self._buffer = bytearray()
        transport = self.transport
        assert transport is not None
        inner = self.owner.header_read(self, address)
        if inner is None:
            # Refused by a limit; the owner has logged why.
            cast("Any", transport).abortConnection()
            return
        self.inner = inner
        # Twisted's tcp.Connection reads ``protocol`` at every dispatch, so from
        # now on the inner protocol gets reads, half-closes and the close directly.
        cast("Any", transport).protocol = inner
        inner.makeConnection(transport)
        if rest:
            inner.dataReceived(rest)

    def _reject(self, reason: str, detail: str) -> None:
        self._finish()
        transport = self.transport
        assert transport is not None
        self.owner.header_rejected(self, reason, detail)
        cast("Any", transport).abortConnection()

    def _timed_out(self) -> None:
        self._timer = None
        if self._finished:  # pragma: no cover - _finish cancels the timer
            return
        self._reject(
            PROXY_TIMEOUT,
            f"no complete PROXY header within {self.settings.timeout:g} s "
            f"({len(self._buffer)} bytes received)",
        )

    def _finish(self) -> None:
        self._finished = True
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
