"""What ``secure-echo-client -v`` prints about a connection once its handshake is done.

Every line starts with ``* `` (as ``curl -v`` marks its own remarks) and goes to standard
error, so standard output stays the server's bytes.  The lines, in order::

    * connected to HOST:PORT
    *   server name: NAME (sent as SNI; checked in the certificate)
    *   TLS version: TLSv1.3
    *   cipher: TLS_AES_256_GCM_SHA384
    *   group: x25519
    *   ALPN: h2 (offered: h2, http/1.1)
    *   groups offered: x25519, secp256r1, ... (key share: x25519)
    *   post-quantum: not offered: OpenSSL 3.0.19 ..., which this Python's ssl uses, ...
    *   verification: against ca.pem
    *   certificate chain, as verified (...), 2 certificates:
    *     [0] subject: CN=localhost
    *         issuer: CN=...,O=secure-echo
    *         valid: 2026-05-09 07:25:00 UTC to 2026-08-07 07:30:00 UTC (89 days left)
    *         SANs: DNS:localhost, IP:127.0.0.1
    *     [1] ...

Where each fact comes from, and the limits of Python's ``ssl``:

* Version, cipher and ALPN: the ``SSLObject``.
* Group: ``SSLObject.group()`` where Python has it (3.15+, OpenSSL 3.2+); otherwise read
  from the server's handshake bytes by :mod:`secure_echo.tools.handshake` (the TLS 1.3
  ServerHello or the TLS 1.2 ECDHE ServerKeyExchange, both in the clear).  ``unknown``
  when neither says.
* Groups offered: always read from the client's own ClientHello bytes, since no Python
  version reports them.
* Chain: ``get_verified_chain()`` / ``get_unverified_chain()`` (public from Python 3.13);
  on 3.10-3.12 the same methods exist only on the private ``_sslobj``, which
  :func:`_private_chain` uses if present; failing both, only the server's own
  certificate (``getpeercert(binary_form=True)``), and the report says so.  Without
  verification (``--insecure``) the chain shown is the one the server sent.
"""

from __future__ import annotations

import datetime
import ipaddress
import platform
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509

from secure_echo.tools.handshake import (
    POST_QUANTUM,
    ClientOffer,
    group_name,
    parse_client_offer,
    parse_server_choice,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

#: ``_ssl.ENCODING_DER``: the argument of the private ``Certificate.public_bytes``.
_ENCODING_DER = 2
#: The first OpenSSL release with ML-KEM groups (X25519MLKEM768 in its default list).
_OPENSSL_WITH_MLKEM = (3, 5)


@dataclass(frozen=True)
class Chain:
    """The server's certificates (DER, leaf first) and which chain they are."""

    certificates: tuple[bytes, ...]
    description: str


def connection_report(
    tls: ssl.SSLObject,
    *,
    address: str,
    server_name: str,
    trust: str,
    offered_alpn: Sequence[str],
    sent: bytes,
    received: bytes,
) -> list[str]:
    """Return the report's lines (each starting ``* ``, no newline).

    ``sent`` and ``received`` are the bytes of the handshake each way; ``trust`` says
    what the certificate was checked against (``"none (--insecure)"`` when it was not).
    """
    cipher = tls.cipher()
    lines = [
        f"connected to {address}",
        f"  server name: {server_name} ({_name_use(server_name, tls.context.check_hostname)})",
        f"  TLS version: {tls.version() or 'unknown'}",
        f"  cipher: {cipher[0] if cipher else 'unknown'}",
    ]
    offer = parse_client_offer(sent)
    chosen, group_text = _group(tls, received)
    lines.append(f"  group: {group_text}")
    lines.append(f"  ALPN: {_alpn(tls, offered_alpn)}")
    if offer is not None:
        shares = ", ".join(group_name(code) for code in offer.key_shares) or "none"
        offered = ", ".join(group_name(code) for code in offer.groups) or "none"
        lines.append(f"  groups offered: {offered} (key share: {shares})")
        pq = post_quantum_line(offer, chosen, ssl.OPENSSL_VERSION_INFO, ssl.OPENSSL_VERSION)
        lines.append(f"  post-quantum: {pq}")
    lines.append(f"  verification: {trust}")
    chain = peer_chain(tls, verified=tls.context.verify_mode != ssl.CERT_NONE)
    count = len(chain.certificates)
    lines.append(
        f"  certificate chain, {chain.description}, {count} certificate{'s' * (count != 1)}:"
    )
    now = datetime.datetime.now(datetime.UTC)
    for index, der in enumerate(chain.certificates):
        lines.extend("    " + line for line in certificate_lines(index, der, now=now))
    return ["* " + line for line in lines]


def _name_use(name: str, checked: bool) -> str:
    """How the server name was used: SNI (never for an IP address) and the check."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        sent = "sent as SNI"
    else:
        sent = "an IP address: no SNI"
    return f"{sent}; {'checked in the certificate' if checked else 'not checked'}"


def _group(tls: ssl.SSLObject, received: bytes) -> tuple[int | None, str]:
    """The chosen group's code (if known from the bytes) and how to show it."""
    cipher = tls.cipher()
    ecdhe = cipher is not None and "ECDHE" in cipher[0]
    choice = parse_server_choice(received, ecdhe=ecdhe)
    chosen = choice.group if choice is not None else None
    ask = getattr(tls, "group", None)  # Python 3.15+
    if ask is not None:
        try:
            named = ask()
        except (NotImplementedError, ssl.SSLError):  # OpenSSL before 3.2
            named = None
        if named:
            return chosen, str(named)
    if choice is None or chosen is None:
        return None, "unknown"
    text = group_name(chosen)
    if choice.retried:
        text += (
            " (after a HelloRetryRequest: the server wanted another key share than the "
            "client sent)"
        )
    return chosen, text


def _alpn(tls: ssl.SSLObject, offered: Sequence[str]) -> str:
    selected = tls.selected_alpn_protocol()
    listed = f"offered: {', '.join(offered)}" if offered else "none offered"
    return f"{selected or 'none'} ({listed})"


def post_quantum_line(
    offer: ClientOffer,
    chosen: int | None,
    library_version: tuple[int, ...],
    library_name: str,
) -> str:
    """Say whether a post-quantum group was offered and chosen, or why none was offered.

    ``library_version``/``library_name`` are those of the OpenSSL Python's ``ssl`` uses.
    The client never narrows OpenSSL's default groups, so it offers X25519MLKEM768
    exactly when that OpenSSL (3.5 or later) offers it by default.
    """
    offered = [code for code in offer.groups if code in POST_QUANTUM]
    if offered:
        names = ", ".join(group_name(code) for code in offered)
        verdict = "chose it" if chosen in POST_QUANTUM else "chose a classical group"
        if chosen is None:
            verdict = "did not say which group it chose"
        return f"offered ({names}); the server {verdict}"
    if tuple(library_version[:2]) < _OPENSSL_WITH_MLKEM:
        return (
            f"not offered: {library_name}, which this Python's ssl uses, has no ML-KEM "
            "group (OpenSSL 3.5 and later offer X25519MLKEM768 by default)"
        )
    return (
        f"not offered: {library_name} has ML-KEM groups, but its configuration "
        "(openssl.cnf Groups) leaves them out of the default list"
    )


def peer_chain(tls: ssl.SSLObject, *, verified: bool) -> Chain:
    """Return the chain to show: the verified one if ``verified``, else the one sent."""
    if verified:
        chain = _chain(tls, "get_verified_chain")
        if chain:
            return Chain(chain, "as verified (the server's certificate up to the trust anchor)")
    chain = _chain(tls, "get_unverified_chain")
    if chain:
        return Chain(chain, "as sent by the server (not verified)")
    leaf = tls.getpeercert(binary_form=True)
    return Chain(
        (leaf,) if leaf else (),
        f"only the server's certificate (Python {platform.python_version()}'s ssl gives no chain)",
    )


def _chain(tls: ssl.SSLObject, method: str) -> tuple[bytes, ...]:
    """Call the public chain ``method`` (Python 3.13+), else its private twin."""
    public = getattr(tls, method, None)
    if public is not None:
        return tuple(public())
    return _private_chain(tls, method)


def _private_chain(tls: ssl.SSLObject, method: str) -> tuple[bytes, ...]:
    """The chain from the private ``_ssl._SSLSocket`` method of Python 3.10 to 3.12.

    ``SSLObject._sslobj.get_verified_chain()`` returns ``_ssl.Certificate`` objects (or
    ``None``); Python 3.13 made it public with DER bytes.  Anything unexpected (the
    attribute gone, another type) gives an empty chain, so the caller falls back to
    the leaf and says so, instead of failing the connection.
    """
    inner: Any = getattr(tls, "_sslobj", None)
    call = getattr(inner, method, None)
    if call is None:
        return ()
    try:
        certificates = call() or []
        return tuple(bytes(cert.public_bytes(_ENCODING_DER)) for cert in certificates)
    except (AttributeError, TypeError, ValueError, ssl.SSLError):
        return ()


def certificate_lines(index: int, der: bytes, *, now: datetime.datetime) -> list[str]:
    """Describe one certificate: subject, issuer, validity (against ``now``) and SANs."""
    try:
        cert = x509.load_der_x509_certificate(der)
        subject, issuer = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    except ValueError as error:
        return [f"[{index}] cannot be read: {error}"]
    pad = " " * (len(str(index)) + 3)
    if cert.subject == cert.issuer:
        issuer += " (self-signed)"
    return [
        f"[{index}] subject: {subject}",
        f"{pad}issuer: {issuer}",
        f"{pad}valid: {_when(start)} to {_when(end)} ({_standing(start, end, now)})",
        f"{pad}SANs: {_sans(cert)}",
    ]


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _standing(start: datetime.datetime, end: datetime.datetime, now: datetime.datetime) -> str:
    if now < start:
        return f"not valid for another {(start - now).days} days"
    if now > end:
        return f"expired {(now - end).days} days ago"
    return f"{(end - now).days} days left"


def _sans(cert: x509.Certificate) -> str:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "none"
    except ValueError as error:
        return f"unreadable ({error})"
    shown = [f"DNS:{name}" for name in names.get_values_for_type(x509.DNSName)]
    shown += [f"IP:{ip}" for ip in names.get_values_for_type(x509.IPAddress)]
    shown += [f"URI:{uri}" for uri in names.get_values_for_type(x509.UniformResourceIdentifier)]
    shown += [f"email:{mail}" for mail in names.get_values_for_type(x509.RFC822Name)]
    return ", ".join(shown) or "none"
