"""The TLS server factory: admission, the open connections, drain, the record.

:class:`TLSServerFactory` admits each accepted stream (a limit or a drain may
refuse it; a refused socket never becomes a connection, and
:class:`~secure_echo.edge.limits.RefusalLog` records it), then gives it a
:class:`~secure_echo.tls.connection.TLSServerConnection`, or first a
:class:`~secure_echo.edge.proxyreader.ProxyHeaderReader` when the PROXY protocol
is on for its peer.  Admission happens at accept in both cases: a socket waiting
for its PROXY header counts against the limits and among the open connections,
and a drain closes it.  When the header names the client, the socket's count
moves from the balancer's address to the client's.

The factory writes each connection's ``connection_closed`` record at its end, and
the warnings about failed handshakes and refused PROXY headers through a
:class:`~secure_echo.edge.digest.Digest`: the first of each reason in a window in
full, the rest summed up (``handshake_failures``, ``proxy_rejections``).
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel
from typing_extensions import override

from secure_echo.edge.addresses import format_address
from secure_echo.edge.digest import Digest
from secure_echo.edge.limits import DRAINING, ConnectionLimiter, RefusalLog, peer_key
from secure_echo.edge.proxyreader import ProxyHeaderReader, ProxySettings
from secure_echo.tls.connection import TLSServerConnection
from secure_echo.tls.deadlines import Timeouts
from secure_echo.tls.diagnosis import ServerPolicy, policy_of
from secure_echo.tls.failures import handshake_failure_reason

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime

    from secure_echo.tls.connection import LineAppFactory
    from secure_echo.tls.policy import ContextHolder


class Tracked(Protocol):
    """An admitted socket: a TLS connection, or a PROXY reader before its header."""

    peer_key: str

    def drain(self) -> None:
        """The server is stopping."""

    def drain_expired(self) -> None:
        """The drain deadline passed."""


#: The message of the record written per connection.
_CLOSED_FORMAT = "connection {conn_id} from {peer} closed: {close_reason}"


def emit_fields(logger: Logger, text: str, event: str, fields: dict[str, object]) -> None:
    """``logger.info(text, event=event, **fields)``, with ``fields`` as the event.

    The same event ``Logger.emit`` makes, for the record written once per
    connection: ``emit`` checks the level against every level there is and the
    keyword arguments copy the thirty-odd fields twice; ``fields`` is the
    caller's fresh dict, and becomes the event.
    """
    fields["event"] = event
    fields.update(
        log_logger=logger,
        log_level=LogLevel.info,
        log_namespace=logger.namespace,
        log_source=logger.source,
        log_format=text,
        log_time=time.time(),
    )
    logger.observer(fields)


class TLSServerFactory(Factory):
    """Builds :class:`TLSServerConnection`\\ s, applies limits, logs each one's end.

    ``contexts`` is asked for its current context at every accept.  ``connections``
    holds the open connections (for drain and limits).  Timeouts of 0 are off.
    ``conn_id_prefix``, if given, makes connection ids strings (``"2-17"`` for the
    prefix ``"2-"``), so the processes of a pool never repeat one another's ids.
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
        proxy: ProxySettings | None = None,
        read_client_hello: bool = True,
        conn_id_prefix: str = "",
    ) -> None:
        self.contexts = contexts
        self.app_factory = app_factory
        self.clock = clock
        self.timeouts = Timeouts(
            handshake=handshake_timeout,
            idle=idle_timeout,
            write_stall=write_stall_timeout,
            max_age=max_connection_age,
        )
        self.limiter = limiter
        self.refusals = refusals if refusals is not None else RefusalLog(clock)
        self.plaintext_reply = (
            f"-ERR tls-required this port speaks TLS; try: {plaintext_hint}\n".encode()
        )
        #: Where ``connection_closed`` goes: the global log unless the service
        #: maker routes the per-connection records elsewhere (docs/logging.md).
        self.connection_log: Logger = self.log
        #: ``--proxy-protocol``: None when off.
        self.proxy = proxy
        #: Read each client's ClientHello (``client_hello``, ``ja4`` in the records).
        self.read_client_hello = read_client_hello
        self._policy: tuple[object, ServerPolicy] | None = None
        #: Every admitted socket still open (readers waiting for a header included).
        self.connections: set[Tracked] = set()
        self._handshake_digest = Digest(clock, self._handshake_summary)
        self._proxy_digest = Digest(clock, self._proxy_summary)
        self.draining = False
        self._drained: Deferred[None] | None = None
        self._drain_timer: IDelayedCall | None = None
        self._ids = itertools.count(1)
        self._conn_id_prefix = conn_id_prefix

    @property
    def handshake_timeout(self) -> float:
        """Seconds a client has to finish the handshake."""
        return self.timeouts.handshake

    @property
    def idle_timeout(self) -> float:
        """Seconds of silence after which a connection is closed (0: off)."""
        return self.timeouts.idle

    @property
    def write_stall_timeout(self) -> float:
        """Seconds unsent output may make no progress (0: off)."""
        return self.timeouts.write_stall

    @property
    def max_connection_age(self) -> float:
        """Seconds after which a connection is drained (0: off)."""
        return self.timeouts.max_age

    def _next_id(self) -> int | str:
        """The id of the next connection: 1, 2, ... or the prefix and that number."""
        number = next(self._ids)
        return f"{self._conn_id_prefix}{number}" if self._conn_id_prefix else number

    @override
    def buildProtocol(
        self, addr: IAddress | None
    ) -> TLSServerConnection | ProxyHeaderReader | None:
        key = peer_key(addr) if addr is not None else "unknown"
        proxy = self.proxy
        header, trusted = proxy.reads_header(addr) if proxy is not None else (False, False)
        reason: str | None = DRAINING if self.draining else None
        if reason is None and self.limiter is not None:
            # A balancer's socket is counted under its address until its header
            # names the client, but a burst through one balancer is not one client.
            reason = self.limiter.acquire(key, per_ip=not (header and trusted))
        if reason is not None:
            # Returning None makes the port close the socket at once.
            peer = format_address(addr) if addr is not None else "unknown"
            self.refusals.refused_connection(reason, peer, key)
            return None
        if proxy is not None and header:
            reader = ProxyHeaderReader(proxy, self, key, trusted=trusted)
            self.connections.add(reader)
            return reader
        # The client's address is the transport's own: the connection asks it (the
        # stream transport writes both ends without building address objects).
        return TLSServerConnection(self, self._next_id(), key)

    # -- the PROXY header reader's owner ---------------------------------------------

    def header_read(self, reader: ProxyHeaderReader, address: IAddress) -> IProtocol | None:
        """The header names the client: move the socket's count to it, start TLS."""
        self.connections.discard(reader)
        key = peer_key(address)
        reason = self.limiter.rekey(reader.peer_key, key) if self.limiter is not None else None
        if reason is not None:
            self.refusals.refused_connection(reason, format_address(address), key)
            self._forget(reader.peer_key)
            return None
        return TLSServerConnection(self, self._next_id(), key, address)

    def header_rejected(self, reader: ProxyHeaderReader, reason: str, detail: str) -> None:
        """Log a refused header: the first of its reason in full, the rest summed up."""
        transport = reader.transport
        peer = format_address(transport.getPeer()) if transport is not None else "unknown"
        first = self._proxy_digest.first(reason, reader.peer_key or peer)
        (self.log.warn if first else self.connection_log.info)(
            "PROXY header from {peer} rejected: {reason}: {detail}",
            event="proxy_rejected",
            peer=peer,
            reason=reason,
            detail=detail,
        )

    def reader_closed(self, reader: ProxyHeaderReader) -> None:
        """A socket ended before its header was handed over: free its slot."""
        if reader in self.connections:
            self.connections.discard(reader)
            self._forget(reader.peer_key)

    def _forget(self, key: str) -> None:
        """Release a slot; finish a drain that waited for it."""
        if self.limiter is not None:
            self.limiter.release(key)
        if self.draining and not self.connections:
            self._finish_drain()

    def _proxy_summary(
        self, counts: dict[str, int], top_peers: dict[str, int], window: float
    ) -> None:
        self.log.warn(
            "rejected {total} more PROXY headers in {window:g} s: {counts}",
            event="proxy_rejections",
            total=sum(counts.values()),
            window=window,
            counts=counts,
            top_peers=top_peers,
        )

    # -- TLS connections ---------------------------------------------------------------

    def connection_opened(self, connection: TLSServerConnection) -> None:
        """Track an accepted connection."""
        self.connections.add(connection)

    def connection_closed(self, connection: TLSServerConnection) -> None:
        """Forget a connection, free its limit slot and log ``connection_closed``."""
        self.connections.discard(connection)
        fields = connection.record.close_fields(self.clock.seconds())
        emit_fields(self.connection_log, _CLOSED_FORMAT, "connection_closed", fields)
        self._forget(connection.peer_key)

    def policy(self) -> ServerPolicy:
        """What the TLS set in use accepts, made once per set (a reload makes a new one)."""
        loaded = self.contexts.loaded
        cached = self._policy
        if cached is None or cached[0] is not loaded:
            cached = self._policy = (loaded, policy_of(loaded))
        return cached[1]

    def handshake_failed(self, connection: TLSServerConnection) -> None:
        """Log a failed handshake: the first of its kind as a warning, the rest summed up.

        Every failure is one ``handshake_failed`` record: a warning in the main log
        for the first of its reason in a window, else an entry where the
        connection records go (summed up in the main log as ``handshake_failures``).
        """
        record = connection.record
        reason = handshake_failure_reason(record.tls_error)
        # Summed up per client address (its port changes with every retry).
        first = self._handshake_digest.first(reason, connection.peer_key or record.peer)
        (self.log.warn if first else self.connection_log.info)(
            "TLS handshake with {peer} failed: {reason}",
            event="handshake_failed",
            conn_id=connection.conn_id,
            peer=record.peer,
            reason=record.tls_error,
            client_cert_subject=record.client_cert_subject,
            client_cert_issuer=record.client_cert_issuer,
            client_cert_sha256=record.client_cert_sha256,
            failure=record.failure,
            hint=record.hint,
            client_hello=record.client_hello,
            ja4=record.ja4,
            ja4_r=record.ja4_r,
        )

    def _handshake_summary(
        self, counts: dict[str, int], top_peers: dict[str, int], window: float
    ) -> None:
        self.log.warn(
            "{total} more TLS handshakes failed in {window:g} s: {counts}",
            event="handshake_failures",
            total=sum(counts.values()),
            window=window,
            counts=counts,
            top_peers=top_peers,
        )

    def tls_failed(self, connection: TLSServerConnection) -> None:
        """Warn of a TLS error after the handshake."""
        record = connection.record
        self.log.warn(
            "TLS error from {peer}: {reason}",
            event="tls_error",
            conn_id=connection.conn_id,
            peer=record.peer,
            reason=record.tls_error,
        )

    def slow_reader(self, connection: TLSServerConnection, unsent: int | None) -> None:
        """Note a client dropped because it stopped reading."""
        self.log.info(
            "connection {conn_id} from {peer}: client stopped reading for {timeout:g} s",
            event="slow_reader",
            conn_id=connection.conn_id,
            peer=connection.record.peer,
            timeout=self.timeouts.write_stall,
            unsent=unsent,
        )

    def drain(self, timeout: float) -> Deferred[None]:
        """Refuse new connections and drain the open ones; fire when all are gone.

        Connections still open after ``timeout`` seconds are aborted
        (``drain_timeout``).
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
                connection.drain()
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
            connection.drain_expired()

    def _finish_drain(self) -> None:
        timer, self._drain_timer = self._drain_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.refusals.stop()
        self._handshake_digest.stop()
        self._proxy_digest.stop()
        drained = self._drained
        if drained is not None and not drained.called:
            self.log.info("drain finished", event="drain_finished")
            drained.callback(None)
