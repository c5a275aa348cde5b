"""What a finished handshake says about the connection, read into its record."""

from __future__ import annotations

from typing import TYPE_CHECKING

from secure_echo.tls.policy import fingerprint_sha256, session_reused, subject_alt_names

if TYPE_CHECKING:
    from OpenSSL import SSL

    from secure_echo.tls.record import ConnectionRecord


def record_handshake(record: ConnectionRecord, tls: SSL.Connection, now: float) -> None:
    """Fill ``record``'s TLS facts from ``tls``, whose handshake finished at ``now``.

    Read once per connection: version, cipher, group, SNI, ALPN, resumption and the
    client certificate (subject, fingerprint, SANs, expiry).
    """
    record.handshake_ms = round((now - record.started) * 1000.0, 3)
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
