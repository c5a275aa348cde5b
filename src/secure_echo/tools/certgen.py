"""Certificate issuing: a small CA that signs server and client certificates.

Used by the development-certificate bootstrap (:mod:`secure_echo.tools.devcerts`), the
``secure-echo-certs`` command and the test suite.  Everything is ECDSA P-256: it is
fast to generate, accepted by every TLS 1.2+ client, and matches the default policy.

Contract:

* Certificates carry the extensions a strict verifier expects: BasicConstraints
  (critical), KeyUsage (critical), ExtendedKeyUsage, SubjectKeyIdentifier and
  AuthorityKeyIdentifier, and SubjectAlternativeName on leaves.
* ``not_valid_before`` is backdated by five minutes so clock skew between the host
  that made a certificate and a peer does not make it "not yet valid".
* Private keys are written with mode 0600 from the start (never chmod-after-write),
  atomically, so a reader never sees half a key.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

#: Backdating of ``not_valid_before``, to tolerate clock skew between hosts.
CLOCK_SKEW = datetime.timedelta(minutes=5)
#: RFC 5280's upper bound for a common name (ub-common-name).
MAX_COMMON_NAME = 64


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """Return the certificate in PEM form."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """Return the private key in unencrypted PKCS#8 PEM form."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization is not None:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Digital signature for every key; certificate and CRL signing for a CA's."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _san(names: Iterable[str], uris: Iterable[str] = ()) -> x509.SubjectAlternativeName:
    """Build a SAN extension; IP literals become IPAddress entries, the rest DNS names."""
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    general.extend(x509.UniformResourceIdentifier(uri) for uri in uris)
    return x509.SubjectAlternativeName(general)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    validity: tuple[datetime.datetime, datetime.datetime],
    *,
    usage: x509.ObjectIdentifier | None,
) -> x509.CertificateBuilder:
    """What every certificate here has: names, key, serial, dates, constraints, usages.

    ``usage`` None makes a CA (signs leaf certificates only); else a leaf for it.
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
    )
    if usage is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(_key_usage(signs_certificates=True), critical=True)
    else:
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
    return builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)


def distinct_ca_name(base: str, *, now: datetime.datetime | None = None) -> str:
    """Return ``base`` followed by the date and a random 8-hex-digit tag.

    Two test CAs with one subject look alike in every trust-store listing and in
    chain-building (a client may try the wrong one, Firefox refuses a second issuer
    with a known name and serial), so every CA the tools make gets a name no other CA
    has: ``secure-echo test CA 2030-06-01 9f3a0c1e``.  ``base`` is shortened if the
    whole would not fit a common name (64 characters).
    """
    tag = f" {(now or _now()):%Y-%m-%d} {secrets.token_hex(4)}"
    return base[: MAX_COMMON_NAME - len(tag)] + tag


def make_ca(
    common_name: str,
    *,
    days: int = 365,
    now: datetime.datetime | None = None,
    organization: str | None = "secure-echo",
) -> Issued:
    """Create a self-signed CA certificate that may sign leaves only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = (now or _now()) - CLOCK_SKEW
    name = _name(common_name, organization)
    end = start + CLOCK_SKEW + datetime.timedelta(days=days)
    builder = _builder(name, name, key.public_key(), (start, end), usage=None)
    return Issued(builder.sign(key, hashes.SHA256()), key)


def _issue_leaf(
    ca: Issued,
    common_name: str,
    *,
    usage: x509.ObjectIdentifier,
    names: Sequence[str],
    uris: Sequence[str],
    days: int,
    now: datetime.datetime | None,
    not_before: datetime.datetime | None = None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before if not_before is not None else (now or _now()) - CLOCK_SKEW
    end = (now or _now()) + datetime.timedelta(days=days)
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = _builder(
        _name(common_name), ca.certificate.subject, key.public_key(), (start, end), usage=usage
    ).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
        critical=False,
    )
    if names or uris:
        builder = builder.add_extension(_san(names, uris), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def issue_server(
    ca: Issued,
    names: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    *,
    days: int = 90,
    now: datetime.datetime | None = None,
    not_before: datetime.datetime | None = None,
) -> Issued:
    """Issue a server certificate (EKU serverAuth) for ``names`` (DNS names or IPs)."""
    return _issue_leaf(
        ca,
        names[0] if names else "secure-echo server",
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        names=names,
        uris=(),
        days=days,
        now=now,
        not_before=not_before,
    )


def issue_client(
    ca: Issued,
    common_name: str,
    *,
    dns: Sequence[str] = (),
    uris: Sequence[str] = (),
    days: int = 90,
    now: datetime.datetime | None = None,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> Issued:
    """Issue a client certificate (EKU clientAuth unless ``usage`` says otherwise)."""
    return _issue_leaf(ca, common_name, usage=usage, names=dns, uris=uris, days=days, now=now)


def make_self_signed_server(
    names: Sequence[str], *, days: int = 90, now: datetime.datetime | None = None
) -> Issued:
    """Make a server certificate for ``names`` that is signed by its own key.

    It is shaped like an ordinary leaf (CA:FALSE, serverAuth, the names as SANs, the
    first as common name) so that the only thing a verifying client can object to is
    that no CA issued it: OpenSSL reports ``self-signed certificate`` (verify error 18).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    start = (now or _now()) - CLOCK_SKEW
    name = _name(names[0] if names else "secure-echo server")
    end = start + CLOCK_SKEW + datetime.timedelta(days=days)
    server = ExtendedKeyUsageOID.SERVER_AUTH
    builder = _builder(name, name, key.public_key(), (start, end), usage=server)
    return Issued(
        builder.add_extension(_san(names), critical=False).sign(key, hashes.SHA256()), key
    )


def load_issued(cert_pem: bytes, key_pem: bytes) -> Issued:
    """Parse a PEM certificate and its unencrypted PEM private key into an :class:`Issued`.

    Raises :class:`ValueError` naming the problem if either does not parse, the key
    is not an EC private key, or the key does not belong to the certificate.
    """
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as error:
        raise ValueError(f"not a PEM certificate ({error})") from error
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not an unencrypted PEM private key ({error})") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the private key is not an EC key")  # noqa: TRY004 - bad content, not a caller bug
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != certificate.public_key().public_bytes(
        der, spki
    ):
        raise ValueError("the private key does not match the certificate")
    return Issued(certificate, key)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 from creation on."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        if os.path.exists(tmp):  # noqa: PTH110 - tmp is a str from mkstemp
            os.unlink(tmp)  # noqa: PTH108
        raise


def write_public(path: Path, data: bytes) -> None:
    """Write public material (a certificate) atomically, mode 0644."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        if os.path.exists(tmp):  # noqa: PTH110
            os.unlink(tmp)  # noqa: PTH108
        raise


def write_pair(issued: Issued, cert_path: Path, key_path: Path) -> None:
    """Write a certificate (0644) and its key (0600)."""
    write_private(key_path, issued.key_pem())
    write_public(cert_path, issued.cert_pem())
