"""Tests for :mod:`secure_echo.tools.certgen`: extensions, chains, and how files are written."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tools import certgen

NOW = datetime.datetime(2030, 6, 1, 12, 0, tzinfo=datetime.UTC)


def _verify_server(
    ca: certgen.Issued,
    leaf: certgen.Issued,
    name: x509.DNSName | x509.IPAddress,
    at: datetime.datetime = NOW,
) -> list[x509.Certificate]:
    verifier = PolicyBuilder().store(Store([ca.certificate])).time(at).build_server_verifier(name)
    return verifier.verify(leaf.certificate, [])


def _ip(text: str) -> x509.IPAddress:
    return x509.IPAddress(ipaddress.ip_address(text))


class CATests(SynchronousTestCase):
    """The CA certificate."""

    def setUp(self) -> None:
        self.ca = certgen.make_ca("test CA", days=10, now=NOW)

    def test_basic_constraints(self) -> None:
        """The CA is a critical CA:TRUE with path length 0: it signs leaves only."""
        ext = self.ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(ext.critical)
        self.assertTrue(ext.value.ca)
        self.assertEqual(ext.value.path_length, 0)

    def test_key_usage(self) -> None:
        """The CA's critical key usage allows signing certificates and CRLs."""
        ext = self.ca.certificate.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(ext.critical)
        self.assertTrue(ext.value.key_cert_sign)
        self.assertTrue(ext.value.crl_sign)

    def test_self_signed_with_subject_key_identifier(self) -> None:
        """The CA is self-issued, self-signed and carries a subject key identifier."""
        cert = self.ca.certificate
        self.assertEqual(cert.subject, cert.issuer)
        cert.verify_directly_issued_by(cert)
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    def test_validity(self) -> None:
        """The CA starts five minutes before ``now`` and lasts ``days`` from ``now``."""
        cert = self.ca.certificate
        self.assertEqual(cert.not_valid_before_utc, NOW - certgen.CLOCK_SKEW)
        self.assertEqual(cert.not_valid_after_utc, NOW + datetime.timedelta(days=10))

    def test_p256(self) -> None:
        """The CA key is ECDSA P-256."""
        self.assertIsInstance(self.ca.key.curve, ec.SECP256R1)


class ServerCertificateTests(SynchronousTestCase):
    """Server certificates: names, usages, and verification by a strict verifier."""

    def setUp(self) -> None:
        self.ca = certgen.make_ca("test CA", days=10, now=NOW)
        self.server = certgen.issue_server(self.ca, days=5, now=NOW)

    def test_default_names(self) -> None:
        """By default the SAN holds DNS localhost and IP addresses 127.0.0.1 and ::1."""
        san = self.server.certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

    def test_common_name_is_first_name(self) -> None:
        """The subject CN is the first name given."""
        server = certgen.issue_server(self.ca, ("echo.example.test", "10.0.0.1"), now=NOW)
        cn = server.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual([attribute.value for attribute in cn], ["echo.example.test"])

    def test_extended_key_usage(self) -> None:
        """A server certificate is for serverAuth only."""
        eku = self.server.certificate.extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        ).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])

    def test_key_usage(self) -> None:
        """A leaf's critical key usage is digitalSignature only; it cannot sign certificates."""
        ext = self.server.certificate.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(ext.critical)
        self.assertTrue(ext.value.digital_signature)
        self.assertFalse(ext.value.key_cert_sign)
        self.assertFalse(ext.value.crl_sign)
        self.assertFalse(ext.value.key_encipherment)

    def test_not_a_ca(self) -> None:
        """A leaf carries a critical CA:FALSE."""
        ext = self.server.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(ext.critical)
        self.assertFalse(ext.value.ca)

    def test_authority_key_identifier(self) -> None:
        """The leaf's authority key identifier is the CA's subject key identifier."""
        aki = self.server.certificate.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier
        ).value
        ski = self.ca.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        self.assertEqual(aki.key_identifier, ski.digest)

    def test_validity(self) -> None:
        """A leaf starts five minutes before ``now`` and ends ``days`` after it."""
        cert = self.server.certificate
        self.assertEqual(cert.not_valid_before_utc, NOW - certgen.CLOCK_SKEW)
        self.assertEqual(cert.not_valid_after_utc, NOW + datetime.timedelta(days=5))

    def test_chain_verifies_for_every_name(self) -> None:
        """A strict verifier builds leaf -> CA for localhost, 127.0.0.1 and ::1."""
        for name in (x509.DNSName("localhost"), _ip("127.0.0.1"), _ip("::1")):
            chain = _verify_server(self.ca, self.server, name)
            self.assertEqual(chain, [self.server.certificate, self.ca.certificate])

    def test_chain_rejects_other_name(self) -> None:
        """Verification for a name the certificate does not carry fails."""
        self.assertRaises(
            VerificationError,
            _verify_server,
            self.ca,
            self.server,
            x509.DNSName("example.com"),
        )

    def test_chain_rejects_other_ca(self) -> None:
        """A certificate does not verify against an unrelated CA."""
        other = certgen.make_ca("other CA", days=10, now=NOW)
        self.assertRaises(
            VerificationError, _verify_server, other, self.server, x509.DNSName("localhost")
        )

    def test_chain_rejects_expired(self) -> None:
        """A certificate does not verify after it has expired."""
        later = NOW + datetime.timedelta(days=6)
        self.assertRaises(
            VerificationError,
            _verify_server,
            self.ca,
            self.server,
            x509.DNSName("localhost"),
            later,
        )

    def test_backdating_tolerates_skew(self) -> None:
        """A peer whose clock is up to five minutes behind already accepts the certificate."""
        behind = NOW - datetime.timedelta(minutes=4)
        _verify_server(self.ca, self.server, x509.DNSName("localhost"), behind)

    def test_explicit_not_before(self) -> None:
        """``not_before`` overrides the backdated start."""
        start = NOW - datetime.timedelta(days=3)
        server = certgen.issue_server(self.ca, days=1, now=NOW, not_before=start)
        self.assertEqual(server.certificate.not_valid_before_utc, start)


class ClientCertificateTests(SynchronousTestCase):
    """Client certificates."""

    def setUp(self) -> None:
        self.ca = certgen.make_ca("test CA", days=10, now=NOW)

    def test_extended_key_usage(self) -> None:
        """A client certificate is for clientAuth only."""
        client = certgen.issue_client(self.ca, "alice", now=NOW)
        eku = client.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])

    def test_names(self) -> None:
        """The CN, DNS names and URIs given end up in the subject and the SAN."""
        client = certgen.issue_client(
            self.ca,
            "alice",
            dns=["alice.example.test"],
            uris=["spiffe://example.test/alice"],
            now=NOW,
        )
        cert = client.certificate
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "alice")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["alice.example.test"])
        self.assertEqual(
            san.get_values_for_type(x509.UniformResourceIdentifier),
            ["spiffe://example.test/alice"],
        )

    def test_no_names_no_san(self) -> None:
        """Without DNS names or URIs a client certificate has no SAN extension."""
        client = certgen.issue_client(self.ca, "alice", now=NOW)
        self.assertRaises(
            x509.ExtensionNotFound,
            client.certificate.extensions.get_extension_for_class,
            x509.SubjectAlternativeName,
        )

    def test_client_verifier_accepts(self) -> None:
        """A strict client verifier accepts it and reports its SAN subjects."""
        client = certgen.issue_client(
            self.ca, "alice", uris=["spiffe://example.test/alice"], now=NOW
        )
        verifier = PolicyBuilder().store(Store([self.ca.certificate])).time(NOW)
        verified = verifier.build_client_verifier().verify(client.certificate, [])
        self.assertEqual(
            verified.subjects, [x509.UniformResourceIdentifier("spiffe://example.test/alice")]
        )

    def test_not_a_server_certificate(self) -> None:
        """A client certificate does not pass server verification (wrong EKU)."""
        client = certgen.issue_client(self.ca, "localhost", dns=["localhost"], now=NOW)
        self.assertRaises(
            VerificationError, _verify_server, self.ca, client, x509.DNSName("localhost")
        )


class LoadIssuedTests(SynchronousTestCase):
    """Parsing a certificate and key back."""

    def setUp(self) -> None:
        self.ca = certgen.make_ca("test CA", days=10, now=NOW)
        self.server = certgen.issue_server(self.ca, now=NOW)

    def test_round_trip(self) -> None:
        """What ``cert_pem``/``key_pem`` wrote loads back as the same certificate and key."""
        loaded = certgen.load_issued(self.server.cert_pem(), self.server.key_pem())
        self.assertEqual(loaded.certificate, self.server.certificate)
        self.assertEqual(loaded.key_pem(), self.server.key_pem())

    def test_mismatched_key(self) -> None:
        """A key that is not the certificate's is a ValueError saying so."""
        error = self.assertRaises(
            ValueError, certgen.load_issued, self.server.cert_pem(), self.ca.key_pem()
        )
        self.assertIn("does not match", str(error))

    def test_garbage(self) -> None:
        """Bytes that are not PEM are a ValueError, for the certificate and for the key."""
        self.assertRaises(ValueError, certgen.load_issued, b"junk", self.server.key_pem())
        self.assertRaises(ValueError, certgen.load_issued, self.server.cert_pem(), b"junk")

    def test_not_ec(self) -> None:
        """An RSA key is a ValueError: every certificate here is EC."""
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        error = self.assertRaises(ValueError, certgen.load_issued, self.server.cert_pem(), pem)
        self.assertIn("not an EC key", str(error))


class WriteTests(SynchronousTestCase):
    """Writing keys and certificates to disk."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        old = os.umask(0)  # the most permissive umask: modes must not depend on it
        self.addCleanup(os.umask, old)

    def _mode(self, path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    def test_private_mode(self) -> None:
        """A private file is 0600 whatever the umask."""
        path = self.directory / "key.pem"
        certgen.write_private(path, b"secret")
        self.assertEqual(self._mode(path), 0o600)
        self.assertEqual(path.read_bytes(), b"secret")

    def test_private_replaces_lax_file(self) -> None:
        """Writing over a world-readable file leaves a 0600 file, not the old mode."""
        path = self.directory / "key.pem"
        path.write_bytes(b"old")
        path.chmod(0o644)
        certgen.write_private(path, b"new")
        self.assertEqual(self._mode(path), 0o600)
        self.assertEqual(path.read_bytes(), b"new")

    def test_public_mode(self) -> None:
        """A public file is 0644 whatever the umask."""
        path = self.directory / "cert.pem"
        certgen.write_public(path, b"cert")
        self.assertEqual(self._mode(path), 0o644)

    def test_pair(self) -> None:
        """``write_pair`` writes the certificate 0644 and the key 0600, loadable together."""
        ca = certgen.make_ca("test CA", now=NOW)
        cert, key = self.directory / "ca.pem", self.directory / "ca-key.pem"
        certgen.write_pair(ca, cert, key)
        self.assertEqual((self._mode(cert), self._mode(key)), (0o644, 0o600))
        loaded = certgen.load_issued(cert.read_bytes(), key.read_bytes())
        self.assertEqual(loaded.certificate, ca.certificate)

    def test_atomic_replace(self) -> None:
        """The file is replaced by a rename: a reader holding the old file keeps the old bytes."""
        for write in (certgen.write_private, certgen.write_public):
            path = self.directory / "file.pem"
            certgen.write_public(path, b"old")
            with path.open("rb") as reader:
                write(path, b"new")
                self.assertEqual(reader.read(), b"old")
            self.assertEqual(path.read_bytes(), b"new")
            self.assertEqual(sorted(p.name for p in self.directory.iterdir()), ["file.pem"])

    def test_failure_keeps_old_file_and_cleans_up(self) -> None:
        """If the final rename fails the old file is intact and no temporary file is left."""

        def fail(*_: object) -> Path:
            raise OSError(28, "No space left on device")

        self.patch(Path, "replace", fail)
        for write in (certgen.write_private, certgen.write_public):
            path = self.directory / "file.pem"
            path.write_bytes(b"old")
            self.assertRaises(OSError, write, path, b"new")
            self.assertEqual(path.read_bytes(), b"old")
            self.assertEqual(sorted(p.name for p in self.directory.iterdir()), ["file.pem"])


class DistinctCANameTests(SynchronousTestCase):
    """CA names that tell two CAs apart."""

    def test_two_names_differ(self) -> None:
        """Two CAs made from one base name, even at the same moment, get different names."""
        names = {certgen.distinct_ca_name("secure-echo test CA", now=NOW) for _ in range(50)}
        self.assertEqual(len(names), 50)

    def test_shape(self) -> None:
        """The name is the base, the date it was made and a random hex tag."""
        name = certgen.distinct_ca_name("secure-echo test CA", now=NOW)
        base, date, tag = name.rsplit(" ", 2)
        self.assertEqual((base, date), ("secure-echo test CA", "2030-06-01"))
        self.assertRegex(tag, r"\A[0-9a-f]{8}\Z")

    def test_fits_a_common_name(self) -> None:
        """A long base is shortened so the whole name stays within 64 characters."""
        name = certgen.distinct_ca_name("x" * 100, now=NOW)
        self.assertEqual(len(name), 64)
        self.assertTrue(name.startswith("x" * 40))
        ca = certgen.make_ca(name, now=NOW)
        common = ca.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual(common[0].value, name)


class SelfSignedServerTests(SynchronousTestCase):
    """A self-signed server certificate: a leaf that is its own issuer."""

    def setUp(self) -> None:
        self.leaf = certgen.make_self_signed_server(["self.test"], days=3, now=NOW)

    def test_self_issued_leaf(self) -> None:
        """Subject and issuer are the name; it verifies under its own key; it is no CA."""
        cert = self.leaf.certificate
        self.assertEqual(cert.subject, cert.issuer)
        cert.verify_directly_issued_by(cert)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertFalse(constraints.value.ca)
        common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual(common[0].value, "self.test")

    def test_server_usage_names_and_validity(self) -> None:
        """It names the host, is for serverAuth and is valid from now for ``days``."""
        cert = self.leaf.certificate
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["self.test"])
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertEqual(cert.not_valid_before_utc, NOW - certgen.CLOCK_SKEW)
        self.assertEqual(cert.not_valid_after_utc, NOW + datetime.timedelta(days=3))

    def test_refused_by_a_verifier_that_does_not_trust_it(self) -> None:
        """A verifier that trusts another CA refuses it."""
        other = certgen.make_ca("test CA", days=10, now=NOW)
        self.assertRaises(
            VerificationError, _verify_server, other, self.leaf, x509.DNSName("self.test")
        )
