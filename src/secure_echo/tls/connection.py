"""TLS server connection: the Twisted glue around the lifecycle table.

A :class:`TLSServerConnection` is the protocol of a plain stream transport (TCP,
UNIX, systemd-passed sockets: whatever ``--listen`` names) and the transport of the
application protocol.  It runs a pyOpenSSL ``Connection`` over memory BIOs.

Why not ``TLSMemoryBIOProtocol``: it drops replies to lines that arrive with the
client's close_notify or FIN, has no handshake timeout, logs no handshake failure,
defers every write to a ``callLater(0)`` and raises two exceptions per read.  This
module is small enough to own those decisions.

Where the connection is in its life is one :class:`~secure_echo.tls.lifecycle.Phase`;
what happens next is the lifecycle table's business
(:mod:`secure_echo.tls.lifecycle`, with its numbered rules).  This module turns
Twisted's callbacks into lifecycle events and carries out the actions; the timers
live in :class:`~secure_echo.tls.deadlines.Deadlines`, the bytes on their way out
in :class:`~secure_echo.tls.writer.StreamWriter`.

The hot path stays out of the table: while ``OPEN``, all application data
decrypted from one socket read is handed over in one ``dataReceived`` call, and
everything the application writes during that call is encrypted and sent as one
batch at its end.  Writes made at other times (a handler's Deferred firing) go
out at once.  Reading is paused while the application asks, while the stream's
send buffer is full (a client that does not read), and for good once draining.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProducer,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from typing_extensions import override
from zope.interface import implementer

from secure_echo.edge.addresses import format_address
from secure_echo.tls.deadlines import Deadlines
from secure_echo.tls.diagnosis import plaintext_failure, timeout_failure
from secure_echo.tls.facts import record_handshake
from secure_echo.tls.failures import looks_like_http, plaintext_answer
from secure_echo.tls.lifecycle import Action, Event, Phase, next_reason, step
from secure_echo.tls.notes import HandshakeNotes
from secure_echo.tls.readgate import ReadGate
from secure_echo.tls.record import ConnectionRecord
from secure_echo.tls.recordio import input_bytes, record_io
from secure_echo.tls.writer import StreamWriter

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime
    from twisted.python.failure import Failure

    from secure_echo.tls.deadlines import Timeouts
    from secure_echo.tls.diagnosis import ServerPolicy
    from secure_echo.tls.policy import ContextHolder

#: The first byte of a TLS handshake record.
_TLS_HANDSHAKE: Final = 0x16
_OPEN: Final = Phase.OPEN
#: Phases in which the application's writes still go out.
_WRITABLE: Final = frozenset({Phase.OPEN, Phase.INPUT_ENDED, Phase.DRAINING})
#: Phases after a close or abort was asked for.
_CLOSING: Final = frozenset({Phase.CLOSING, Phase.LINGERING, Phase.ABORTING, Phase.CLOSED})


class LineAppFactory(Protocol):
    """What the transport needs from the application side."""

    def build(self, record: ConnectionRecord) -> IProtocol:
        """Build the application protocol for a connection that completed its handshake."""
        ...


class ConnectionFactory(Protocol):
    """What a connection needs from the factory that built it."""

    contexts: ContextHolder
    app_factory: LineAppFactory
    clock: IReactorTime
    timeouts: Timeouts
    plaintext_reply: bytes
    #: Whether to read each client's ClientHello (``client_hello``, ``ja4``).
    read_client_hello: bool

    def policy(self) -> ServerPolicy:
        """What the current TLS set accepts (to explain a failed handshake)."""
        ...

    def connection_opened(self, connection: TLSServerConnection) -> None:
        """An accepted connection starts."""

    def connection_closed(self, connection: TLSServerConnection) -> None:
        """A connection ended; its record is complete."""

    def handshake_failed(self, connection: TLSServerConnection) -> None:
        """Record a failed handshake (``tls_error``, ``failure`` and ``hint`` say why)."""

    def tls_failed(self, connection: TLSServerConnection) -> None:
        """Record a TLS error after the handshake (``record.tls_error`` says what)."""

    def slow_reader(self, connection: TLSServerConnection, unsent: int | None) -> None:
        """Record a client dropped for not reading (``unsent`` bytes waiting)."""


def ssl_error_text(error: SSL.Error) -> str:
    """Turn a pyOpenSSL error into a short reason, e.g. ``no shared cipher``."""
    if isinstance(error, SSL.SysCallError):
        return "unexpected EOF" if error.args[:1] == (-1,) else f"system error: {error.args}"
    items = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [str(item[-1]) for item in items if isinstance(item, tuple) and item]
    return "; ".join(reasons) or repr(error)


@implementer(IHalfCloseableProtocol, ITransport, IPushProducer, IConsumer)
class TLSServerConnection(TwistedProtocol):
    """One TLS connection: protocol of the stream, transport of the application."""

    def __init__(
        self,
        factory: ConnectionFactory,
        conn_id: int | str,
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
        self._phase = Phase.ACCEPTED
        self._tls: SSL.Connection
        self._writer: StreamWriter
        self._deadlines: Deadlines
        self._app: IProtocol | None = None
        self._in_read = False
        self._out: list[bytes] = []
        #: What the handshake learns (:mod:`secure_echo.tls.notes`); kept while it lasts.
        self._notes: HandshakeNotes | None = None
        #: The application's producer, told when the stream's send buffer fills and
        #: drains (``IConsumer``), so it can bound what it makes per read.
        self._app_producer: IPushProducer | None = None
        self._lost_reason: Failure | None = None
        #: A plaintext client's first read, kept to answer it in its own terms.
        self._first_bytes = b""

    @property
    def phase(self) -> Phase:
        """Where the connection is in its life."""
        return self._phase

    # -- stream side ------------------------------------------------------------

    @override
    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        factory = self.factory
        now = factory.clock.seconds()
        # Without TCP_NODELAY the first reply after a TLS 1.3 handshake can wait
        # ~40 ms behind the session tickets.  UNIX sockets have no such option;
        # a socket accepted from a listening socket that has it has it already.
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None and not getattr(transport, "no_delay_inherited", False):
            # The socket may already be gone; connectionLost follows then.
            with contextlib.suppress(OSError):
                set_no_delay(True)
        texts = getattr(transport, "address_texts", None)
        if texts is not None and self.peer_address is None:
            peer, local = texts()
        else:
            peer = format_address(self.peer_address or transport.getPeer())
            local = format_address(transport.getHost())
        self.record = ConnectionRecord(self.conn_id, peer, local, now)
        self._tls = SSL.Connection(factory.contexts.context, None)
        self._tls.set_accept_state()
        self._io = record_io(self._tls)
        self._gate = ReadGate(transport)
        self._writer = StreamWriter(transport, self)
        self._deadlines = Deadlines(self, factory.clock, now)
        self._deadlines.arm_handshake(factory.timeouts)
        factory.connection_opened(self)

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._phase is _OPEN:
            self._deadlines.last_read = self.factory.clock.seconds()
            self._io.feed(data)
            self._read_application_data()
            return
        self._data_outside_open(data)

    def received_into(self, count: int) -> None:
        """``count`` bytes arrived in the shared input buffer (:mod:`secure_echo.tls.stream`)."""
        if self._phase is _OPEN:
            self._deadlines.last_read = self.factory.clock.seconds()
            self._io.feed_input(count)
            self._read_application_data()
            return
        self._data_outside_open(input_bytes(count))

    def _data_outside_open(self, data: bytes) -> None:
        """Bytes before the handshake is done, or after reading should have stopped."""
        phase = self._phase
        if phase is Phase.ACCEPTED:
            if data[0] != _TLS_HANDSHAKE:
                self._first_bytes = data
                self._event(Event.PLAINTEXT_BYTES)
                return
            # The handshake's callbacks (verification, strict SNI) find its notes
            # as the TLS connection's app data, until the handshake ends.
            self._notes = HandshakeNotes(collect=self.factory.read_client_hello)
            self._tls.set_app_data(self._notes)
            self._event(Event.TLS_BYTES)
            phase = self._phase
        if phase is Phase.HANDSHAKING:
            self._io.feed(data)
            if self._continue_handshake(data):
                self._read_application_data()
                # The handshake's flights (and the session tickets) are sent:
                # the open connection starts with empty memory BIOs.
                self._io.release()
        elif phase is Phase.DRAINING or phase is Phase.INPUT_ENDED:
            # In flight when reading paused: still the client's lines, still answered.
            self._io.feed(data)
            self._read_application_data()
        # Lingering: input after our close is read and dropped; otherwise none comes.

    def readConnectionLost(self) -> None:
        """The client's TCP stream ended (FIN)."""
        if self._phase is Phase.HANDSHAKING:
            self.record.tls_error = "client closed the connection during the handshake"
        self._event(Event.FIN)

    def writeConnectionLost(self) -> None:
        """Our write side closed; only happens after a lingering close, nothing to do."""

    @override
    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._phase is Phase.CLOSED:  # pragma: no cover - the stream calls this once
            return
        writer = self._writer
        # The last look, taken while the socket was there (a reset purges its
        # queue), says what the client had not acknowledged.  A close without
        # linger unregistered the writer, once every reply was acknowledged: then
        # only what Twisted still held can be missing.
        final = writer.final
        held = writer.held() if final is None or self._phase is Phase.CLOSING else final
        self.record.unsent_bytes = held
        clean = reason is None or isinstance(reason.value, ConnectionDone)
        self._lost_reason = reason
        if self._phase is Phase.HANDSHAKING and self.record.tls_error is None:
            self.record.tls_error = "connection closed before the handshake"
        if clean:
            self._event(Event.LOST_CLEAN)
        else:
            self._event(Event.LOST_ERROR if held else Event.LOST_ERROR_FLUSHED)

    # -- the lifecycle ---------------------------------------------------------------

    def _event(self, event: Event) -> None:
        """Take the lifecycle step for ``event`` and carry out its actions (rule 9)."""
        outcome = step(self._phase, event)
        record = self.record
        record.close_reason = next_reason(record.close_reason, outcome.reason)
        phase = self._phase = outcome.phase
        for action in outcome.actions:
            _ACTIONS[action](self)
            if self._phase is not phase:
                return  # a nested event took over (lifecycle rule 9)

    def deadline_passed(self, event: Event) -> None:
        """A timer of :class:`Deadlines` (or the linger poll) reports ``event``."""
        if event is Event.HANDSHAKE_DEADLINE:
            timeout = self.factory.timeouts.handshake
            record = self.record
            record.tls_error = f"no handshake within {timeout:g} s"
            failure = timeout_failure(timeout)
            record.failure, record.hint = failure.code, failure.hint
            if self._notes is not None:
                self._notes.finish(record)
        self._event(event)

    def owes_replies(self) -> bool:
        """Whether the application still has replies to write."""
        return bool(getattr(self._app, "pending", 0))

    # -- handshake --------------------------------------------------------------

    def _continue_handshake(self, data: bytes) -> bool:
        """Advance the handshake with the client's ``data``; True once it is complete.

        The notes read ``data`` after OpenSSL: after our flight has left (reading
        the hello costs the client no time), before a failure is explained.
        """
        try:
            if not self._io.handshake():
                self._flush_tls()
                _note(self, data)
                return False
        except SSL.Error as error:
            _note(self, data)
            reason = ssl_error_text(error)
            notes = self._notes
            if notes is not None and notes.verify_error is not None:
                reason = f"{reason}: {notes.verify_error}"
            self.record.tls_error = reason
            self._event(Event.HANDSHAKE_ERROR)
            return False
        _note(self, data)
        self._event(Event.HANDSHAKE_DONE)
        return self._phase is _OPEN

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
            if self._tls.get_shutdown() & SSL.RECEIVED_SHUTDOWN:
                # Java on TLS 1.3 sends user_canceled, then close_notify; OpenSSL 4
                # reports the read as an unexpected EOF although the client's
                # close_notify arrived.  That is an orderly end.
                finished = True
            else:
                self.record.tls_error = ssl_error_text(error)
                self._event(Event.TLS_ERROR)
                return
        if finished:
            self._event(Event.CLOSE_NOTIFY)
        elif not flushed:
            # A renegotiation refusal, a key update or a ticket may be pending.
            self._flush_tls()

    def _encrypt(self, data: bytes) -> None:
        """Encrypt ``data`` and hand the records to the stream transport."""
        self.record.bytes_out += len(data)
        try:
            self._io.write(data)
        except SSL.Error as error:
            self.record.tls_error = ssl_error_text(error)
            self._event(Event.TLS_ERROR)
            return
        self._flush_tls()

    def _flush_tls(self) -> None:
        """Move every pending ciphertext byte from the memory BIO to the stream."""
        records = self._io.pending_out()
        if records:
            self._writer.send(records)

    # -- transport for the application -------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data``; batched until the end of the current read, if in one."""
        if self._phase not in _WRITABLE or not data:
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
        self._event(Event.APP_CLOSE)

    def abortConnection(self) -> None:
        """Drop the connection at once, unsent output included."""
        self._event(Event.APP_ABORT)

    def drain(self) -> None:
        """The server is shutting down: stop reading, finish the replies, close."""
        self._event(Event.DRAIN)

    def drain_expired(self) -> None:
        """The drain deadline passed: drop what is still open."""
        self._event(Event.DRAIN_DEADLINE)

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
        self._gate.app_paused = True
        self._reading_changed()

    def resumeProducing(self) -> None:
        """The application may read again."""
        self._gate.app_paused = False
        self._reading_changed()

    def stopProducing(self) -> None:
        """The application gives up on the connection."""
        self.abortConnection()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """The application's (streaming) producer hears when the send buffer fills and drains."""
        self._app_producer = cast("IPushProducer", producer) if streaming else None

    def unregisterProducer(self) -> None:
        """Forget the application's producer."""
        self._app_producer = None

    @property
    def disconnecting(self) -> bool:
        """True once a close was asked for."""
        return self._phase in _CLOSING

    # -- reading and the stream's send buffer ----------------------------------------

    def write_full(self, *, full: bool) -> None:
        """The stream's send buffer filled or drained (from :class:`StreamWriter`)."""
        if full:
            self._deadlines.watch_stall(self._writer, self.factory.timeouts.write_stall)
        else:
            self._deadlines.stop_stall_watch()
        self._gate.stream_full = full
        self._reading_changed()
        producer = self._app_producer
        if producer is not None:
            if full:
                producer.pauseProducing()
            else:
                producer.resumeProducing()

    def _reading_changed(self) -> None:
        """Apply the read gate, unless the stream is closing (it no longer reads for us)."""
        if self._phase not in _CLOSING:
            self._gate.update()


# -- what each lifecycle action does (the table says when) -----------------------------


def _note(c: TLSServerConnection, data: bytes) -> None:
    """Let the handshake's notes read the client's ``data`` (while they last)."""
    notes = c._notes
    if notes is not None:
        notes.feed(data, c.record)


def _send_hint(c: TLSServerConnection) -> None:
    first = c._first_bytes
    failure = plaintext_failure(http=looks_like_http(first))
    c.record.failure, c.record.hint = failure.code, failure.hint
    c._writer.write_plain(plaintext_answer(first, c.factory.plaintext_reply))


def _start_app(c: TLSServerConnection) -> None:
    factory = c.factory
    record_handshake(c.record, c._tls, factory.clock.seconds(), alpn=factory.contexts.alpn)
    notes = c._notes
    if notes is not None:
        notes.finish(c.record)
        c._notes = None  # an open connection keeps nothing of its handshake
        c._tls.set_app_data(None)
    # The session tickets OpenSSL just queued are not sent here: the read that
    # finished the handshake is read on at once (dataReceived), and whatever it
    # leads to (the first replies, or nothing) flushes the outgoing BIO, so the
    # tickets leave in the same send as the first replies.
    app = factory.app_factory.build(c.record)
    c._app = app
    app.makeConnection(c)


def _end_app_input(c: TLSServerConnection) -> None:
    app = c._app
    if app is not None and IHalfCloseableProtocol.providedBy(app):
        cast("IHalfCloseableProtocol", app).readConnectionLost()
    else:
        c.loseConnection()


def _drain_app(c: TLSServerConnection) -> None:
    # Reading stays off for good (the application's resumeProducing cannot
    # restart it), and the idle deadline is off: the silence is ours now.
    c._gate.stopped = True
    c._gate.update()
    drain = getattr(c._app, "drain", None)
    if drain is not None:
        drain()
    else:
        c.loseConnection()


def _log_handshake_failed(c: TLSServerConnection) -> None:
    """Explain the failure in the record (``failure``, ``hint``), then log it."""
    record = c.record
    notes = c._notes or HandshakeNotes(collect=False)
    failure = notes.explain(record, c.factory.policy())
    record.failure, record.hint = failure.code, failure.hint
    c.factory.handshake_failed(c)


def _send_close_notify(c: TLSServerConnection) -> None:
    out = c._out
    if out:
        c._out = []
        c._encrypt(b"".join(out))
    # The client may already have broken the stream; we close anyway.
    with contextlib.suppress(SSL.Error):
        c._tls.shutdown()
    records = c._io.pending_out()
    if records:
        # The close's own bytes, which the writer does not count as replies.
        c._writer.trailer = len(records)
        c._writer.send(records)


def _close_stream(c: TLSServerConnection) -> None:
    if not c._writer.close():
        c._event(Event.UNREAD_INPUT)


def _linger(c: TLSServerConnection) -> None:
    c._gate.released()
    c._writer.linger()
    c._deadlines.poll_linger(c._writer)


def _watch_close(c: TLSServerConnection) -> None:
    # A lingering close waits for the client to read and acknowledge; one that
    # does not would keep it open forever, so the stall watch goes on.  A close
    # that did not linger needs none: nothing was left unacknowledged, so the
    # socket is writable and Twisted closes it on the next turn.
    c._deadlines.watch_stall(c._writer, c.factory.timeouts.write_stall)


def _abort_stream(c: TLSServerConnection) -> None:
    c._deadlines.cancel_all()
    c._writer.abort()


def _finish(c: TLSServerConnection) -> None:
    # The connection lets go of every part that points back at it (timers, writer,
    # the application and its producer): reference counting then frees it as it
    # ends, instead of the cyclic garbage collector, whose passes over thousands
    # of ended connections a second cost more than the connections' own work.
    c._deadlines.detach()
    c._writer.detach()
    app = c._app
    c._app = None
    c._app_producer = None
    c._tls.set_app_data(None)
    try:
        if app is not None:
            app.connectionLost(c._lost_reason)  # type: ignore[arg-type]
    finally:
        c.factory.connection_closed(c)


#: What each lifecycle action does (the table says when).
_ACTIONS: Final[dict[Action, Callable[[TLSServerConnection], object]]] = {
    Action.CANCEL_DEADLINES: lambda c: c._deadlines.cancel(),
    Action.ARM_ESTABLISHED: lambda c: c._deadlines.arm_established(
        c.factory.timeouts, c.factory.clock.seconds()
    ),
    Action.SEND_HINT: _send_hint,
    Action.FLUSH_TLS: lambda c: c._flush_tls(),
    Action.START_APP: _start_app,
    Action.END_APP_INPUT: _end_app_input,
    Action.DRAIN_APP: _drain_app,
    Action.SEND_CLOSE_NOTIFY: _send_close_notify,
    Action.CLOSE_STREAM: _close_stream,
    Action.LINGER: _linger,
    Action.LOSE_STREAM: lambda c: c._writer.lose(),
    Action.WATCH_CLOSE: _watch_close,
    Action.ABORT_STREAM: _abort_stream,
    Action.LOG_HANDSHAKE_FAILED: _log_handshake_failed,
    Action.LOG_TLS_ERROR: lambda c: c.factory.tls_failed(c),
    Action.LOG_SLOW_READER: lambda c: c.factory.slow_reader(c, c._writer.unsent()),
    Action.FINISH: _finish,
}
