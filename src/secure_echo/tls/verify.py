"""Client-certificate verification: OpenSSL's chain checks, then the allow-list.

OpenSSL checks the chain, the dates and the purpose; :func:`install_verify`
adds a callback that narrows further (the allow-list, never widening) and tells
the connection what was presented and why it was refused.

Why a callback of our own instead of pyOpenSSL's ``Context.set_verify``: OpenSSL
picks the alert it sends for a refused certificate from the error left in the
verification context (``ssl_x509err2alert``).  pyOpenSSL's callback does not hand
that context over, so a refusal of our own left ``X509_V_OK`` there and the client
was told ``internal_error``.  Here an allow-list refusal sets
``X509_V_ERR_CERT_REJECTED``, which the client receives as ``bad_certificate``;
OpenSSL's own refusals keep their errors (``unknown_ca``, ``certificate_expired``,
``certificate_revoked``, ...).  And an exception (a certificate ``cryptography``
cannot parse) is a refusal with a reason, never an error that escapes into the
reactor.

This module reaches under pyOpenSSL (its binding's ``lib``/``ffi`` and the
connection map): confined here, and tested for its effect on the wire.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Protocol

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL.crypto import FILETYPE_ASN1, X509, dump_certificate

from secure_echo.edge.text import printable

if TYPE_CHECKING:
    from cryptography import x509

    from secure_echo.tls.allowlist import AllowList


class VerifyListener(Protocol):
    """What a connection hears from the verification of its client's certificate."""

    def note_presented(self, cert: X509) -> None:
        """The client presented this certificate (its leaf)."""

    def note_verify_error(self, reason: str, code: int | None = None) -> None:
        """The certificate was refused, and why (``code``: OpenSSL's verify error)."""


def verify_error_text(code: int) -> str:
    """Return OpenSSL's text for an X.509 verification error code."""
    text = _lib.X509_verify_cert_error_string(code)
    if text == _ffi.NULL:  # pragma: no cover - OpenSSL always returns a string
        return f"verify error {code}"
    return str(_ffi.string(text).decode("ascii", "replace"))


def _raw_name(name: Any) -> str:
    """An OpenSSL name as RFC 4514-like text, read without ``cryptography``."""
    parts = [
        f"{key.decode('ascii', 'replace')}={value.decode('utf-8', 'replace')}"
        for key, value in reversed(name.get_components())
    ]
    return ",".join(parts)


def describe(cert: X509) -> tuple[str, str, str]:
    """Subject, issuer (RFC 4514) and SHA-256 of ``cert``, whatever it holds.

    A certificate that ``cryptography`` refuses to parse is still described, from
    OpenSSL's own reading of its names.
    """
    sha256 = hashlib.sha256(dump_certificate(FILETYPE_ASN1, cert)).hexdigest()
    try:
        parsed: x509.Certificate = cert.to_cryptography()
        subject, issuer = parsed.subject.rfc4514_string(), parsed.issuer.rfc4514_string()
    except Exception:  # an unparsable certificate is described all the same
        subject, issuer = _raw_name(cert.get_subject()), _raw_name(cert.get_issuer())
    return printable(subject), printable(issuer), sha256


def _listener(store_ctx: Any) -> VerifyListener | None:
    index = _lib.SSL_get_ex_data_X509_STORE_CTX_idx()
    ssl = _lib.X509_STORE_CTX_get_ex_data(store_ctx, index)
    connection = SSL.Connection._reverse_mapping.get(ssl)
    if connection is None:
        return None
    listener = connection.get_app_data()
    if not hasattr(listener, "note_presented"):
        return None
    return listener  # type: ignore[no-any-return]


def _cert(pointer: Any) -> X509:
    """A pyOpenSSL certificate that owns a new reference to ``pointer``."""
    _lib.X509_up_ref(pointer)
    return X509._from_raw_x509_ptr(pointer)


def _check(ok: int, store_ctx: Any, allow: AllowList) -> int:
    listener = _listener(store_ctx)
    leaf = _cert(_lib.X509_STORE_CTX_get0_cert(store_ctx))
    depth = _lib.X509_STORE_CTX_get_error_depth(store_ctx)
    if listener is not None and (depth == 0 or not ok):
        # The chain is checked from its top down: the leaf's turn, or the failure
        # that ends the check, is where the record learns what was presented.
        listener.note_presented(leaf)
    reason: str | None = None
    code: int | None = None
    if not ok:
        code = _lib.X509_STORE_CTX_get_error(store_ctx)
        reason = f"{verify_error_text(code)} (depth {depth})"
    elif depth == 0 and allow.active:
        reason = allow.check(leaf.to_cryptography())
        if reason is not None:
            code = _lib.X509_V_ERR_CERT_REJECTED
            _lib.X509_STORE_CTX_set_error(store_ctx, code)
    if reason is None:
        return 1
    if listener is not None:
        listener.note_verify_error(reason, code)
    return 0


def install_verify(context: SSL.Context, mode: int, allow: AllowList) -> None:
    """Verify client certificates on ``context`` with ``mode`` and ``allow``."""

    def callback(ok: int, store_ctx: Any) -> int:
        try:
            return _check(ok, store_ctx, allow)
        except Exception as error:  # a refusal with a reason, never an escaped exception
            listener = None
            try:
                listener = _listener(store_ctx)
            finally:
                _lib.X509_STORE_CTX_set_error(store_ctx, _lib.X509_V_ERR_CERT_REJECTED)
            if listener is not None:
                listener.note_verify_error(
                    f"the certificate could not be checked: {error}",
                    _lib.X509_V_ERR_CERT_REJECTED,
                )
            return 0

    handle = _ffi.callback("int (*)(int, X509_STORE_CTX *)", callback)
    _lib.SSL_CTX_set_verify(context._context, mode, handle)
    # The context must keep the C callback alive as long as it may be called.
    context._secure_echo_verify = handle  # type: ignore[attr-defined]
