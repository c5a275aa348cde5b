"""Why a handshake failed, in a few stable words (a metric label, a log digest key).

OpenSSL's reasons vary in wording between versions and carry details; grouped
here, they count and summarise well.
"""

from __future__ import annotations

import re
from typing import Final

#: The value for anything not recognised.
OTHER: Final = "other"

#: Every value of ``secure_echo_handshake_failures_total``'s ``reason`` label.
HANDSHAKE_FAILURE_REASONS: Final = (
    "no_shared_cipher",
    "unsupported_protocol",
    "certificate_required",
    "certificate_unknown",
    "allow_list",
    "revoked",
    "unrecognized_name",
    "client_rejected_certificate",
    "timeout",
    "closed",
    "plaintext",
    OTHER,
)

#: OpenSSL's words for an alert the client sent about this server's certificate.
CLIENT_REFUSED_ALERTS: Final = (
    "alert unknown ca",
    "alert bad certificate",
    "alert certificate unknown",
    "alert certificate expired",
    "alert certificate revoked",
    "alert unsupported certificate",
)

# OpenSSL reason substrings (lower case), checked in this order; the first match
# wins.  tls.connection.ssl_error_text joins several reasons with "; " and the
# connection appends the verify callback's reason after ": ".
_REASON_PATTERNS: Final = (
    # tls.verify's allow-list refusal, inside "certificate verify failed: ...".
    ("allow_list", ("is not on the allow-list",)),
    ("revoked", ("certificate revoked",)),
    ("unrecognized_name", ("no certificate for the server name",)),
    ("certificate_required", ("peer did not return a certificate", "certificate required")),
    ("certificate_unknown", ("certificate verify failed",)),
    # Alerts the client sent because it refused our certificate.
    ("client_rejected_certificate", CLIENT_REFUSED_ALERTS),
    # No cipher suite, group or signature algorithm in common.
    (
        "no_shared_cipher",
        (
            "no shared cipher",
            "no cipher",
            "no shared signature",
            "no suitable signature",
            "no suitable key share",
            "no shared group",
        ),
    ),
    (
        "unsupported_protocol",
        (
            "unsupported protocol",
            "alert protocol version",
            "version too low",
            "no protocols available",
            "inappropriate fallback",
        ),
    ),
    # The client went away: the connection's own reasons and OpenSSL's EOF / errno.
    ("closed", ("closed the connection", "connection closed", "unexpected eof", "system error")),
    # An HTTP client that got past the first-byte check.
    ("plaintext", ("http request", "https proxy request")),
)


def handshake_failure_reason(reason: str | None) -> str:
    """Map a handshake's ``tls_error`` to one of :data:`HANDSHAKE_FAILURE_REASONS`.

    ``certificate_unknown`` is a client certificate we refused (untrusted, expired,
    wrong purpose); ``allow_list`` one that verified but is not on the allow-list;
    ``client_rejected_certificate`` a client that refused *our* certificate with an
    alert.  Anything not recognised is ``other``.
    """
    if not isinstance(reason, str):
        return OTHER
    text = reason.lower()
    for label, needles in _REASON_PATTERNS:
        if any(needle in text for needle in needles):
            return label
    return OTHER


#: An HTTP request line's start: a method token and a space (RFC 9110's methods,
#: and any upper-case token a proxy or a scanner may send).
_HTTP_REQUEST: Final = re.compile(rb"[A-Z]{3,12} ")


def looks_like_http(first: bytes) -> bool:
    """Whether a plaintext client's first bytes start an HTTP request."""
    return _HTTP_REQUEST.match(first) is not None


def plaintext_answer(first: bytes, hint: bytes) -> bytes:
    """What a client that does not speak TLS is told, in a form it can show.

    An HTTP client (``curl http://host:8443/``) gets an ``HTTP/1.0 400`` whose
    body is ``hint``, so it prints it; any other gets ``hint`` as a line.
    """
    if not looks_like_http(first):
        return hint
    return (
        b"HTTP/1.0 400 Bad Request\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n"
        b"\r\n" % len(hint)
    ) + hint
