"""Ciphertext out to the stream: optimistic send, unsent bytes, stalls, lingering close.

A :class:`StreamWriter` sits between a TLS connection and its stream transport
(Twisted's TCP or UNIX connection, or a test double).  It is registered with the
transport as a streaming producer, so the transport tells it when its send
buffer fills (a client that does not read) and drains again.

It owns what the connection needs to know about bytes on their way out:

* :meth:`send` writes at once when the transport holds nothing (one ``send``
  system call instead of a buffered write and two ``epoll_ctl``), queueing only
  what the kernel does not take;
* :meth:`held` (bytes the socket never took) and :meth:`unsent` (those plus what
  the kernel has not had acknowledged) say how far the output got;
* :meth:`stall_left` samples :meth:`unsent` and says how long the client has
  left to make progress;
* :meth:`close` closes after everything written, and tells the caller when
  client input is still unread, so that the close can linger (:meth:`linger`)
  instead of letting the kernel answer that input with a reset that destroys the
  replies.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import ITransport

#: ioctl requests: bytes waiting to be read; bytes sent but not acknowledged.
_FIONREAD: Final = termios.FIONREAD
_SIOCOUTQ: Final = termios.TIOCOUTQ
#: ``struct tcp_info``: its length to ask for, and where ``tcpi_bytes_acked`` (a u64,
#: Linux 4.1 and later) lies in it.
_TCP_INFO_SIZE: Final = 256
_BYTES_ACKED_AT: Final = 120


class WriterOwner(Protocol):
    """What the writer tells its connection."""

    def write_full(self, *, full: bool) -> None:
        """The transport's send buffer filled (``True``) or drained (``False``)."""


def kernel_count(sock: socket.socket | None, request: int) -> int | None:
    """An ioctl byte count for ``sock`` (FIONREAD or SIOCOUTQ), None if unknown."""
    if sock is None:
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return int(struct.unpack("i", raw)[0])


def tcp_bytes_acked(sock: socket.socket | None) -> int | None:
    """Bytes the peer's TCP has acknowledged on ``sock`` in all, None if unknown.

    Unlike the send queue (SIOCOUTQ), this count survives a reset: it still
    says, once the peer reset the connection, how much of our output reached it.
    """
    if sock is None or sock.family not in {socket.AF_INET, socket.AF_INET6}:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except (OSError, ValueError):
        return None
    if len(info) < _BYTES_ACKED_AT + 8:  # pragma: no cover - kernels before 4.1
        return None
    return int(struct.unpack_from("Q", info, _BYTES_ACKED_AT)[0])


#: The buffer attributes the optimistic send reads: ``FileDescriptor``'s class
#: defaults, and one its ``__init__`` sets.
_BUFFER_ATTRIBUTES: Final = ("dataBuffer", "offset")
_INSTANCE_ATTRIBUTE: Final = "_tempDataLen"
#: Transport class -> whether it is Twisted's kind (asked once per class, not per
#: connection; there are a handful of transport classes).
_DIRECT_KINDS: dict[type, bool] = {}


def direct_socket(transport: object) -> socket.socket | None:
    """The socket to send on directly, if ``transport`` is Twisted's own kind.

    The optimistic send relies on ``FileDescriptor``'s (undocumented) buffer
    attributes; any other transport (a test double, a TLS-in-TLS wrapper) takes
    the plain ``write`` path.
    """
    kind = type(transport)
    direct = _DIRECT_KINDS.get(kind)
    if direct is None:
        direct = issubclass(kind, FileDescriptor) and all(
            hasattr(kind, name) for name in _BUFFER_ATTRIBUTES
        )
        _DIRECT_KINDS[kind] = direct
    if not direct:
        return None
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, socket.socket) or not hasattr(transport, _INSTANCE_ATTRIBUTE):
        return None
    return sock


class _Gone:
    """The owner of a finished connection's writer: hears nothing."""

    def write_full(self, *, full: bool) -> None:
        """Nothing is left to pause or resume."""


_GONE: Final = _Gone()


@implementer(IPushProducer)
class StreamWriter:
    """The write side of one connection's stream transport (see the module docstring)."""

    __slots__ = (
        "_owner",
        "_since",
        "_socket",
        "_transport",
        "_unsent_before",
        "final",
        "full",
        "trailer",
        "unacked_replies",
        "written",
    )

    def __init__(self, transport: ITransport, owner: WriterOwner) -> None:
        self._transport: Any = transport
        self._owner = owner
        self._socket = direct_socket(transport)
        #: Whether the transport's send buffer is full (it paused us).
        self.full = False
        #: Stall sampling: the unsent count at the last progress, and when.
        self._unsent_before: int | None = None
        self._since = 0.0
        #: Bytes of the close itself (close_notify), sent after every reply.
        self.trailer = 0
        #: Reply bytes the client's TCP had not acknowledged at the last look.
        self.unacked_replies = 0
        #: Every byte handed to the transport (sent, queued or held).
        self.written = 0
        #: Reply bytes not acknowledged at the last look before the socket went
        #: (taken as the transport stops, and at an abort); None if never taken.
        self.final: int | None = None
        # Twisted's stream transports are IConsumers too; ITransport does not say so.
        cast("Any", transport).registerProducer(self, True)

    # -- IPushProducer, called by the stream transport ----------------------------

    def pauseProducing(self) -> None:
        """The transport's send buffer is full."""
        self.full = True
        self._owner.write_full(full=True)

    def resumeProducing(self) -> None:
        """The transport's send buffer drained."""
        self.full = False
        self._owner.write_full(full=False)

    def stopProducing(self) -> None:
        """The transport is going away; take a last look while the socket is there.

        Twisted calls this before it closes the socket (so TCP's count of
        acknowledged bytes can still be read); the connection reads :attr:`final`
        in its ``connectionLost``.
        """
        self.final = self.replies_unacknowledged()

    # -- sending --------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        """Hand ciphertext to the stream, sending at once when nothing is queued.

        Twisted's ``FileDescriptor.write`` queues the data and registers for
        writability (an ``epoll_ctl``), writes on the next reactor turn, then
        unregisters (another ``epoll_ctl``).  When its queue is empty, which is the
        usual case for an echo, a direct ``send`` does the same work in one system
        call; only what the kernel does not take goes through the queue, so the
        byte order is kept and the transport's flow control still sees it.

        ``data`` may be a view of the record I/O's buffer: it is sent before
        anything else runs, and what goes to the queue is copied.
        """
        self.written += len(data)
        transport = self._transport
        sock = self._socket
        if (
            sock is not None
            and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)
            and not transport.disconnecting
        ):
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # EAGAIN, or an error the transport will find itself
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(bytes(data))

    def write_plain(self, data: bytes) -> None:
        """Write bytes that are not TLS (the plaintext client's hint)."""
        self.written += len(data)
        self._transport.write(data)

    # -- how far the output got ------------------------------------------------------

    def held(self) -> int:
        """Bytes written to the transport that the socket has not taken (0 if unknown)."""
        transport = self._transport
        data = getattr(transport, "dataBuffer", None)
        offset = getattr(transport, "offset", None)
        pending = getattr(transport, "_tempDataLen", None)
        if data is None or not isinstance(offset, int) or not isinstance(pending, int):
            return 0
        return len(data) - offset + pending

    def unsent(self) -> int | None:
        """Bytes not yet acknowledged by the client, if the transport can say.

        Twisted's TCP transport says what it still holds; the kernel says what it
        has sent but the client has not acknowledged (its send queue), so a client
        that reads slowly is seen making progress.
        """
        if getattr(self._transport, "dataBuffer", None) is None:
            return None
        queued = kernel_count(self._socket, _SIOCOUTQ)
        return self.held() + (queued or 0)

    def start_stall_watch(self, now: float) -> None:
        """Begin measuring progress from ``now``."""
        self._unsent_before = self.unsent()
        self._since = now

    def stall_left(self, now: float, timeout: float) -> float:
        """Seconds the client has left to make progress (<= 0: it stalled).

        Progress is a smaller unsent count than at the last sample that made
        progress; each one restarts the ``timeout``.
        """
        unsent = self.unsent()
        before = self._unsent_before
        if unsent is not None and before is not None and unsent < before:
            self._unsent_before = unsent
            self._since = now
        return self._since + timeout - now

    # -- closing ---------------------------------------------------------------------

    def replies_unacknowledged(self) -> int:
        """Reply bytes not yet acknowledged by the client's TCP (the close's own excluded).

        TCP acknowledges in order and the close (:attr:`trailer`) went last, so what
        is left beyond it is replies.  Remembered in :attr:`unacked_replies`.
        Without TCP's count (a UNIX socket, a test double), what the transport
        and the kernel still hold stands in for it.
        """
        acked = tcp_bytes_acked(self._socket)
        if acked is not None:
            unacked = self.written - acked
        else:
            unsent = self.unsent()
            unacked = self.held() if unsent is None else unsent
        self.unacked_replies = max(0, unacked - self.trailer)
        return self.unacked_replies

    def close(self) -> bool:
        """Close the stream after everything written; False if the close must linger.

        It lingers (:meth:`linger`) while client input is left unread: closing a
        socket whose receive queue holds bytes makes the kernel send a reset, and
        the client's kernel then drops every reply it has not yet read.  It
        lingers too while replies are not yet acknowledged: only then does the
        daemon know they arrived, and a reset meanwhile is recorded as one.
        """
        transport = self._transport
        transport.unregisterProducer()
        unread = kernel_count(self._socket, _FIONREAD) or 0
        if unread > 0 or self.replies_unacknowledged() > 0:
            return False
        transport.loseConnection()
        return True

    def linger(self) -> None:
        """FIN after the replies; keep reading (and dropping) the client's input.

        Registered with the transport again, so that its end calls
        :meth:`stopProducing` while the socket can still be asked.
        """
        transport = self._transport
        transport.registerProducer(self, True)
        transport.loseWriteConnection()
        transport.resumeProducing()

    def lose(self) -> None:
        """Close the stream now (a lingering close whose client is done)."""
        self._transport.loseConnection()

    def detach(self) -> None:
        """Let go of the owner (its connection has ended).

        The owner holds this object and this object its owner: without this the
        pair, and what hangs off it, waits for the cyclic garbage collector.
        """
        self._owner = _GONE

    def abort(self) -> None:
        """Drop the stream at once, unsent output included (looked at first)."""
        self.final = self.replies_unacknowledged()
        transport = self._transport
        transport.unregisterProducer()
        transport.abortConnection()
