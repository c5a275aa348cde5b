"""Why a handshake failed, as a stable code and one line a user can act on.

OpenSSL says what broke in its own words ("no shared cipher", "certificate
verify failed").  :func:`diagnose` turns that, the client's certificate as
presented, and what the client offered in its ClientHello into a ``failure``
code (stable: docs/troubleshooting.md lists each) and a ``hint`` that puts the
client's offer next to what this server accepts, e.g.::

    no_common_version: the client offers TLS 1.0, TLS 1.1; this server accepts
    TLS 1.2, TLS 1.3 (profile intermediate)

Nothing here does I/O: the inputs are plain values, so each code is tested from
recorded or generated ClientHellos and real certificates.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, rsa

from secure_echo.tls.failures import CLIENT_REFUSED_ALERTS
from secure_echo.tls.policy import GROUPS, TLS12_CIPHERS, TLS13_CIPHERS, LoadedTLS, TLSProfile
from secure_echo.tls.sni import dns_names
from secure_echo.wire.clienthello import (
    CIPHER_SUITE_NAMES,
    GROUP_NAMES,
    SIGNATURE_SCHEME_NAMES,
    VERSION_NAMES,
    is_grease,
    name_of,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from cryptography import x509

    from secure_echo.wire.clienthello import ClientHello

#: X.509 verification errors (OpenSSL's ``X509_V_ERR_*``) that name a cause.
V_ERR_UNABLE_TO_GET_ISSUER_CERT: Final = 2
V_ERR_CERT_NOT_YET_VALID: Final = 9
V_ERR_CERT_HAS_EXPIRED: Final = 10
V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT: Final = 18
V_ERR_SELF_SIGNED_CERT_IN_CHAIN: Final = 19
V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: Final = 20
V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE: Final = 21
V_ERR_CERT_REVOKED: Final = 23
V_ERR_INVALID_PURPOSE: Final = 26
V_ERR_CERT_UNTRUSTED: Final = 27
V_ERR_CERT_REJECTED: Final = 28
_UNKNOWN_CA: Final = frozenset(
    {
        V_ERR_UNABLE_TO_GET_ISSUER_CERT,
        V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
        V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
        V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
        V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
        V_ERR_CERT_UNTRUSTED,
    }
)

#: The TLS versions, by wire value, that this server can accept at all.
TLS12: Final = 0x0303
TLS13: Final = 0x0304

#: IANA values of the suites, groups and schemes the policy names.
SUITE_IDS: Final = {
    "TLS_AES_128_GCM_SHA256": 0x1301,
    "TLS_AES_256_GCM_SHA384": 0x1302,
    "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
    "ECDHE-ECDSA-AES128-GCM-SHA256": 0xC02B,
    "ECDHE-RSA-AES128-GCM-SHA256": 0xC02F,
    "ECDHE-ECDSA-AES256-GCM-SHA384": 0xC02C,
    "ECDHE-RSA-AES256-GCM-SHA384": 0xC030,
    "ECDHE-ECDSA-CHACHA20-POLY1305": 0xCCA9,
    "ECDHE-RSA-CHACHA20-POLY1305": 0xCCA8,
}
GROUP_IDS: Final = {"X25519MLKEM768": 0x11EC, "X25519": 0x001D, "P-256": 0x0017, "P-384": 0x0018}
#: Signature schemes that can sign with each kind of server key (TLS 1.2 and 1.3).
SCHEMES_BY_KEY: Final = {
    "ec": frozenset({0x0403, 0x0503, 0x0603}),
    "rsa": frozenset({0x0804, 0x0805, 0x0806, 0x0809, 0x080A, 0x080B, 0x0401, 0x0501, 0x0601}),
    "ed25519": frozenset({0x0807}),
    "ed448": frozenset({0x0808}),
}


@dataclass(frozen=True)
class ServerPolicy:
    """What this server accepts, as :func:`diagnose` compares it with an offer."""

    profile: str
    versions: tuple[int, ...]
    tls12_suites: tuple[str, ...]
    tls13_suites: tuple[str, ...]
    groups: tuple[str, ...]
    #: The kind of each certificate's key: ``ec``, ``rsa``, ``ed25519``, ``ed448``.
    key_kinds: frozenset[str]
    #: Subjects of the client CAs (empty without client authentication).
    client_cas: tuple[str, ...] = ()
    #: Names the certificates carry (for an SNI refusal).
    names: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Presented:
    """The client certificate as presented, for certificate failures."""

    subject: str | None = None
    issuer: str | None = None
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    usages: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failure:
    """A failed handshake's ``failure`` code and ``hint``."""

    code: str
    hint: str

    def as_fields(self) -> dict[str, str]:
        """The record's fields."""
        return {"failure": self.code, "hint": self.hint}


def _names(values: Iterable[int], table: Mapping[int, str]) -> str:
    shown = [name_of(value, table) for value in values if not is_grease(value)]
    return ", ".join(shown) or "none"


def offered_versions(hello: ClientHello) -> tuple[int, ...]:
    """The versions a ClientHello offers: supported_versions, else its legacy version."""
    if hello.supported_versions:
        return tuple(v for v in hello.supported_versions if not is_grease(v))
    return tuple(v for v in VERSION_NAMES if TLS12 - 3 <= v <= hello.legacy_version)


def _version_failure(hello: ClientHello, policy: ServerPolicy) -> Failure | None:
    offered = offered_versions(hello)
    if set(offered) & set(policy.versions):
        return None
    # Without supported_versions a client names only its highest version.
    offers = (
        _names(offered, VERSION_NAMES)
        if hello.supported_versions
        else f"up to {name_of(hello.legacy_version, VERSION_NAMES)}"
    )
    return Failure(
        "no_common_version",
        f"the client offers {offers}; this server accepts "
        f"{_names(sorted(policy.versions, reverse=True), VERSION_NAMES)} "
        f"(profile {policy.profile})",
    )


def _usable_suites(hello: ClientHello, policy: ServerPolicy) -> tuple[int, ...]:
    """The server's suites for the best version both sides share."""
    common = set(offered_versions(hello)) & set(policy.versions)
    if TLS13 in common:
        return tuple(SUITE_IDS[name] for name in policy.tls13_suites)
    kinds = policy.key_kinds
    return tuple(
        SUITE_IDS[name]
        for name in policy.tls12_suites
        if ("ECDSA" in name and "ec" in kinds) or ("RSA" in name and "rsa" in kinds)
    )


def _cipher_failure(hello: ClientHello, policy: ServerPolicy) -> Failure | None:
    ours = _usable_suites(hello, policy)
    if set(hello.cipher_suites) & set(ours):
        return None
    return Failure(
        "no_common_cipher",
        f"the client offers {_names(hello.cipher_suites, CIPHER_SUITE_NAMES)}; this server "
        f"accepts {_names(ours, CIPHER_SUITE_NAMES)} for the version you both support",
    )


def _group_failure(hello: ClientHello, policy: ServerPolicy) -> Failure | None:
    ours = tuple(GROUP_IDS[name] for name in policy.groups)
    offered = hello.supported_groups
    if not offered or set(offered) & set(ours):
        return None
    return Failure(
        "no_common_group",
        f"the client offers the groups {_names(offered, GROUP_NAMES)}; this server accepts "
        f"{_names(ours, GROUP_NAMES)}",
    )


def _signature_failure(hello: ClientHello, policy: ServerPolicy) -> Failure | None:
    offered = hello.signature_algorithms
    usable = frozenset().union(*(SCHEMES_BY_KEY.get(kind, ()) for kind in policy.key_kinds))
    if not offered or set(offered) & usable:
        return None
    return Failure(
        "no_common_signature",
        f"the client accepts the signatures {_names(offered, SIGNATURE_SCHEME_NAMES)}; "
        f"this server's certificate signs with {_names(sorted(usable), SIGNATURE_SCHEME_NAMES)}",
    )


def _offer_failure(hello: ClientHello | None, policy: ServerPolicy) -> Failure | None:
    """What in the client's offer this server cannot meet, checked in handshake order."""
    if hello is None:
        return None
    for check in (_version_failure, _cipher_failure, _group_failure, _signature_failure):
        failure = check(hello, policy)
        if failure is not None:
            return failure
    return None


def _dates(presented: Presented) -> str:
    before = f"{presented.not_before:%Y-%m-%d %H:%M}" if presented.not_before else "?"
    after = f"{presented.not_after:%Y-%m-%d %H:%M}" if presented.not_after else "?"
    return f"valid from {before} to {after} UTC"


def _unknown_ca(subject: str, presented: Presented, policy: ServerPolicy, _: str) -> Failure:
    trusted = "; ".join(policy.client_cas) or "none"
    return Failure(
        "unknown_ca",
        f"{subject} was issued by {presented.issuer or 'an unknown issuer'}, which this "
        f"server does not trust (it trusts: {trusted}); present a certificate from one "
        "of those CAs",
    )


def _expired(subject: str, presented: Presented, _policy: ServerPolicy, now: str) -> Failure:
    return Failure(
        "certificate_expired", f"{subject} is {_dates(presented)}, and it is now {now}; renew it"
    )


def _not_yet_valid(subject: str, presented: Presented, _policy: ServerPolicy, now: str) -> Failure:
    return Failure(
        "certificate_not_yet_valid",
        f"{subject} is {_dates(presented)}, and it is now {now}; check the client's clock or wait",
    )


def _purpose(subject: str, presented: Presented, _policy: ServerPolicy, _: str) -> Failure:
    usages = ", ".join(presented.usages) or "none"
    return Failure(
        "certificate_purpose",
        f"{subject} is not for TLS clients (its extended key usage: {usages}); use one "
        "issued with clientAuth",
    )


def _revoked(subject: str, _presented: Presented, _policy: ServerPolicy, _: str) -> Failure:
    return Failure(
        "certificate_revoked",
        f"{subject} is revoked by its CA's revocation list; issue the client a new one",
    )


#: Verification errors, each with what the client is told.
_BY_VERIFY_CODE: Final = {
    **dict.fromkeys(_UNKNOWN_CA, _unknown_ca),
    V_ERR_CERT_HAS_EXPIRED: _expired,
    V_ERR_CERT_NOT_YET_VALID: _not_yet_valid,
    V_ERR_INVALID_PURPOSE: _purpose,
    V_ERR_CERT_REVOKED: _revoked,
}


def _certificate_failure(
    verify_code: int | None,
    refusal: str | None,
    presented: Presented,
    policy: ServerPolicy,
    now: datetime.datetime,
) -> Failure | None:
    explain = _BY_VERIFY_CODE.get(verify_code) if verify_code is not None else None
    if explain is not None:
        subject = presented.subject or "the client certificate"
        return explain(subject, presented, policy, f"{now:%Y-%m-%d %H:%M} UTC")
    if verify_code == V_ERR_CERT_REJECTED and refusal is not None:
        if "allow-list" in refusal:
            return Failure(
                "allow_list", f"{refusal}; add it to the allow-list or use a listed one"
            )
        return Failure(
            "certificate_unreadable",
            f"{refusal}; the client's certificate is malformed: reissue it",
        )
    return None


#: Why a client refuses this server's certificate, by its alert (OpenSSL's words).
_CLIENT_REFUSED_WHY: Final = {
    "alert certificate expired": (
        "finds it expired or not yet valid; check the certificate's dates and the client's clock"
    ),
    "alert certificate revoked": "finds it revoked; give the server a new certificate",
    "alert unsupported certificate": (
        "finds it not meant for a TLS server (its key usage or extended key usage); issue "
        "one with serverAuth"
    ),
}


def _from_text(text: str, policy: ServerPolicy) -> Failure | None:
    """What OpenSSL's reason alone says, where the offer did not say more."""
    if "peer did not return a certificate" in text or "certificate required" in text:
        trusted = "; ".join(policy.client_cas) or "none"
        return Failure(
            "no_client_certificate",
            f"this server requires a client certificate from {trusted}, and the client "
            "sent none; give the client its certificate and key",
        )
    alert = next((words for words in CLIENT_REFUSED_ALERTS if words in text), None)
    if alert is not None:
        why = _CLIENT_REFUSED_WHY.get(alert)
        return Failure(
            "client_refused_certificate",
            f"the client refused this server's certificate ({alert.removeprefix('alert ')}): "
            + (
                f"it {why}"
                if why is not None
                else "it does not trust its CA, the name does not match, or the date is "
                "outside its validity; give the client the CA, connect by a name the "
                "certificate carries, check its dates"
            ),
        )
    if "closed" in text or "unexpected eof" in text:
        return Failure(
            "client_closed",
            "the client closed the connection during the handshake; look at the client's "
            "own error (it may not trust this server's certificate)",
        )
    return None


def diagnose(
    tls_error: str | None,
    *,
    hello: ClientHello | None = None,
    policy: ServerPolicy,
    verify_code: int | None = None,
    refusal: str | None = None,
    presented: Presented | None = None,
    sni_refused: str | None = None,
    now: datetime.datetime | None = None,
) -> Failure:
    """The failure code and hint of a handshake that failed with ``tls_error``.

    ``verify_code`` and ``refusal``: what the client-certificate check said
    (OpenSSL's error code, and our allow-list's words); ``presented`` the
    certificate; ``sni_refused`` the server name strict SNI refused.  The causes
    are tried in the order the handshake meets them.
    """
    text = (tls_error or "").lower()
    if sni_refused is not None:
        names = ", ".join(policy.names) or "none"
        return Failure(
            "unknown_sni",
            f"the client asked for {sni_refused!r}; this server's certificates are for "
            f"{names}; connect with one of those names",
        )
    found = None
    if verify_code is not None or refusal is not None:
        when = now or datetime.datetime.now(datetime.UTC)
        found = _certificate_failure(verify_code, refusal, presented or Presented(), policy, when)
    if found is None and "certificate" not in text:
        found = _offer_failure(hello, policy)
    if found is None:
        found = _from_text(text, policy)
    return found or Failure("other", f"OpenSSL says: {tls_error or 'nothing'}")


def timeout_failure(timeout: float) -> Failure:
    """The failure of a client that did not finish its handshake in ``timeout`` seconds."""
    return Failure(
        "timeout",
        f"the client did not finish the handshake within {timeout:g} s; a client "
        "that waits for the server to speak first is not speaking TLS",
    )


def plaintext_failure(http: bool) -> Failure:
    """The failure of a client that spoke plaintext (or HTTP) to the TLS port."""
    if http:
        return Failure("http", "the client sent an HTTP request without TLS; use https:// and TLS")
    return Failure("plaintext", "the client spoke without TLS; connect with a TLS client")


def _key_kind(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "ed448"
    return "ec"


def policy_of(loaded: LoadedTLS) -> ServerPolicy:
    """What the server loaded in ``loaded`` accepts, for :func:`diagnose`."""
    settings = loaded.settings
    modern = settings.profile is TLSProfile.MODERN
    leaves = [loaded.leaf, *(extra.leaf for extra in loaded.extra)]
    names: list[str] = []
    for leaf in leaves:
        names.extend(dns_names(leaf))
    names.extend(cert.name for cert in loaded.test)
    return ServerPolicy(
        profile=str(settings.profile),
        versions=(TLS13,) if modern else (TLS12, TLS13),
        tls12_suites=() if modern else TLS12_CIPHERS,
        tls13_suites=TLS13_CIPHERS,
        groups=GROUPS,
        key_kinds=frozenset(_key_kind(leaf) for leaf in leaves),
        client_cas=tuple(ca.subject.rfc4514_string() for ca in loaded.client_cas),
        names=tuple(names),
    )
