"""TLS server transport: TLS over any stream transport, with nothing lost at close.

A :class:`TLSServerConnection` is the protocol of a plain stream transport (TCP,
UNIX, systemd-passed sockets: whatever ``--listen`` names) and the transport of the
application protocol.  It runs a pyOpenSSL ``Connection`` over memory BIOs.

Why not ``TLSMemoryBIOProtocol``: it drops replies to lines that arrive with the
client's close_notify or FIN, has no handshake timeout, logs no handshake failure,
defers every write to a ``callLater(0)`` and raises two exceptions per read.  This
module is small enough to own those decisions.

State rules (everything that changes them lives in this module):

1. Accept: a TLS ``Connection`` is made from the context current *now* (so a
   reload affects new connections only), TCP_NODELAY is set, and the handshake
   timer starts.  The application protocol does not exist yet.
2. First bytes: if the first byte is not a TLS handshake record (0x16) the client
   gets one plaintext ``-ERR tls-required`` line and the connection closes
   (``plaintext_client``).
3. Handshake complete: the timer stops, the TLS facts go into the
   :class:`~secure_echo.tls.record.ConnectionRecord`, and only now is the application
   protocol built and connected.  A handshake failure is logged with its reason
   and the connection closes (``handshake_failed``).
4. Reads: all application data decrypted from one socket read is handed over in
   one ``dataReceived`` call; everything the application writes during that call
   is encrypted and sent as one batch at its end.  Writes made at other times
   (a handler's Deferred firing) go out at once.
5. End of input (close_notify, or a TCP FIN without one): the application gets
   ``readConnectionLost`` *after* every byte before it.  The write side stays open,
   so every reply still reaches a client that can read; the application calls
   ``loseConnection`` when it has answered everything.
6. ``loseConnection``: pending output is encrypted, close_notify is sent, and the
   stream transport closes once its buffer is written.
7. Reading is paused while either the application asks (its pending replies are
   over its bound) or the stream transport's send buffer is full (a client that
   does not read); see :meth:`_update_reading`.  While the buffer is full, the
   unsent byte count must shrink within ``write_stall_timeout`` or the connection
   is dropped (``slow_reader``); a close that cannot flush within that time is
   dropped too.
8. Deadlines, one timer per phase: the handshake must finish within
   ``handshake_timeout`` (``handshake_timeout``); after it, a client silent for
   ``idle_timeout`` is closed (``idle_timeout``) and one older than
   ``max_connection_age`` is drained (``max_connection_age``).  The idle check
   costs one clock read per socket read, no timer reset.
9. Drain (shutdown): reading stops, the application finishes the replies to what
   it has read, then the connection closes with close_notify
   (``server_shutdown``).
10. One ``connection_closed`` event per accepted connection, at the very end.
    Connections refused by a limit never become a connection; the factory's
    :class:`~secure_echo.edge.limits.RefusalLog` records them.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import socket
import struct
import termios
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from OpenSSL import SSL
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from typing_extensions import override
from zope.interface import implementer

from secure_echo.edge.addresses import format_address
from secure_echo.edge.limits import DRAINING, ConnectionLimiter, RefusalLog, peer_key
from secure_echo.tls.policy import fingerprint_sha256, session_reused, subject_alt_names
from secure_echo.tls.record import CloseReason, ConnectionRecord
from secure_echo.tls.recordio import record_io

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime
    from twisted.python.failure import Failure

    from secure_echo.tls.policy import ContextHolder

#: The first byte of a TLS handshake record.
_TLS_HANDSHAKE = 0x16


class LineAppFactory(Protocol):
    """What the transport needs from the application side."""

    def build(self, record: ConnectionRecord) -> IProtocol:
        """Build the application protocol for a connection that completed its handshake."""
        ...


#: ioctl requests: bytes waiting to be read; bytes sent but not acknowledged.
_FIONREAD: Final = termios.FIONREAD
_SIOCOUTQ: Final = termios.TIOCOUTQ
#: How often per write-stall timeout the unsent count is sampled: a stall is
#: found at most a tenth of the timeout late.
_STALL_SAMPLES: Final = 10
#: Time differences below this are rounding, not time left.
_EPSILON: Final = 1e-9
#: Seconds between two checks of a lingering close.
_LINGER_POLL: Final = 0.05


def _kernel_count(sock: socket.socket | None, request: int) -> int | None:
    """An ioctl byte count for ``sock`` (FIONREAD or SIOCOUTQ), None if unknown."""
    if sock is None:
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return int(struct.unpack("i", raw)[0])


def _direct_socket(transport: object) -> socket.socket | None:
    """The socket to send on directly, if ``transport`` is Twisted's own kind.

    The optimistic send in :meth:`TLSServerConnection._send_stream` relies on
    ``FileDescriptor``'s (undocumented) buffer attributes; any other transport
    (a test double, a TLS-in-TLS wrapper) takes the plain ``write`` path.
    """
    if not isinstance(transport, FileDescriptor):
        return None
    sock = getattr(transport, "socket", None)
    needed = ("dataBuffer", "offset", "_tempDataLen")
    if not isinstance(sock, socket.socket) or not all(hasattr(transport, a) for a in needed):
        return None
    return sock


def ssl_error_text(error: SSL.Error) -> str:
    """Turn a pyOpenSSL error into a short reason, e.g. ``no shared cipher``."""
    if isinstance(error, SSL.SysCallError):
        return "unexpected EOF" if error.args[:1] == (-1,) else f"system error: {error.args}"
    items = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [str(item[-1]) for item in items if isinstance(item, tuple) and item]
    return "; ".join(reasons) or repr(error)


@implementer(IPushProducer)
class _WriteSide:
    """Registered with the stream transport: tells us when its send buffer fills."""

    def __init__(self, connection: TLSServerConnection) -> None:
        self._connection = connection

    def pauseProducing(self) -> None:
        self._connection._set_write_full(full=True)

    def resumeProducing(self) -> None:
        self._connection._set_write_full(full=False)

    def stopProducing(self) -> None:
        """The stream transport is going away; connectionLost follows."""


@implementer(IHalfCloseableProtocol, ITransport, IPushProducer)
class TLSServerConnection(TwistedProtocol):
    """One TLS connection: protocol of the stream, transport of the application."""

    log = Logger()
    factory: TLSServerFactory

    def __init__(
        self,
        factory: TLSServerFactory,
        conn_id: int,
        peer_key: str = "",
        peer_address: IAddress | None = None,
    ) -> None:
        self.factory = factory
        self.conn_id = conn_id
        self.peer_key = peer_key
        #: The client's address as the factory was told it (the PROXY protocol's
        #: source, when a balancer sent one); else the stream transport's peer.
        self.peer_address = peer_address
        self.record: ConnectionRecord
        self._tls: SSL.Connection
        self._app: IProtocol | None = None
        self._handshake_done = False
        self._first_bytes = True
        self._in_read = False
        self._out: list[bytes] = []
        self._closing = False
        self._stream_closing = False
        self._lingering = False
        self._lost = False
        self._read_ended = False
        self._peer_finished: CloseReason | None = None
        self._app_paused = False
        self._draining = False
        self._write_full = False
        self._reading_paused = False
        self._timer: IDelayedCall | None = None
        self._stall_timer: IDelayedCall | None = None
        self._stall_unsent: int | None = None
        self._stall_since = 0.0
        self._last_read = 0.0
        self._verify_error: str | None = None
        self._socket: socket.socket | None = None

    # -- stream side ------------------------------------------------------------

    @override
    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        factory = self.factory
        clock = factory.clock
        # Without TCP_NODELAY the first reply after a TLS 1.3 handshake can wait
        # ~40 ms behind the session tickets.  UNIX sockets have no such option.
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # The socket may already be gone; connectionLost follows then.
            with contextlib.suppress(OSError):
                set_no_delay(True)
        self.record = ConnectionRecord(
            self.conn_id,
            format_address(self.peer_address or transport.getPeer()),
            format_address(transport.getHost()),
            clock.seconds(),
        )
        self._tls = SSL.Connection(factory.contexts.context, None)
        self._tls.set_accept_state()
        self._tls.set_app_data(self)
        self._io = record_io(self._tls)
        self._timer = clock.callLater(factory.handshake_timeout, self._handshake_timed_out)
        cast("Any", transport).registerProducer(_WriteSide(self), True)
        self._socket = _direct_socket(transport)
        factory.connection_opened(self)

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._lost or self._lingering:
            return  # lingering: input after our close is read and dropped
        if not self._handshake_done:
            if self._first_bytes:
                self._first_bytes = False
                if data[0] != _TLS_HANDSHAKE:
                    self._plaintext_client()
                    return
            self._io.feed(data)
            if not self._continue_handshake():
                return
        else:
            self._last_read = self.factory.clock.seconds()
            self._io.feed(data)
        self._read_application_data()

    def readConnectionLost(self) -> None:
        """The client's TCP stream ended (FIN); see state rule 5."""
        if self._lingering:
            # The client read our close and closed too: nothing is left to lose.
            cast("Any", self.transport).loseConnection()
            return
        if self._lost or self._closing:
            return
        if not self._handshake_done:
            self._fail_handshake("client closed the connection during the handshake")
            return
        if self._peer_finished is None:
            self._peer_finished = CloseReason.CLIENT_CLOSED
        self._end_of_input()

    def writeConnectionLost(self) -> None:
        """Our write side closed; only happens after loseConnection, nothing to do."""

    @override
    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._lost:  # pragma: no cover - the stream transport calls this once
            return
        self._lost = True
        self._cancel_timer()
        self._cancel_stall_timer()
        record = self.record
        if record.close_reason is None:
            if not self._handshake_done:
                record.close_reason = CloseReason.HANDSHAKE_FAILED
                record.tls_error = record.tls_error or "connection closed before the handshake"
            elif self._closing and self._peer_finished is not None:
                record.close_reason = self._peer_finished
            else:
                record.close_reason = CloseReason.CONNECTION_LOST
        app = self._app
        self._app = None
        self._tls.set_app_data(None)
        try:
            if app is not None:
                app.connectionLost(reason)  # type: ignore[arg-type]
        finally:
            self.factory.connection_closed(self)

    # -- handshake --------------------------------------------------------------

    def _continue_handshake(self) -> bool:
        """Advance the handshake; True once it is complete."""
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            self._flush_tls()
            return False
        except SSL.Error as error:
            reason = ssl_error_text(error)
            if self._verify_error is not None:
                reason = f"{reason}: {self._verify_error}"
            self._fail_handshake(reason)
            return False
        self._handshake_completed()
        return True

    def note_verify_error(self, reason: str) -> None:
        """Called by the context's verify callback with why it refused a certificate."""
        self._verify_error = reason

    def _handshake_completed(self) -> None:
        self._handshake_done = True
        factory = self.factory
        self._cancel_timer()
        self._last_read = factory.clock.seconds()
        self._arm_established()
        tls = self._tls
        record = self.record
        record.handshake_ms = round((factory.clock.seconds() - record.started) * 1000.0, 3)
        record.tls_version = tls.get_protocol_version_name()
        record.cipher = tls.get_cipher_name()
        record.group = tls.get_group_name()
        sni = tls.get_servername()
        record.sni = sni.decode("ascii", "replace") if sni else None
        alpn = tls.get_alpn_proto_negotiated()
        record.alpn = alpn.decode("ascii", "replace") if alpn else None
        peer_cert = tls.get_peer_certificate(as_cryptography=True)
        if peer_cert is not None:
            record.client_cert_subject = peer_cert.subject.rfc4514_string()
            record.client_cert_sha256 = fingerprint_sha256(peer_cert)
            record.client_cert_sans = subject_alt_names(peer_cert)
            record.client_cert_not_after = peer_cert.not_valid_after_utc.isoformat()
        record.resumed = session_reused(tls)
        # The session tickets OpenSSL just queued are not sent here: the read that
        # finished the handshake is read on at once (dataReceived), and whatever it
        # leads to (the first replies, or nothing) flushes the outgoing BIO, so the
        # tickets leave in the same send as the first replies.
        app = factory.app_factory.build(record)
        self._app = app
        app.makeConnection(self)

    def _fail_handshake(self, reason: str) -> None:
        record = self.record
        record.close_reason = CloseReason.HANDSHAKE_FAILED
        record.tls_error = reason
        self.factory.log.warn(
            "TLS handshake with {peer} failed: {reason}",
            event="handshake_failed",
            conn_id=self.conn_id,
            peer=record.peer,
            reason=reason,
        )
        # The alert OpenSSL queued tells the client why; send it before closing.
        self._flush_tls()
        self._close_stream()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        record = self.record
        record.close_reason = CloseReason.HANDSHAKE_TIMEOUT
        record.tls_error = f"no handshake within {self.factory.handshake_timeout:g} s"
        self._abort_stream()

    # -- deadlines ----------------------------------------------------------------

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _arm_established(self) -> None:
        """Arm the timer for the nearer of the idle and the age deadline."""
        factory = self.factory
        deadlines: list[float] = []
        if factory.idle_timeout > 0:
            deadlines.append(self._last_read + factory.idle_timeout)
        if factory.max_connection_age > 0:
            deadlines.append(self.record.started + factory.max_connection_age)
        if deadlines:
            delay = max(min(deadlines) - factory.clock.seconds(), 0.0)
            self._timer = factory.clock.callLater(delay, self._established_deadline)

    def _established_deadline(self) -> None:
        self._timer = None
        if self._closing or self._lost:
            return
        factory = self.factory
        now = factory.clock.seconds()
        age = factory.max_connection_age
        if age > 0 and now >= self.record.started + age:
            self.drain(CloseReason.MAX_CONNECTION_AGE)
            return
        if factory.idle_timeout > 0 and now >= self._last_read + factory.idle_timeout:
            if getattr(self._app, "pending", 0):
                # We still owe replies: the silence is ours, not the client's.
                # The handler timeout bounds the wait; look again after it.
                self._last_read = now
            else:
                self.close(CloseReason.IDLE_TIMEOUT)
                return
        self._arm_established()

    def drain(self, reason: CloseReason = CloseReason.SERVER_SHUTDOWN) -> None:
        """Stop reading, let the application finish its replies, then close."""
        if self._closing or self._lost:
            return
        if self.record.close_reason is None:
            self.record.close_reason = reason
        if not self._handshake_done:
            self._abort_stream()
            return
        # Reading stays off for good (the app's resumeProducing must not restart
        # it), so silence is ours: the idle deadline must not cut the replies short.
        self._cancel_timer()
        self._draining = True
        self._update_reading()
        drain = getattr(self._app, "drain", None)
        if drain is not None:
            drain()
        else:
            self.loseConnection()

    def _unsent(self) -> int | None:
        """Bytes not yet acknowledged by the client, if the transport can say.

        Twisted's TCP transport says what it still holds; the kernel says what it
        has sent but the client has not acknowledged (its send queue), so a client
        that reads slowly is seen making progress.
        """
        transport = self.transport
        data = getattr(transport, "dataBuffer", None)
        offset = getattr(transport, "offset", None)
        pending = getattr(transport, "_tempDataLen", None)
        if data is None or not isinstance(offset, int) or not isinstance(pending, int):
            return None
        queued = _kernel_count(self._socket, _SIOCOUTQ)
        return len(data) - offset + pending + (queued or 0)

    def _cancel_stall_timer(self) -> None:
        timer, self._stall_timer = self._stall_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _arm_stall_timer(self) -> None:
        """Start watching the unsent count; it is sampled ten times per timeout."""
        if self._stall_timer is None and self.factory.write_stall_timeout > 0:
            self._stall_unsent = self._unsent()
            self._stall_since = self.factory.clock.seconds()
            self._stall_timer = self.factory.clock.callLater(
                self.factory.write_stall_timeout / _STALL_SAMPLES, self._stall_check
            )

    def _stall_check(self) -> None:
        """State rule 7: no progress for the whole timeout means a slow reader."""
        self._stall_timer = None
        if self._lost:
            return
        clock = self.factory.clock
        timeout = self.factory.write_stall_timeout
        unsent = self._unsent()
        before = self._stall_unsent
        if unsent is not None and before is not None and unsent < before:
            self._stall_unsent = unsent
            self._stall_since = clock.seconds()
        left = self._stall_since + timeout - clock.seconds()
        if left > _EPSILON:
            self._stall_timer = clock.callLater(
                min(timeout / _STALL_SAMPLES, left), self._stall_check
            )
            return
        record = self.record
        if record.close_reason is None:
            record.close_reason = CloseReason.SLOW_READER
        self.factory.log.info(
            "connection {conn_id} from {peer}: client stopped reading for {timeout:g} s",
            event="slow_reader",
            conn_id=self.conn_id,
            peer=record.peer,
            timeout=self.factory.write_stall_timeout,
            unsent=unsent,
        )
        self._abort_stream()

    def _plaintext_client(self) -> None:
        record = self.record
        record.close_reason = CloseReason.PLAINTEXT_CLIENT
        transport = self.transport
        assert transport is not None
        transport.write(self.factory.plaintext_reply)
        self._close_stream()

    # -- application data -------------------------------------------------------

    def _read_application_data(self) -> None:
        chunks, finished, error = self._io.read()
        app = self._app
        flushed = False
        if chunks and app is not None:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.record.bytes_in += len(data)
            self._in_read = True
            try:
                app.dataReceived(data)
            finally:
                self._in_read = False
                out = self._out
                if out:
                    self._out = []
                    # Encrypting drains the whole outgoing BIO, tickets included.
                    self._encrypt(out[0] if len(out) == 1 else b"".join(out))
                    flushed = True
        if error is not None:
            self._tls_failed(ssl_error_text(error))
            return
        if finished:
            self._peer_finished = CloseReason.EOF
            self._end_of_input()
        elif not flushed:
            # A renegotiation refusal, a key update or a ticket may be pending.
            self._flush_tls()

    def _end_of_input(self) -> None:
        if self._read_ended:
            return
        self._read_ended = True
        app = self._app
        if app is not None and IHalfCloseableProtocol.providedBy(app):
            cast("IHalfCloseableProtocol", app).readConnectionLost()
        else:
            self.loseConnection()

    def _tls_failed(self, reason: str) -> None:
        record = self.record
        record.close_reason = CloseReason.TLS_ERROR
        record.tls_error = reason
        self.factory.log.warn(
            "TLS error from {peer}: {reason}",
            event="tls_error",
            conn_id=self.conn_id,
            peer=record.peer,
            reason=reason,
        )
        self._flush_tls()
        self._close_stream()

    def _encrypt(self, data: bytes) -> None:
        """Encrypt ``data`` and hand the records to the stream transport."""
        self.record.bytes_out += len(data)
        try:
            self._io.write(data)
        except SSL.Error as error:
            self._tls_failed(ssl_error_text(error))
            return
        self._flush_tls()

    def _flush_tls(self) -> None:
        """Move every pending ciphertext byte from the memory BIO to the stream."""
        records = self._io.pending_out()
        if records:
            self._send_stream(records)

    def _send_stream(self, data: bytes | memoryview) -> None:
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
        transport = self.transport
        sock = self._socket
        if (
            sock is not None
            and not transport._tempDataLen  # type: ignore[union-attr]
            and transport.offset == len(transport.dataBuffer)  # type: ignore[union-attr]
            and not transport.disconnecting  # type: ignore[union-attr]
        ):
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # EAGAIN, or an error the transport will find itself
            if sent == len(data):
                return
            data = data[sent:]
        cast("Any", transport).write(bytes(data))

    # -- transport for the application -------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data``; batched until the end of the current read, if in one."""
        if self._closing or self._lost or not data:
            return
        if self._in_read:
            self._out.append(data)
        else:
            self._encrypt(data)

    def writeSequence(self, data: Any) -> None:
        """Send the concatenation of ``data``."""
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Send pending output and close_notify, then close the stream."""
        if self._closing or self._lost:
            return
        out = self._out
        if out:
            self._out = []
            self._encrypt(b"".join(out))
        self._closing = True
        if self._handshake_done:
            # The client may already have broken the stream; we close anyway.
            with contextlib.suppress(SSL.Error):
                self._tls.shutdown()
            self._flush_tls()
        self._close_stream()

    def close(self, reason: CloseReason) -> None:
        """Close with a reason of the server's choosing (if none is set yet)."""
        if self.record.close_reason is None:
            self.record.close_reason = reason
        self.loseConnection()

    def abortConnection(self) -> None:
        """Drop the connection at once, unsent output included."""
        self._abort_stream()

    def getPeer(self) -> IAddress:
        """The client's address (the PROXY protocol's source, if one was given)."""
        if self.peer_address is not None:
            return self.peer_address
        transport = self.transport
        assert transport is not None
        return transport.getPeer()

    def getHost(self) -> IAddress:
        """Our address."""
        transport = self.transport
        assert transport is not None
        return transport.getHost()

    def getHandle(self) -> SSL.Connection:
        """The pyOpenSSL connection (for inspection, not for I/O)."""
        return self._tls

    def pauseProducing(self) -> None:
        """The application asks us to stop reading."""
        self._app_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """The application may read again."""
        self._app_paused = False
        self._update_reading()

    def stopProducing(self) -> None:
        """The application gives up on the connection."""
        self.abortConnection()

    @property
    def disconnecting(self) -> bool:
        """True once a close was asked for."""
        return self._closing

    # -- internals -----------------------------------------------------------------

    def _set_write_full(self, *, full: bool) -> None:
        self._write_full = full
        if full:
            self._arm_stall_timer()
        else:
            self._cancel_stall_timer()
        self._update_reading()

    def _update_reading(self) -> None:
        """Read while nobody objects: state rule 7."""
        if self._lost:
            return
        want_paused = self._app_paused or self._write_full or self._draining
        if want_paused == self._reading_paused:
            return
        self._reading_paused = want_paused
        transport = cast("Any", self.transport)
        if want_paused:
            transport.pauseProducing()
        else:
            transport.resumeProducing()

    def _close_stream(self) -> None:
        """Close the stream after everything written so far (state rule 6).

        Closing a socket whose receive queue holds unread bytes makes the kernel
        send RST, and the client's kernel then drops every reply it has not yet
        read.  So when input is left unread (a client pipelining while we drain or
        close), this is a lingering close: FIN after the replies, input read and
        discarded, and the socket closed once the client has acknowledged all of
        our data or closed its side.
        """
        if self._lost or self._stream_closing:
            return
        self._stream_closing = True
        self._closing = True
        transport = cast("Any", self.transport)
        transport.unregisterProducer()
        self._cancel_timer()
        self._cancel_stall_timer()
        if (_kernel_count(self._socket, _FIONREAD) or 0) > 0:
            self._lingering = True
            transport.loseWriteConnection()
            self._reading_paused = False
            transport.resumeProducing()
            self._timer = self.factory.clock.callLater(_LINGER_POLL, self._linger_check)
        else:
            transport.loseConnection()
        # The stream closes once its buffer is written; a client that does not
        # read would keep it open forever, so the stall check stays on.  It does
        # even when Twisted holds nothing: Twisted closes only once the socket is
        # writable, which a full kernel send buffer to a client that stopped
        # reading may never become.
        self._arm_stall_timer()

    def _linger_check(self) -> None:
        """Close a lingering stream once the client has all of our data."""
        self._timer = None
        if self._lost:
            return
        if self._unsent() == 0:
            cast("Any", self.transport).loseConnection()
            return
        self._timer = self.factory.clock.callLater(_LINGER_POLL, self._linger_check)

    def _abort_stream(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._cancel_timer()
        self._cancel_stall_timer()
        transport = cast("Any", self.transport)
        transport.unregisterProducer()
        transport.abortConnection()


class TLSServerFactory(Factory):
    """Builds :class:`TLSServerConnection`\\ s, applies limits, logs each one's end.

    ``contexts`` is asked for its current context at every accept.  ``connections``
    holds the open connections (for drain and limits).  Timeouts of 0 are off.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        contexts: ContextHolder,
        app_factory: LineAppFactory,
        clock: IReactorTime,
        *,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        write_stall_timeout: float = 30.0,
        max_connection_age: float = 0.0,
        limiter: ConnectionLimiter | None = None,
        refusals: RefusalLog | None = None,
        plaintext_hint: str = "secure-echo-client HOST:PORT --ca CA.pem",
    ) -> None:
        self.contexts = contexts
        self.app_factory = app_factory
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.write_stall_timeout = write_stall_timeout
        self.max_connection_age = max_connection_age
        self.limiter = limiter
        self.refusals = refusals if refusals is not None else RefusalLog(clock)
        self.plaintext_reply = (
            f"-ERR tls-required this port speaks TLS; try: {plaintext_hint}\n".encode()
        )
        #: Where ``connection_closed`` goes: the global log unless the service
        #: maker routes the per-connection records elsewhere (docs/logging.md).
        self.connection_log: Logger = self.log
        self.connections: set[TLSServerConnection] = set()
        self.draining = False
        self._drained: Deferred[None] | None = None
        self._drain_timer: IDelayedCall | None = None
        self._ids = itertools.count(1)

    @override
    def buildProtocol(self, addr: IAddress | None) -> TLSServerConnection | None:  # type: ignore[override]
        key = peer_key(addr) if addr is not None else "unknown"
        reason: str | None = DRAINING if self.draining else None
        if reason is None and self.limiter is not None:
            reason = self.limiter.acquire(key)
        if reason is not None:
            # Returning None makes the port close the socket at once.
            peer = format_address(addr) if addr is not None else "unknown"
            self.refusals.refused_connection(reason, peer, key)
            return None
        return TLSServerConnection(self, next(self._ids), key, addr)

    def connection_opened(self, connection: TLSServerConnection) -> None:
        """Track an accepted connection."""
        self.connections.add(connection)

    def connection_closed(self, connection: TLSServerConnection) -> None:
        """Forget a connection, free its limit slot and log ``connection_closed``."""
        self.connections.discard(connection)
        if self.limiter is not None:
            self.limiter.release(connection.peer_key)
        fields = connection.record.close_fields(self.clock.seconds())
        self.connection_log.info(
            "connection {conn_id} from {peer} closed: {close_reason}",
            event="connection_closed",
            **fields,
        )
        if self.draining and not self.connections:
            self._finish_drain()

    def drain(self, timeout: float) -> Deferred[None]:
        """Refuse new connections and drain the open ones; fire when all are gone.

        Connections still open after ``timeout`` seconds are aborted.
        """
        self.draining = True
        if self._drained is None:
            self._drained = Deferred()
            open_now = len(self.connections)
            self.log.info(
                "draining {connections} connections (at most {timeout:g} s)",
                event="drain_started",
                connections=open_now,
                timeout=timeout,
            )
            for connection in list(self.connections):
                connection.drain(CloseReason.SERVER_SHUTDOWN)
            if self.connections:
                self._drain_timer = self.clock.callLater(timeout, self._drain_expired)
            else:
                self._finish_drain()
        return self._drained

    def _drain_expired(self) -> None:
        self._drain_timer = None
        remaining = list(self.connections)
        self.log.warn(
            "drain timeout: closing {remaining} connections that are still open",
            event="drain_timeout",
            remaining=len(remaining),
        )
        for connection in remaining:
            connection.abortConnection()

    def _finish_drain(self) -> None:
        timer, self._drain_timer = self._drain_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.refusals.stop()
        drained = self._drained
        if drained is not None and not drained.called:
            self.log.info("drain finished", event="drain_finished")
            drained.callback(None)
