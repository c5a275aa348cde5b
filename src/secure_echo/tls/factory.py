"""The TLS server factory: admission, the open connections, drain, the record.

:class:`TLSServerFactory` builds one :class:`~secure_echo.tls.connection.TLSServerConnection`
per accepted stream, unless a limit or a drain refuses it (a refused socket never
becomes a connection; :class:`~secure_echo.edge.limits.RefusalLog` records it).
It knows every open connection, so that a drain can finish them and a limit can
count them, and it writes each one's ``connection_closed`` record at its end.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from typing_extensions import override

from secure_echo.edge.addresses import format_address
from secure_echo.edge.limits import DRAINING, ConnectionLimiter, RefusalLog, peer_key
from secure_echo.tls.connection import TLSServerConnection
from secure_echo.tls.deadlines import Timeouts

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime

    from secure_echo.tls.policy import ContextHolder
    from secure_echo.tls.record import ConnectionRecord


class LineAppFactory(Protocol):
    """What the transport needs from the application side."""

    def build(self, record: ConnectionRecord) -> IProtocol:
        """Build the application protocol for a connection that completed its handshake."""
        ...


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
        self.connections: set[TLSServerConnection] = set()
        self.draining = False
        self._drained: Deferred[None] | None = None
        self._drain_timer: IDelayedCall | None = None
        self._ids = itertools.count(1)

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

    @override
    def buildProtocol(self, addr: IAddress | None) -> TLSServerConnection | None:
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

    def handshake_failed(self, connection: TLSServerConnection) -> None:
        """Warn that a handshake failed (``tls_error`` says why)."""
        record = connection.record
        self.log.warn(
            "TLS handshake with {peer} failed: {reason}",
            event="handshake_failed",
            conn_id=connection.conn_id,
            peer=record.peer,
            reason=record.tls_error,
            client_cert_subject=record.client_cert_subject,
            client_cert_issuer=record.client_cert_issuer,
            client_cert_sha256=record.client_cert_sha256,
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
        drained = self._drained
        if drained is not None and not drained.called:
            self.log.info("drain finished", event="drain_finished")
            drained.callback(None)
