"""The TCP transport of a TLS connection: each read lands where OpenSSL takes it.

Twisted's ``tcp.Server.doRead`` asks the socket for ``recv(65536)``: a new 64 KiB
``bytes`` per read, shrunk to what arrived, handed to the protocol, which copies it
into OpenSSL's memory BIO.  :class:`TLSStreamServer` reads with ``recv_into`` into
one buffer shared by every connection (the reactor runs one ``doRead`` at a time)
and, when its protocol can take it from there (:class:`BufferReader`, the TLS
connection), tells it only how many bytes arrived; OpenSSL reads them from the
buffer.  Any other protocol (the PROXY protocol reader, before its hand-over) gets
``bytes`` as usual.

Everything else is Twisted's ``tcp.Server``: writing, closing, half-close, producers.
:func:`use_stream_transport` makes a listening port build these instead of
``tcp.Server`` (``tcp.Port.transport`` is the class it instantiates per accepted
socket); ports of other kinds (UNIX) keep theirs.

Contract of ``doRead`` (Twisted's own): ``None`` after a read, ``CONNECTION_DONE``
at end of input, ``CONNECTION_LOST`` on a socket error; ``EWOULDBLOCK`` is not an
error.
"""

from __future__ import annotations

import socket
import sys
from errno import EWOULDBLOCK
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from twisted.internet import main, tcp

from secure_echo.edge.addresses import host_port
from secure_echo.tls.recordio import READ_SIZE, read_view

if TYPE_CHECKING:
    from twisted.internet.error import ConnectionDone, ConnectionLost


class BufferReader(Protocol):
    """A protocol that takes a read from the shared buffer itself."""

    def received_into(self, count: int) -> None:
        """``count`` bytes were read into the record I/O's input buffer."""


class TLSStreamServer(tcp.Server):
    """``tcp.Server`` reading into the shared input buffer (see the module docstring)."""

    #: Whether the socket came with TCP_NODELAY on, from a listening socket that
    #: has it (Linux copies the option to each socket it accepts): the
    #: connection then need not set it again.
    no_delay_inherited: ClassVar[bool] = False

    def doRead(self) -> ConnectionLost | ConnectionDone | None:  # type: ignore[override]
        """Read once; hand the bytes to the protocol, by count if it can take them so."""
        view: Any = _VIEW
        try:
            count = self.socket.recv_into(view, READ_SIZE)
        except OSError as error:
            if error.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not count:
            return main.CONNECTION_DONE
        protocol = self.protocol
        received = getattr(protocol, "received_into", None)
        if received is not None:
            received(count)
        else:
            protocol.dataReceived(view[:count].tobytes())
        return None

    def address_texts(self) -> tuple[str, str]:
        """The client's address and ours, as :func:`format_address` writes them.

        Made from the socket's own tuples, as Twisted makes ``getPeer`` and
        ``getHost``, without building the two address objects on the way: the
        record of every connection starts with both.  Numeric, from the kernel:
        nothing in them needs escaping.
        """
        client: Any = self.client  # Twisted types it as a tuple of objects
        peer = host_port(client[0], client[1], ipv6=len(client) != _IPV4_TUPLE)
        local = self.socket.getsockname()
        if len(local) == _IPV4_TUPLE:
            return peer, host_port(local[0], local[1], ipv6=False)
        # What Twisted's getHost does for IPv6: the zone of a link-local address
        # comes from getnameinfo (Python's own tuple leaves it out).
        host = socket.getnameinfo(local, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
        return peer, host_port(host, local[1], ipv6=True)


#: The length of an IPv4 socket address tuple (host, port); IPv6's has four items.
_IPV4_TUPLE: Final = 2


class NoDelayStreamServer(TLSStreamServer):
    """A :class:`TLSStreamServer` accepted with TCP_NODELAY already on."""

    no_delay_inherited = True


_VIEW: Final = read_view()


def use_stream_transport(port: object) -> bool:
    """Make ``port`` (a listening TCP port) accept into :class:`TLSStreamServer`\\ s.

    True if it does now; False for a port that is not Twisted's plain TCP one, or
    when the record I/O has no shared buffer (pyOpenSSL without its cffi handles).
    On Linux the listening socket gets TCP_NODELAY, which every accepted socket
    then has from the start (:class:`NoDelayStreamServer`): one system call less
    per connection.
    """
    if _VIEW is None or type(port) is not tcp.Port or port.transport is not tcp.Server:
        return False
    port.transport = NoDelayStreamServer if _listener_no_delay(port) else TLSStreamServer
    return True


def _listener_no_delay(port: tcp.Port) -> bool:
    """Switch TCP_NODELAY on for ``port``'s socket; whether accepted sockets inherit it."""
    sock = getattr(port, "socket", None)
    if not sys.platform.startswith("linux") or not isinstance(sock, socket.socket):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    except OSError:
        return False
