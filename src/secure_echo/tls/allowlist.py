"""Client-certificate allow-lists for mutual TLS.

With ``--client-ca`` a client certificate must chain to that CA.  The allow-lists
narrow this further: when any list is given, a verified client certificate passes
only if it matches at least one entry of any list:

* ``--allow-cn NAME``: the subject's common name equals ``NAME``;
* ``--allow-dns NAME``: a DNS subjectAltName equals ``NAME`` (case-insensitive);
* ``--allow-uri URI``: a URI subjectAltName equals ``URI`` exactly (SPIFFE IDs such
  as ``spiffe://example.org/ns/prod/sa/web``);
* ``--allow-spki-sha256 HEX``: the SHA-256 of the certificate's
  SubjectPublicKeyInfo (DER) equals ``HEX`` (the pin survives re-issuing the
  certificate with the same key; ``openssl x509 -pubkey -noout | openssl pkey
  -pubin -outform der | sha256sum``).

The check runs in OpenSSL's verify callback for the leaf, so an unlisted client is
refused during the handshake with an alert, not after it.  It is pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from secure_echo.edge.text import printable

if TYPE_CHECKING:
    from collections.abc import Iterable

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AllowListError(ValueError):
    """An allow-list entry is malformed; ``str()`` names the option and the fix."""


def spki_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's SubjectPublicKeyInfo."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _normalise_spki(value: str) -> str:
    cleaned = value.strip().lower()
    # Strip the prefix before the colons, or "sha256:" would never be recognised.
    if cleaned.startswith(("sha256/", "sha256:")):
        cleaned = cleaned[7:]
    cleaned = cleaned.replace(":", "")
    if not _HEX64.match(cleaned):
        msg = (
            f"--allow-spki-sha256: {value!r} is not 64 hex digits; give the SHA-256 of "
            "the client key's SubjectPublicKeyInfo in hex"
        )
        raise AllowListError(msg)
    return cleaned


@dataclass(frozen=True)
class AllowList:
    """The four lists; empty everywhere means every verified client passes."""

    cns: frozenset[str] = frozenset()
    dns: frozenset[str] = frozenset()
    uris: frozenset[str] = frozenset()
    spki_sha256: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        cns: Iterable[str] = (),
        dns: Iterable[str] = (),
        uris: Iterable[str] = (),
        spki: Iterable[str] = (),
    ) -> AllowList:
        """Validate and normalise the entries; raise :class:`AllowListError`."""
        uris = tuple(uris)  # iterated twice below; a generator would be used up
        for uri in uris:
            if ":" not in uri:
                msg = f"--allow-uri: {uri!r} is not a URI; give e.g. spiffe://example.org/svc"
                raise AllowListError(msg)
        return cls(
            cns=frozenset(cns),
            dns=frozenset(name.lower().rstrip(".") for name in dns),
            uris=frozenset(uris),
            spki_sha256=frozenset(_normalise_spki(value) for value in spki),
        )

    @property
    def active(self) -> bool:
        """True if any list has an entry."""
        return bool(self.cns or self.dns or self.uris or self.spki_sha256)

    def check(self, cert: x509.Certificate) -> str | None:
        """Return None if ``cert`` passes, else the reason it does not."""
        if not self.active:
            return None
        if self.cns:
            for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
                if attribute.value in self.cns:
                    return None
        if (self.dns or self.uris) and self._san_matches(cert):
            return None
        if self.spki_sha256 and spki_sha256(cert) in self.spki_sha256:
            return None
        subject = printable(cert.subject.rfc4514_string())
        return f"client certificate {subject} is not on the allow-list"

    def _san_matches(self, cert: x509.Certificate) -> bool:
        """True if a DNS or URI subjectAltName of ``cert`` is listed."""
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        if self.dns and any(
            name.lower().rstrip(".") in self.dns for name in san.get_values_for_type(x509.DNSName)
        ):
            return True
        return bool(self.uris) and any(
            uri in self.uris for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        )
