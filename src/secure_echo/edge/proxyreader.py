"""The PROXY protocol reader in front of TLS (the parser is :mod:`secure_echo.wire.proxy`).

State rules of a :class:`ProxyHeaderReader` (everything that changes them lives in
this module):

1. Accept: the factory decides whether the socket's peer is *trusted* (inside one
   of the ``trusted`` networks; IPv4-mapped IPv6 peers count as IPv4; UNIX peers
   are never trusted).  In ``required`` mode an untrusted peer is rejected at once
   (``proxy_untrusted``).  Otherwise the header deadline starts.
2. First bytes, ``optional`` mode: bytes that cannot start a header (a TLS
   ClientHello starts with 0x16) hand the connection to the wrapped factory with
   the socket's own peer, exactly as if no reader were there.  A header from an
   untrusted peer is rejected (``proxy_untrusted``): anybody could claim any
   address.  Deciding takes at most 12 bytes, in practice the first one.
3. First bytes, ``required`` mode: anything but a header is ``proxy_missing``.
4. Header: bytes are buffered across reads until the header is complete.  A
   malformed one is ``proxy_malformed``; no complete header within ``timeout`` is
   ``proxy_timeout``; an end of input before it is a silent close.
5. Hand-over: the wrapped factory's ``buildProtocol`` gets the real client
   address (the socket's own peer for LOCAL, v1 UNKNOWN and v2 UNSPEC), so its
   limits and logs count the client, not the balancer.  ``None`` (a limit
   refused it; the wrapped factory logged that) aborts the connection.  Else the
   inner protocol becomes the stream transport's ``protocol`` (Twisted's TCP and
   UNIX transports dispatch every read, half-close and close through that
   attribute), is connected, and gets the bytes that followed the header.  From
   then on this reader is out of the path.
6. Each rejection logs one ``proxy_rejected`` event (``peer``: the socket's peer,
   ``reason``, ``detail``) and aborts the connection.  A rejected or timed-out
   connection never reaches the wrapped factory, so it counts against no limit and
   logs no ``connection_closed``.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from typing_extensions import override
from zope.interface import implementer

from secure_echo.edge.addresses import format_address
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


class WrappedFactory(Protocol):
    """What the reader needs from the factory behind it (a ``TLSServerFactory``)."""

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        """Build the connection's protocol for the client at ``addr``, or refuse."""
        ...


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


class ProxyProtocolFactory(Factory):
    """Reads a PROXY header, then hands the connection to ``wrapped``.

    ``mode``: ``required`` (every connection must start with a header from a
    trusted source) or ``optional`` (a header is read if one comes, from a trusted
    source).  ``trusted``: the networks whose headers are believed.  ``timeout``:
    seconds for the whole header to arrive (0: no deadline).
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        wrapped: WrappedFactory,
        clock: IReactorTime,
        mode: Mode = REQUIRED,
        trusted: Sequence[TrustedNetwork] = (),
        timeout: float = 5.0,
    ) -> None:
        if mode not in MODES:
            msg = f"mode must be one of {', '.join(MODES)}, not {mode!r}"
            raise ValueError(msg)
        if timeout < 0:
            msg = f"timeout must not be negative, not {timeout}"
            raise ValueError(msg)
        self.wrapped = wrapped
        self.clock = clock
        self.mode = mode
        self.trusted = tuple(trusted)
        self.timeout = timeout

    @override
    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderReader:  # type: ignore[override]
        trusted = addr is not None and is_trusted(addr, self.trusted)
        return ProxyHeaderReader(self, trusted=trusted)

    @override
    def startFactory(self) -> None:
        """The first port started: start the wrapped factory too (as WrappingFactory does)."""
        start = getattr(self.wrapped, "doStart", None)
        if start is not None:
            start()

    @override
    def stopFactory(self) -> None:
        """The last port stopped: stop the wrapped factory too."""
        stop = getattr(self.wrapped, "doStop", None)
        if stop is not None:
            stop()


@implementer(IHalfCloseableProtocol)
class ProxyHeaderReader(TwistedProtocol):
    """The stream's protocol until the header is read; see the module's state rules."""

    factory: ProxyProtocolFactory

    def __init__(self, factory: ProxyProtocolFactory, *, trusted: bool) -> None:
        self.factory = factory
        self.trusted = trusted
        #: The protocol the connection was handed to (state rule 5).
        self.inner: IProtocol | None = None
        self._buffer = bytearray()
        self._timer: IDelayedCall | None = None
        self._finished = False

    @override
    def connectionMade(self) -> None:
        factory = self.factory
        if factory.mode == REQUIRED and not self.trusted:
            self._reject(PROXY_UNTRUSTED, "the source is not trusted to send PROXY headers")
            return
        if factory.timeout > 0:
            self._timer = factory.clock.callLater(factory.timeout, self._timed_out)

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
        if self.factory.mode == OPTIONAL:
            looks = looks_like_proxy(buffer)
            if looks is None:
                return
            if not looks:
                transport = self.transport
                assert transport is not None
                self._hand_over(transport.getPeer(), bytes(buffer))
                return
            if not self.trusted:
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

    # -- internals ------------------------------------------------------------------

    def _source_address(self, header: ProxyHeader) -> IAddress:
        """The address the wrapped factory is told: the client's, as far as known."""
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
        """State rule 5: splice the wrapped factory's protocol into the stream."""
        self._finish()
        self._buffer = bytearray()
        transport = self.transport
        assert transport is not None
        inner = self.factory.wrapped.buildProtocol(address)
        if inner is None:
            # Refused by a limit; the wrapped factory has logged why.
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
        self.factory.log.warn(
            "PROXY header from {peer} rejected: {reason}: {detail}",
            event="proxy_rejected",
            peer=format_address(transport.getPeer()),
            reason=reason,
            detail=detail,
        )
        cast("Any", transport).abortConnection()

    def _timed_out(self) -> None:
        self._timer = None
        if self._finished:  # pragma: no cover - _finish cancels the timer
            return
        self._reject(
            PROXY_TIMEOUT,
            f"no complete PROXY header within {self.factory.timeout:g} s "
            f"({len(self._buffer)} bytes received)",
        )

    def _finish(self) -> None:
        self._finished = True
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
