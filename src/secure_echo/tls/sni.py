"""Choosing the certificate by the name the client asked for (SNI).

With several ``--cert``, each is served to clients whose server name it carries
(a DNS subjectAltName, exactly or by a one-label wildcard such as
``*.example.org``); the first is the default, for clients that send no name or a
name no certificate carries.  ``--test-certs DIR`` adds certificates served, as
they are, for exactly the name their file is called.  With ``--strict-sni`` a
name that nothing carries is refused with the ``unrecognized_name`` alert.

The choice happens in OpenSSL's server-name callback, which this module installs
through pyOpenSSL's binding (the public callback cannot answer with an alert):
confined here, and tested on the wire.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

#: TLS alert 112: the server has no certificate for the name asked for.
UNRECOGNIZED_NAME: Final = 112


def normal_name(raw: bytes | str) -> str:
    """A server name as compared: lower case, no trailing dot."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    return text.lower().rstrip(".")


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS subjectAltNames of ``cert``, normalised (the names it may serve)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return ()
    return tuple(normal_name(name) for name in san.get_values_for_type(x509.DNSName))


def matches(name: str, pattern: str) -> bool:
    """Whether ``name`` is ``pattern``, or fits its one-label wildcard (``*.a.b``)."""
    if not pattern.startswith("*."):
        return name == pattern
    label, dot, rest = name.partition(".")
    return bool(label) and bool(dot) and rest == pattern[2:]


class Chooser:
    """Which context serves which name (see the module docstring)."""

    def __init__(
        self,
        served: Sequence[tuple[Iterable[str], SSL.Context]],
        test: Sequence[tuple[str, SSL.Context]] = (),
        *,
        strict: bool = False,
    ) -> None:
        self._test = {normal_name(name): context for name, context in test}
        self._exact: dict[str, SSL.Context] = {}
        self._wildcards: list[tuple[str, SSL.Context]] = []
        for names, context in served:
            for pattern in names:
                if pattern.startswith("*."):
                    self._wildcards.append((pattern, context))
                else:
                    self._exact.setdefault(pattern, context)
        self.strict = strict

    def choose(self, raw: bytes | None) -> SSL.Context | bool | None:
        """The context for server name ``raw``: None for the default, False to refuse."""
        if raw is None:
            return None
        name = normal_name(raw)
        found = self._test.get(name) or self._exact.get(name)
        if found is not None:
            return found
        for pattern, context in self._wildcards:
            if matches(name, pattern):
                return context
        return False if self.strict else None


def install_sni(context: SSL.Context, chooser: Chooser) -> None:
    """Let ``chooser`` pick the context of each connection made from ``context``."""

    def callback(ssl: Any, alert: Any, _arg: Any) -> int:
        try:
            pointer = _lib.SSL_get_servername(ssl, _lib.TLSEXT_NAMETYPE_host_name)
            raw = None if pointer == _ffi.NULL else _ffi.string(pointer)
            chosen = chooser.choose(raw)
            if chosen is False:
                alert[0] = UNRECOGNIZED_NAME
                connection = SSL.Connection._reverse_mapping.get(ssl)
                note = getattr(connection and connection.get_app_data(), "note_sni_refused", None)
                if note is not None:
                    note(normal_name(raw or b""))
                return int(_lib.SSL_TLSEXT_ERR_ALERT_FATAL)
            if isinstance(chosen, SSL.Context):
                SSL.Connection._reverse_mapping[ssl].set_context(chosen)
        except Exception:
            return int(_lib.SSL_TLSEXT_ERR_OK)
        return int(_lib.SSL_TLSEXT_ERR_OK)

    handle = _ffi.callback("int (*)(SSL *, int *, void *)", callback)
    _lib.SSL_CTX_set_tlsext_servername_callback(context._context, handle)
    # The context keeps the C callback alive as long as it may be called.
    context._secure_echo_sni = handle  # type: ignore[attr-defined]
