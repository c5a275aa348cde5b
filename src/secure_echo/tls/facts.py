"""What a finished handshake says about the connection, read into its record."""

from __future__ import annotations

from typing import TYPE_CHECKING

from secure_echo.edge.text import printable, printable_bytes
from secure_echo.tls.policy import session_reused, subject_alt_names
from secure_echo.tls.verify import describe

if TYPE_CHECKING:
    from OpenSSL import SSL

    from secure_echo.tls.record import ConnectionRecord


def record_handshake(
    record: ConnectionRecord, tls: SSL.Connection, now: float, *, alpn: bool = True
) -> None:
    """Fill ``record``'s TLS facts from ``tls``, whose handshake finished at ``now``.

    ``alpn`` False says the server selects no protocol (no ``--alpn``): nothing to read.

    Read once per connection: version, cipher, group, SNI, ALPN, resumption and the
    client certificate (subject, issuer, fingerprint, SANs, expiry).  A client
    certificate that OpenSSL accepted but ``cryptography`` cannot parse is still
    named and fingerprinted; its SANs and expiry are then left out.
    """
    record.handshake_ms = round((now - record.started) * 1000.0, 3)
    record.tls_version = tls.get_protocol_version_name()
    record.cipher = tls.get_cipher_name()
    record.group = tls.get_group_name()
    sni = tls.get_servername()
    record.sni = printable_bytes(sni) if sni else None
    if alpn:
        selected = tls.get_alpn_proto_negotiated()
        record.alpn = printable_bytes(selected) if selected else None
    peer = tls.get_peer_certificate()
    if peer is not None:
        subject, issuer, sha256 = describe(peer)
        record.client_cert_subject = subject
        record.client_cert_issuer = issuer
        record.client_cert_sha256 = sha256
        try:
            parsed = peer.to_cryptography()
            record.client_cert_sans = [printable(name) for name in subject_alt_names(parsed)]
            record.client_cert_not_after = parsed.not_valid_after_utc.isoformat()
        except Exception:  # noqa: S110 - described above; nothing more to say
            pass
    record.resumed = session_reused(tls)
