"""What a connection learns during its handshake, kept only while it lasts.

The client's ClientHello (collected from its first bytes, read once OpenSSL has
answered them), the certificate it presented and what verification said of it, a
server name that strict SNI refused: the record takes what it shows from here, and a
failed handshake is explained from it (:mod:`secure_echo.tls.diagnosis`).  The
connection drops its notes once the handshake is done, so an open connection
pays nothing for them.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from cryptography import x509

from secure_echo.edge.text import printable, printable_bytes
from secure_echo.tls.diagnosis import Failure, Presented, ServerPolicy, diagnose
from secure_echo.tls.offered import summarise
from secure_echo.tls.verify import describe
from secure_echo.wire.clienthello import ClientHello, ClientHelloCollector, Unparsed

if TYPE_CHECKING:
    from OpenSSL.crypto import X509

    from secure_echo.tls.record import ConnectionRecord


class HandshakeNotes:
    """One handshake's notes (see the module docstring)."""

    __slots__ = (
        "collector",
        "hello",
        "presented",
        "sni_refused",
        "verify_code",
        "verify_error",
    )

    def __init__(self, *, collect: bool = True) -> None:
        #: Collects the ClientHello until it is read (None: done, or not collecting).
        self.collector: ClientHelloCollector | None = ClientHelloCollector() if collect else None
        #: The ClientHello as read, for a failure's explanation.
        self.hello: ClientHello | None = None
        self.presented: X509 | None = None
        self.verify_error: str | None = None
        self.verify_code: int | None = None
        self.sni_refused: str | None = None

    # -- what the handshake's callbacks report (the notes are the TLS app data) ------

    def note_presented(self, cert: X509) -> None:
        """The client presented ``cert`` (from :mod:`secure_echo.tls.verify`)."""
        self.presented = cert

    def note_verify_error(self, reason: str, code: int | None = None) -> None:
        """The client's certificate was refused, and why (from :mod:`secure_echo.tls.verify`)."""
        self.verify_error = reason
        self.verify_code = code

    def note_sni_refused(self, name: str) -> None:
        """``--strict-sni`` refused the server name (from :mod:`secure_echo.tls.sni`)."""
        self.sni_refused = printable(name)
        self.verify_error = f"no certificate for the server name {self.sni_refused}"

    def feed(self, data: bytes, record: ConnectionRecord) -> None:
        """The client's next bytes as they arrived; fills ``record`` once the hello is read."""
        collector = self.collector
        if collector is None:
            return
        result = collector.feed(data)
        if result is not None:
            self._done(result, record)

    def finish(self, record: ConnectionRecord) -> None:
        """The handshake ended before the ClientHello was whole: record that much."""
        collector = self.collector
        if collector is not None:
            self._done(collector.finish(), record)

    def _done(self, result: ClientHello | Unparsed, record: ConnectionRecord) -> None:
        self.collector = None
        if isinstance(result, ClientHello):
            self.hello = result
            if result.server_name is not None and record.sni is None:
                # Known now, though OpenSSL may never say it (a failed handshake).
                record.sni = printable_bytes(result.server_name)
        record.client_hello, record.ja4, record.ja4_r = summarise(result)

    def explain(self, record: ConnectionRecord, policy: ServerPolicy) -> Failure:
        """Why the handshake failed: fill the record's certificate fields, diagnose."""
        self.finish(record)
        presented = None
        if self.presented is not None:
            subject, issuer, sha256 = describe(self.presented)
            record.client_cert_subject = subject
            record.client_cert_issuer = issuer
            record.client_cert_sha256 = sha256
            presented = _presented(self.presented, subject, issuer)
        return diagnose(
            record.tls_error,
            hello=self.hello,
            policy=policy,
            verify_code=self.verify_code,
            refusal=self.verify_error,
            presented=presented,
            sni_refused=self.sni_refused,
            now=datetime.datetime.now(datetime.UTC),
        )


def _presented(cert: X509, subject: str, issuer: str) -> Presented:
    """The details of a presented certificate that a failure's hint names."""
    try:
        parsed = cert.to_cryptography()
        not_before, not_after = parsed.not_valid_before_utc, parsed.not_valid_after_utc
    except Exception:  # an unparsable certificate: named, but without its dates
        return Presented(subject, issuer)
    usages: tuple[str, ...] = ()
    try:
        eku = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = tuple(getattr(oid, "_name", oid.dotted_string) for oid in eku)
    except (x509.ExtensionNotFound, ValueError):
        pass
    return Presented(subject, issuer, not_before, not_after, usages)
