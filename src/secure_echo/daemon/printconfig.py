"""``--print-config``: the effective settings, where each came from, and the TLS policy."""

from __future__ import annotations

import json
import sys
from typing import IO, TYPE_CHECKING

from secure_echo.daemon.certificates import describe, describe_test
from secure_echo.daemon.settings import option_values
from secure_echo.tls.policy import (
    GROUPS,
    TLS12_CIPHERS,
    TLS13_CIPHERS,
    ClientAuth,
    TLSProfile,
    fingerprint_sha256,
)

if TYPE_CHECKING:
    from secure_echo.daemon.load import Config


def _tls_policy(cfg: Config) -> dict[str, object]:
    """The TLS policy in force, as :func:`secure_echo.tls.policy.build_context` applies it."""
    loaded = cfg.tls
    settings = loaded.settings
    modern = settings.profile is TLSProfile.MODERN
    verifying = settings.client_ca is not None and settings.client_auth is not ClientAuth.NONE
    verify = ["VERIFY_PEER"] if verifying else ["VERIFY_NONE"]
    if verifying and settings.client_auth is ClientAuth.REQUIRED:
        verify.append("VERIFY_FAIL_IF_NO_PEER_CERT")
    return {
        "profile": str(settings.profile),
        "min_version": "TLSv1.3" if modern else "TLSv1.2",
        "max_version": "TLSv1.3",
        # Under the modern profile the TLS 1.2 list is set but can never be used.
        "tls12_ciphers": [] if modern else list(TLS12_CIPHERS),
        "tls13_ciphers": list(TLS13_CIPHERS),
        "groups": list(GROUPS),
        "options": ["NO_COMPRESSION", "NO_RENEGOTIATION", "SINGLE_ECDH_USE"],
        "client_auth": str(settings.client_auth),
        "verify_mode": verify,
        "client_ca": str(settings.client_ca) if settings.client_ca else None,
        "client_ca_subjects": [ca.subject.rfc4514_string() for ca in loaded.client_cas],
        "allow_list": {
            "active": settings.allow.active,
            "cn": sorted(settings.allow.cns),
            "dns": sorted(settings.allow.dns),
            "uri": sorted(settings.allow.uris),
            "spki_sha256": sorted(settings.allow.spki_sha256),
        },
        "certificate": {
            "cert": str(settings.cert),
            "key": str(settings.key),
            "subject": loaded.subject,
            "issuer": loaded.leaf.issuer.rfc4514_string(),
            "not_before": loaded.leaf.not_valid_before_utc.isoformat(),
            "not_after": loaded.not_after.isoformat(),
            "sha256": fingerprint_sha256(loaded.leaf),
            "chain_length": len(loaded.chain),
            "development": cfg.dev_certs is not None,
        },
        # Every real certificate, the default (above) first; the others are chosen
        # by the client's server name.
        "certificates": describe(loaded, detail=True),
        "test_certificates": describe_test(loaded),
        "strict_sni": settings.strict_sni,
        "alpn": [name.decode("utf-8", "backslashreplace") for name in settings.alpn],
        "crls": [
            {
                "issuer": crl.issuer.rfc4514_string(),
                "last_update": crl.last_update_utc.isoformat(),
                "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
                "revoked": len(crl),
            }
            for crl in loaded.crls
        ],
    }


def effective_settings(cfg: Config) -> dict[str, object]:
    """What ``--print-config`` shows: every option's value and source, and the TLS policy.

    ``options`` maps each option (the ``--config`` key) to ``{"value", "source"}``,
    the source being one of :data:`secure_echo.daemon.settings.SOURCES`; ``tls`` is
    the policy in force.
    """
    return {
        "config_file": str(cfg.config_file) if cfg.config_file else None,
        "config_sha256": cfg.config_sha256,
        "options": {
            name: {"value": value, "source": cfg.sources.get(name, "default")}
            for name, value in option_values(cfg).items()
        },
        "tls": _tls_policy(cfg),
    }


def print_effective_settings(cfg: Config, out: IO[str] | None = None) -> None:
    """Write :func:`effective_settings` as JSON to ``out`` (default: stdout)."""
    stream = out or sys.stdout
    stream.write(json.dumps(effective_settings(cfg), indent=2) + "\n")
    stream.flush()
