"""Loading the whole TLS set: every certificate, the test certificates, the CRLs.

:func:`load_tls` reads and checks all of a :class:`~secure_echo.tls.policy.TLSSettings`
at once, so that start-up and reload accept or refuse it as a whole: the default
certificate and each further ``--cert`` with the checks of
:func:`~secure_echo.tls.policy.load_and_validate`; the ``--crl`` files; and the
certificates of ``--test-certs``, which are served as they are (expired,
self-signed, for another name: that is their point), so only their being a
certificate and its matching key is checked.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from secure_echo.tls.policy import (
    SUPPORTED_KEYS,
    LoadedTLS,
    TestCert,
    TLSConfigError,
    TLSSettings,
    load_and_validate,
    read_file,
)

if TYPE_CHECKING:
    from pathlib import Path

_CRL_BLOCK: Final = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def load_tls(settings: TLSSettings, now: datetime.datetime | None = None) -> LoadedTLS:
    """Read and check every file ``settings`` names; raise :class:`TLSConfigError`."""
    when = now or datetime.datetime.now(datetime.UTC)
    loaded = load_and_validate(settings, when)
    single = replace(settings, extra_certs=(), test_certs=None, crls=())
    extra = tuple(
        load_and_validate(replace(single, cert=cert, key=key), when)
        for cert, key in settings.extra_certs
    )
    test = load_test_certs(settings.test_certs) if settings.test_certs is not None else ()
    crls = tuple(crl for path in settings.crls for crl in load_crls(path, when))
    return replace(loaded, extra=extra, test=test, crls=crls)


def load_crls(path: Path, now: datetime.datetime) -> tuple[x509.CertificateRevocationList, ...]:
    """The revocation lists in a PEM file; an expired one is refused.

    OpenSSL fails every client certificate checked against an expired list
    (``CRL has expired``), so serving with one would refuse everybody.
    """
    data = read_file(path, "--crl", "PEM CRL file")
    crls: list[x509.CertificateRevocationList] = []
    for block in _CRL_BLOCK.findall(data):
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError as error:
            raise TLSConfigError(
                "--crl", f"{path} holds a CRL that cannot be read ({error})", "fetch it again"
            ) from None
    if not crls:
        raise TLSConfigError(
            "--crl",
            f"{path} holds no PEM CRL",
            "point --crl at a PEM file starting with -----BEGIN X509 CRL-----",
        )
    for crl in crls:
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now:
            raise TLSConfigError(
                "--crl",
                f"the CRL in {path} from {crl.issuer.rfc4514_string()} expired on "
                f"{next_update:%Y-%m-%d %H:%M} UTC",
                "fetch a current one from its CA",
            )
    return tuple(crls)


def load_test_certs(directory: Path) -> tuple[TestCert, ...]:
    """Every ``NAME.pem`` with a ``NAME.key`` in ``directory``, served for SNI ``NAME``."""
    fix = "point --test-certs at a directory of NAME.pem and NAME.key files"
    if not directory.is_dir():
        raise TLSConfigError("--test-certs", f"{directory} is not a directory", fix)
    found: list[TestCert] = []
    for pem in sorted(directory.glob("*.pem")):
        key_path = pem.with_suffix(".key")
        if not key_path.is_file():
            continue  # a CA certificate, say: nothing to serve
        try:
            chain = tuple(
                x509.load_pem_x509_certificates(read_file(pem, "--test-certs", "PEM file"))
            )
        except ValueError:
            chain = ()
        if not chain:
            raise TLSConfigError("--test-certs", f"{pem} holds no PEM certificate", fix)
        key_pem = read_file(key_path, "--test-certs", "PEM key file")
        try:
            key = serialization.load_pem_private_key(key_pem, None)
        except (TypeError, ValueError):
            raise TLSConfigError(
                "--test-certs", f"{key_path} holds no unencrypted PEM private key", fix
            ) from None
        if not isinstance(key, SUPPORTED_KEYS):
            raise TLSConfigError(
                "--test-certs",
                f"{key_path} holds a {type(key).__name__}, not an RSA, EC or EdDSA key",
                "use an ECDSA P-256 or RSA key",
            )
        if key.public_key() != chain[0].public_key():
            raise TLSConfigError(
                "--test-certs", f"{key_path} is not the key of {pem}", "give each its own key"
            )
        found.append(TestCert(pem.stem, chain, key_pem))
    if not found:
        raise TLSConfigError("--test-certs", f"{directory} holds no NAME.pem + NAME.key pair", fix)
    return tuple(found)
