"""Shared test helpers: certificates made at test time, never committed."""

from __future__ import annotations

import datetime
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import crypto

from secure_echo.tools import certgen

#: ``usages`` of :func:`write_server_with` that means "no extendedKeyUsage extension".
NO_EKU: tuple[x509.ObjectIdentifier, ...] | None = None


@dataclass(frozen=True)
class PKI:
    """A test CA with a server and a client certificate, plus an unrelated CA."""

    directory: Path
    ca: certgen.Issued
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path


def make_pki(directory: str | Path, *, server_names: tuple[str, ...] = ()) -> PKI:
    """Write a fresh PKI into ``directory`` (created if needed)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ca = certgen.make_ca("test CA", days=2)
    names = server_names or ("localhost", "127.0.0.1", "::1")
    server = certgen.issue_server(ca, names, days=2)
    client = certgen.issue_client(ca, "test client", days=2)
    other_ca = certgen.make_ca("other CA", days=2)
    other_client = certgen.issue_client(other_ca, "stranger", days=2)
    certgen.write_public(root / "ca.pem", ca.cert_pem())
    certgen.write_pair(server, root / "server.pem", root / "server-key.pem")
    certgen.write_pair(client, root / "client.pem", root / "client-key.pem")
    certgen.write_public(root / "other-ca.pem", other_ca.cert_pem())
    certgen.write_pair(other_client, root / "stranger.pem", root / "stranger-key.pem")
    return PKI(
        directory=root,
        ca=ca,
        ca_cert=root / "ca.pem",
        server_cert=root / "server.pem",
        server_key=root / "server-key.pem",
        client_cert=root / "client.pem",
        client_key=root / "client-key.pem",
        other_ca_cert=root / "other-ca.pem",
        other_client_cert=root / "stranger.pem",
        other_client_key=root / "stranger-key.pem",
    )


def write_expired_server(directory: Path, ca: certgen.Issued) -> tuple[Path, Path]:
    """Write a server certificate that expired yesterday; return (cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    expired = certgen.issue_server(
        ca,
        ("localhost",),
        days=-1,
        now=now,
        not_before=now - datetime.timedelta(days=10),
    )
    cert, key = directory / "expired.pem", directory / "expired-key.pem"
    certgen.write_pair(expired, cert, key)
    return cert, key


def write_v4_client(
    directory: Path, ca: certgen.Issued, name: str = "v4 client"
) -> tuple[Path, Path]:
    """Write a client certificate of X.509 version 4, signed by ``ca``; return (cert, key).

    OpenSSL verifies it; ``cryptography`` refuses to parse it (no such version):
    a certificate the daemon must handle without being able to read it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    cert = crypto.X509()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cert.set_version(3)  # the value 3 is version 4
        cert.set_serial_number(4)
        cert.get_subject().CN = name
        cert.set_issuer(crypto.X509.from_cryptography(ca.certificate).get_subject())
        cert.set_pubkey(crypto.PKey.from_cryptography_key(key))
        cert.gmtime_adj_notBefore(-60)
        cert.gmtime_adj_notAfter(86400)
        cert.sign(crypto.PKey.from_cryptography_key(ca.key), "sha256")
    cert_path, key_path = directory / "v4.pem", directory / "v4-key.pem"
    certgen.write_public(cert_path, crypto.dump_certificate(crypto.FILETYPE_PEM, cert))
    certgen.write_private(key_path, certgen.Issued(ca.certificate, key).key_pem())
    return cert_path, key_path


def write_server_with(
    directory: Path,
    ca: certgen.Issued,
    name: str,
    *,
    usages: tuple[x509.ObjectIdentifier, ...] | None = NO_EKU,
    ca_flag: bool | None = False,
) -> tuple[Path, Path]:
    """Write a localhost certificate with the given EKU and CA flag; return (cert, key).

    ``usages`` None leaves the extendedKeyUsage extension out; ``ca_flag`` None leaves
    basicConstraints out.  For checks of what a server certificate must (not) be.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    )
    if ca_flag is not None:
        constraints = x509.BasicConstraints(ca=ca_flag, path_length=None)
        builder = builder.add_extension(constraints, critical=True)
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    issued = certgen.Issued(builder.sign(ca.key, hashes.SHA256()), key)
    cert, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    certgen.write_pair(issued, cert, key_path)
    return cert, key_path


def write_named_server(
    pki: PKI, stem: str, names: tuple[str, ...], *, days: int = 2
) -> tuple[Path, Path]:
    """A server certificate for ``names`` from the test CA, as ``stem.pem`` + ``stem-key.pem``.

    Returns (cert, key).  ``days`` is its lifetime from now.
    """
    issued = certgen.issue_server(pki.ca, names, days=days)
    cert, key = pki.directory / f"{stem}.pem", pki.directory / f"{stem}-key.pem"
    certgen.write_pair(issued, cert, key)
    return cert, key


def write_test_certs(directory: Path, ca: certgen.Issued) -> Path:
    """A ``--test-certs`` directory serving an expired certificate for ``expired.localhost``.

    The certificate names ``expired.localhost``, so its expiry is the only fault a
    verifying client finds.  Returns the directory (created).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    expired = certgen.issue_server(
        ca,
        ("expired.localhost",),
        days=-1,
        now=now,
        not_before=now - datetime.timedelta(days=10),
    )
    certgen.write_pair(
        expired, directory / "expired.localhost.pem", directory / "expired.localhost.key"
    )
    return directory


def write_crl(pki: PKI, revoked: tuple[int, ...], *, name: str = "crl.pem", days: int = 2) -> Path:
    """A PEM CRL from the test CA revoking the serial numbers ``revoked``; its path.

    ``days`` is how long it stays current (negative: expired).
    """
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.certificate.subject)
        .last_update(now - datetime.timedelta(days=10))
        .next_update(now + datetime.timedelta(days=days))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - datetime.timedelta(minutes=5))
            .build()
        )
    path = pki.directory / name
    path.write_bytes(
        builder.sign(pki.ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    return path


def serial_of(path: Path) -> int:
    """The serial number of the (first) certificate in a PEM file."""
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
