"""Tests for certificates chosen by SNI, test certificates, ALPN and CRLs."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls.material import load_tls
from secure_echo.tls.policy import ClientAuth, ContextHolder, TLSConfigError, TLSSettings
from secure_echo.tls.sni import Chooser, matches, normal_name
from secure_echo.tools import certgen
from tests.helpers import make_pki, write_crl, write_expired_server
from tests.tlspair import TLSPair, capture_events, client_context, named, server_factory

if TYPE_CHECKING:
    from pathlib import Path

    from tests.helpers import PKI


def write_server(pki: PKI, stem: str, names: tuple[str, ...]) -> tuple[Path, Path]:
    """A server certificate for ``names`` from the test CA; return (cert, key)."""
    issued = certgen.issue_server(pki.ca, names, days=2)
    cert, key = pki.directory / f"{stem}.pem", pki.directory / f"{stem}-key.pem"
    certgen.write_pair(issued, cert, key)
    return cert, key


def served_names(pair: TLSPair) -> list[str]:
    """The DNS names of the certificate the server presented to ``pair``'s client."""
    der = pair.client.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


class MatchTests(SynchronousTestCase):
    """Name matching."""

    def test_exact_and_wildcard(self) -> None:
        """Exact names match exactly; a wildcard matches one label, not zero or two."""
        self.assertTrue(matches("a.example", "a.example"))
        self.assertFalse(matches("b.example", "a.example"))
        self.assertTrue(matches("x.wild.example", "*.wild.example"))
        self.assertFalse(matches("wild.example", "*.wild.example"))
        self.assertFalse(matches("y.x.wild.example", "*.wild.example"))
        self.assertFalse(matches(".wild.example", "*.wild.example"))

    def test_normal_name(self) -> None:
        """Case and a trailing dot do not matter."""
        self.assertEqual(normal_name(b"Other.Example."), "other.example")

    def test_chooser_order(self) -> None:
        """A test certificate wins over an exact name, which wins over a wildcard."""
        first, second, third = object(), object(), object()
        chooser = Chooser(
            [(["a.example", "*.w.example"], first), (["x.w.example"], second)],  # type: ignore[list-item]
            [("a.example", third)],  # type: ignore[list-item]
        )
        self.assertIs(chooser.choose(b"a.example"), third)
        self.assertIs(chooser.choose(b"x.w.example"), second)
        self.assertIs(chooser.choose(b"y.w.example"), first)
        self.assertIsNone(chooser.choose(b"nothing.example"))
        self.assertIsNone(chooser.choose(None))
        chooser.strict = True
        self.assertIs(chooser.choose(b"nothing.example"), False)
        self.assertIsNone(chooser.choose(None), "no name at all is the default, even strict")


class ChoiceTests(SynchronousTestCase):
    """Real handshakes against several certificates."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)
        self.other = write_server(self.pki, "other", ("other.example",))
        self.wild = write_server(self.pki, "wild", ("*.wild.example",))

    def settings(self, **kwargs: Any) -> TLSSettings:
        return TLSSettings(
            self.pki.server_cert,
            self.pki.server_key,
            extra_certs=(self.other, self.wild),
            **kwargs,
        )

    def connect(self, name: str | None, **kwargs: Any) -> TLSPair:
        holder = ContextHolder(load_tls(self.settings(**kwargs)))
        factory = server_factory(self.pki, self.clock, contexts=holder)
        context = client_context(self.pki)
        if name is None:
            context.check_hostname = False
        pair = TLSPair(factory, context, server_hostname=name)
        pair.handshake()
        return pair

    def test_exact_name(self) -> None:
        """A client asking for other.example gets that certificate, verified."""
        self.assertEqual(served_names(self.connect("other.example")), ["other.example"])

    def test_wildcard(self) -> None:
        """A one-label wildcard serves any name under it."""
        self.assertEqual(served_names(self.connect("a.wild.example")), ["*.wild.example"])

    def test_default_for_no_match_and_no_name(self) -> None:
        """An unknown name, and no name at all, get the first certificate."""
        self.assertIn("localhost", served_names(self.connect("localhost")))
        self.assertIn("localhost", served_names(self.connect(None)))

    def test_strict_refuses_unknown_name(self) -> None:
        """With strict SNI, a name no certificate carries is refused: unrecognized_name."""
        with self.assertRaises(ssl.SSLError) as raised:
            self.connect("nowhere.example", strict_sni=True)
        self.assertIn("unrecognized name", str(raised.exception).lower())
        (failed,) = named(self.events, "handshake_failed")
        self.assertIn("nowhere.example", failed["reason"])

    def test_strict_still_serves_no_name(self) -> None:
        """Strict SNI leaves clients that send no name to the default certificate."""
        self.assertIn("localhost", served_names(self.connect(None, strict_sni=True)))


class TestCertificateTests(SynchronousTestCase):
    """--test-certs: served as they are, for exactly their name."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()

    def test_expired_served_for_its_name(self) -> None:
        """An expired test certificate is served to its name; a verifier refuses it."""
        directory = self.pki.directory / "test-certs"
        directory.mkdir()
        cert, key = write_expired_server(self.pki.directory, self.pki.ca)
        (directory / "expired.localhost.pem").write_bytes(cert.read_bytes())
        (directory / "expired.localhost.key").write_bytes(key.read_bytes())
        settings = TLSSettings(self.pki.server_cert, self.pki.server_key, test_certs=directory)
        holder = ContextHolder(load_tls(settings))
        factory = server_factory(self.pki, self.clock, contexts=holder)
        pair = TLSPair(factory, client_context(self.pki), server_hostname="expired.localhost")
        with self.assertRaises(ssl.SSLCertVerificationError) as raised:
            pair.handshake()
        self.assertIn("expired", str(raised.exception))
        fine = TLSPair(factory, client_context(self.pki), server_hostname="localhost")
        fine.handshake()

    def test_directory_without_pairs_refused(self) -> None:
        """A directory without a NAME.pem + NAME.key pair is a config error."""
        directory = self.pki.directory / "empty"
        directory.mkdir()
        settings = TLSSettings(self.pki.server_cert, self.pki.server_key, test_certs=directory)
        error = self.assertRaises(TLSConfigError, load_tls, settings)
        self.assertEqual(error.option, "--test-certs")

    def test_mismatched_key_refused(self) -> None:
        """A NAME.key that is not NAME.pem's key is a config error naming the file."""
        directory = self.pki.directory / "bad"
        directory.mkdir()
        (directory / "x.pem").write_bytes(self.pki.server_cert.read_bytes())
        (directory / "x.key").write_bytes(self.pki.client_key.read_bytes())
        settings = TLSSettings(self.pki.server_cert, self.pki.server_key, test_certs=directory)
        error = self.assertRaises(TLSConfigError, load_tls, settings)
        self.assertIn("x.key", str(error))

    def test_not_a_certificate_refused(self) -> None:
        """A NAME.pem without a certificate is a one-line config error, not a crash."""
        directory = self.pki.directory / "notcert"
        directory.mkdir()
        (directory / "x.pem").write_bytes(b"not a certificate\n")
        (directory / "x.key").write_bytes(self.pki.server_key.read_bytes())
        settings = TLSSettings(self.pki.server_cert, self.pki.server_key, test_certs=directory)
        error = self.assertRaises(TLSConfigError, load_tls, settings)
        self.assertIn("holds no PEM certificate", str(error))

    def test_unsupported_key_refused(self) -> None:
        """A NAME.key of a kind OpenSSL cannot serve with (DSA) is a one-line config error."""
        directory = self.pki.directory / "dsa"
        directory.mkdir()
        key = dsa.generate_private_key(2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsa.test")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        (directory / "dsa.test.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / "dsa.test.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        settings = TLSSettings(self.pki.server_cert, self.pki.server_key, test_certs=directory)
        error = self.assertRaises(TLSConfigError, load_tls, settings)
        self.assertIn("DSAPrivateKey", str(error))


class ALPNTests(SynchronousTestCase):
    """--alpn: the server's first protocol that the client offers."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)

    def negotiate(self, offered: list[str], ours: tuple[bytes, ...]) -> str | None:
        settings = TLSSettings(self.pki.server_cert, self.pki.server_key, alpn=ours)
        factory = server_factory(self.pki, self.clock, settings=settings)
        context = client_context(self.pki)
        context.set_alpn_protocols(offered)
        pair = TLSPair(factory, context)
        pair.handshake()
        return pair.client.selected_alpn_protocol()

    def test_server_preference(self) -> None:
        """The server's order wins over the client's."""
        self.assertEqual(self.negotiate(["http/1.1", "h2"], (b"h2", b"http/1.1")), "h2")

    def test_no_overlap_completes_without(self) -> None:
        """With nothing in common, the handshake completes without ALPN."""
        self.assertIsNone(self.negotiate(["foo"], (b"h2",)))

    def test_without_alpn_option(self) -> None:
        """Without --alpn, a client's offer is answered with none."""
        self.assertIsNone(self.negotiate(["h2"], ()))


class CRLTests(SynchronousTestCase):
    """--crl: revoked client certificates are refused with certificate_revoked."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)
        self.client = x509.load_pem_x509_certificate(self.pki.client_cert.read_bytes())

    def pair(self, crl: Path) -> TLSPair:
        settings = TLSSettings(
            self.pki.server_cert,
            self.pki.server_key,
            self.pki.ca_cert,
            ClientAuth.REQUIRED,
            crls=(crl,),
        )
        holder = ContextHolder(load_tls(settings))
        factory = server_factory(self.pki, self.clock, contexts=holder)
        return TLSPair(
            factory,
            client_context(self.pki, cert=self.pki.client_cert, key=self.pki.client_key),
        )

    def test_revoked_refused(self) -> None:
        """A revoked certificate is refused; the client hears certificate_revoked."""
        pair = self.pair(write_crl(self.pki, (self.client.serial_number,), name="crl-1-2.pem"))
        told = ""
        try:
            pair.handshake()
            pair.send(b"x\n")
            pair.pump()
        except ssl.SSLError as error:
            told = str(error).lower()
        self.assertIn("certificate revoked", told)
        self.assertEqual(pair.received, b"")
        (failed,) = named(self.events, "handshake_failed")
        self.assertIn("revoked", failed["reason"])

    def test_not_revoked_served(self) -> None:
        """A certificate not on the list is served."""
        pair = self.pair(write_crl(self.pki, (self.client.serial_number + 1,), name="crl-1-2.pem"))
        pair.handshake()
        pair.send(b"ok\n")
        pair.pump()
        self.assertEqual(pair.received, b"ok\n")

    def test_expired_crl_refused_at_load(self) -> None:
        """An expired CRL would refuse everybody: it stops start-up and reload."""
        path = write_crl(self.pki, (), name="crl-0--1.pem", days=-1)
        settings = TLSSettings(
            self.pki.server_cert, self.pki.server_key, self.pki.ca_cert, ClientAuth.REQUIRED
        )
        error = self.assertRaises(TLSConfigError, load_tls, replace(settings, crls=(path,)))
        self.assertIn("expired", str(error))

    def test_not_a_crl(self) -> None:
        """A file without a PEM CRL is a config error."""
        settings = TLSSettings(
            self.pki.server_cert,
            self.pki.server_key,
            self.pki.ca_cert,
            ClientAuth.REQUIRED,
            crls=(self.pki.ca_cert,),
        )
        error = self.assertRaises(TLSConfigError, load_tls, settings)
        self.assertIn("holds no PEM CRL", str(error))
