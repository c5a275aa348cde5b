"""What is known about one connection, logged once as ``connection_closed``.

The TLS transport creates the record at accept, fills in the TLS facts at the end
of the handshake and the close reason at the end; the line protocol counts lines.
docs/logging.md lists every field; keep the two in step.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secure_echo.tls.offered import RawJSON


class CloseReason(StrEnum):
    """Why a connection ended (the ``close_reason`` field; a stable enum).

    The first six below claim a clean end: every reply was written to the socket
    and the stream then closed in order.  They are recorded only when that is
    what happened; otherwise the record says what did (``reset``,
    ``drain_timeout``, ``close_stalled``, ...).  See
    :mod:`secure_echo.tls.lifecycle`, rule 7.
    """

    #: The client sent close_notify; every reply was written, then the server closed.
    EOF = "eof"
    #: The client's TCP stream ended (FIN) without a TLS close_notify; every reply
    #: was still written while the client could read.
    CLIENT_CLOSED = "client_closed"
    #: The server is shutting down (drain): every reply to what was read was
    #: written, then the server closed.
    SERVER_SHUTDOWN = "server_shutdown"
    #: No data from the client for the idle timeout after the handshake.
    IDLE_TIMEOUT = "idle_timeout"
    #: The connection reached --max-connection-age and was closed after its
    #: pending replies.
    MAX_CONNECTION_AGE = "max_connection_age"
    #: The application closed the connection after writing its replies.
    SERVER_CLOSED = "server_closed"
    #: The TCP connection was reset (or broke with an error) before an orderly
    #: close; ``unsent_bytes`` says how much output the socket never took.
    RESET = "reset"
    #: The stream closed cleanly while the server still expected input.
    CONNECTION_LOST = "connection_lost"
    #: The TCP connection closed or was reset before the client sent one byte
    #: (a load balancer's TCP health check, a port scan).
    NO_DATA = "no_data"
    #: The TLS handshake failed (protocol or cipher mismatch, a refused client
    #: certificate, ...); ``tls_error`` says why.
    HANDSHAKE_FAILED = "handshake_failed"
    #: The handshake did not complete within the handshake timeout.
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    #: The first bytes were not a TLS record; the client got a plaintext hint.
    PLAINTEXT_CLIENT = "plaintext_client"
    #: A TLS error after the handshake (a corrupt record, an unexpected message).
    TLS_ERROR = "tls_error"
    #: The client stopped reading: unsent output made no progress for the
    #: write-stall timeout.
    SLOW_READER = "slow_reader"
    #: The server's close could not flush within the write-stall timeout (the
    #: client stopped reading after the server decided to close).
    CLOSE_STALLED = "close_stalled"
    #: Still open at the end of the drain timeout; dropped.
    DRAIN_TIMEOUT = "drain_timeout"
    #: The application dropped the connection at once (``abortConnection``).
    ABORTED = "aborted"


class ConnectionRecord:
    """Mutable facts about one connection; plain attributes for a cheap hot path."""

    __slots__ = (
        "alpn",
        "bytes_in",
        "bytes_out",
        "cipher",
        "client_cert_issuer",
        "client_cert_not_after",
        "client_cert_sans",
        "client_cert_sha256",
        "client_cert_subject",
        "client_hello",
        "close_reason",
        "conn_id",
        "failure",
        "group",
        "handler_errors",
        "handshake_ms",
        "hint",
        "ja4",
        "ja4_r",
        "lines_in",
        "lines_out",
        "local",
        "overlong_lines",
        "peer",
        "resumed",
        "sni",
        "started",
        "tls_error",
        "tls_version",
        "unsent_bytes",
    )

    def __init__(self, conn_id: int | str, peer: str, local: str, started: float) -> None:
        self.conn_id = conn_id
        self.peer = peer
        self.local = local
        self.started = started
        self.tls_version: str | None = None
        self.cipher: str | None = None
        self.group: str | None = None
        self.sni: str | None = None
        self.alpn: str | None = None
        self.resumed: bool | None = None
        self.client_cert_subject: str | None = None
        self.client_cert_issuer: str | None = None
        self.client_cert_sha256: str | None = None
        self.client_cert_sans: list[str] | None = None
        self.client_cert_not_after: str | None = None
        self.handshake_ms: float | None = None
        #: What the client offered (:mod:`secure_echo.tls.offered`): the ClientHello
        #: summary, as JSON text, and its JA4 fingerprints.
        self.client_hello: RawJSON | None = None
        self.ja4: str | None = None
        self.ja4_r: str | None = None
        #: Why the handshake failed, as a stable code and a hint (:mod:`.diagnosis`).
        self.failure: str | None = None
        self.hint: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.lines_in = 0
        self.lines_out = 0
        self.overlong_lines = 0
        self.handler_errors = 0
        self.close_reason: CloseReason | None = None
        self.tls_error: str | None = None
        #: Output bytes (TLS records) the socket had not taken when it closed.
        self.unsent_bytes = 0

    def _identity(self) -> dict[str, Any]:
        """Who connected and what TLS they got: shared by both views below."""
        return {
            "conn_id": self.conn_id,
            "peer": self.peer,
            "local": self.local,
            "tls_version": self.tls_version,
            "cipher": self.cipher,
            "group": self.group,
            "sni": self.sni,
            "alpn": self.alpn,
            "resumed": self.resumed,
            "client_cert_subject": self.client_cert_subject,
            "client_cert_issuer": self.client_cert_issuer,
            "client_cert_sha256": self.client_cert_sha256,
            "handshake_ms": self.handshake_ms,
            "ja4": self.ja4,
            "ja4_r": self.ja4_r,
        }

    def info(self) -> dict[str, Any]:
        """The connection as the server sees it, for the opt-in info line."""
        fields = self._identity()
        fields["client_cert_sans"] = self.client_cert_sans
        fields["client_cert_not_after"] = self.client_cert_not_after
        hello = self.client_hello
        fields["client_hello"] = hello.value() if hello is not None else None
        return fields

    def close_fields(self, now: float) -> dict[str, Any]:
        """The fields of the ``connection_closed`` event."""
        fields = self._identity()
        fields.update(
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            lines_in=self.lines_in,
            lines_out=self.lines_out,
            overlong_lines=self.overlong_lines,
            handler_errors=self.handler_errors,
            duration_s=round(now - self.started, 6),
            close_reason=str(self.close_reason or CloseReason.CONNECTION_LOST),
            tls_error=self.tls_error,
            unsent_bytes=self.unsent_bytes,
            client_hello=self.client_hello,
            failure=self.failure,
            hint=self.hint,
        )
        return fields
