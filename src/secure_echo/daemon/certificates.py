"""What the daemon says about the certificates it serves, in its log and ``--print-config``.

A loaded TLS set (:class:`~secure_echo.tls.policy.LoadedTLS`) serves real
certificates (the default one first, then each further ``--cert``, chosen by the
client's server name) and, with ``--test-certs``, test certificates served as they
are.  :func:`served` lists the real ones (those the start-up checks and the expiry
warnings cover); :func:`describe` and :func:`describe_test` turn them into the
JSON-ready objects that ``tls_context_loaded``, ``tls_reloaded`` and
``--print-config`` show, so the three say the same thing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from secure_echo.tls.policy import fingerprint_sha256
from secure_echo.tls.sni import dns_names

if TYPE_CHECKING:
    from secure_echo.tls.policy import LoadedTLS


def served(loaded: LoadedTLS) -> tuple[LoadedTLS, ...]:
    """The real certificates of ``loaded``: the default one first, then each further one."""
    return (loaded, *loaded.extra)


def describe(loaded: LoadedTLS, *, detail: bool = False) -> list[dict[str, object]]:
    """One object per real certificate, the default one first.

    Each has ``cert``, ``key``, ``subject``, ``names`` (its DNS names: the server
    names it is chosen for), ``not_after`` and ``sha256``; ``default`` is true for the
    first.  ``detail`` adds ``issuer``, ``not_before`` and ``chain_length``.
    """
    described: list[dict[str, object]] = []
    for index, each in enumerate(served(loaded)):
        entry: dict[str, object] = {
            "cert": str(each.settings.cert),
            "key": str(each.settings.key),
            "subject": each.subject,
            "names": list(dns_names(each.leaf)),
            "not_after": each.not_after.isoformat(),
            "sha256": fingerprint_sha256(each.leaf),
            "default": index == 0,
        }
        if detail:
            entry["issuer"] = each.leaf.issuer.rfc4514_string()
            entry["not_before"] = each.leaf.not_valid_before_utc.isoformat()
            entry["chain_length"] = len(each.chain)
        described.append(entry)
    return described


def describe_test(loaded: LoadedTLS) -> list[dict[str, object]]:
    """One object per test certificate: the server ``name`` it is served for, and its facts."""
    return [
        {
            "name": cert.name,
            "subject": cert.chain[0].subject.rfc4514_string(),
            "not_after": cert.chain[0].not_valid_after_utc.isoformat(),
            "sha256": fingerprint_sha256(cert.chain[0]),
        }
        for cert in loaded.test
    ]


def test_names(loaded: LoadedTLS) -> list[str]:
    """The server names the test certificates of ``loaded`` are served for."""
    return [cert.name for cert in loaded.test]
