"""Mutual TLS with allow-lists, through real in-memory handshakes."""

from __future__ import annotations

import datetime
import ssl
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls.allowlist import AllowList, spki_sha256
from secure_echo.tls.policy import (
    ClientAuth,
    TLSSettings,
    fingerprint_sha256,
    load_and_validate,
)
from secure_echo.tools import certgen
from tests.helpers import make_pki, write_v4_client
from tests.tlspair import TLSPair, capture_events, client_context, named, server_factory

if TYPE_CHECKING:
    from pathlib import Path

    from secure_echo.tls.factory import TLSServerFactory

SPIFFE_WEB = "spiffe://example.org/ns/prod/sa/web"


class AllowListHandshakeTests(SynchronousTestCase):
    """Only verified client certificates on the allow-list complete the handshake."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)

    def settings(self, allow: AllowList) -> TLSSettings:
        return TLSSettings(
            self.pki.server_cert,
            self.pki.server_key,
            self.pki.ca_cert,
            ClientAuth.REQUIRED,
            allow=allow,
        )

    def factory(self, allow: AllowList) -> TLSServerFactory:
        return server_factory(self.pki, self.clock, settings=self.settings(allow))

    def client(self, name: str, **kwargs: Any) -> tuple[Path, Path]:
        """Issue a client certificate from the test CA; return (cert, key) paths."""
        issued = certgen.issue_client(self.pki.ca, name, days=kwargs.pop("days", 2), **kwargs)
        cert = self.pki.directory / f"{name}.pem"
        key = self.pki.directory / f"{name}-key.pem"
        certgen.write_pair(issued, cert, key)
        return cert, key

    def pair(self, factory: TLSServerFactory, cert: Path, key: Path) -> TLSPair:
        return TLSPair(factory, client_context(self.pki, cert=cert, key=key))

    def of(self, pair: TLSPair, name: str) -> list[dict[str, Any]]:
        """The events called ``name`` about ``pair``'s connection."""
        return [e for e in named(self.events, name) if e["conn_id"] == pair.server.conn_id]

    def assert_echoes(self, pair: TLSPair) -> None:
        pair.handshake()
        pair.send(b"hello\n")
        pair.pump()
        self.assertEqual(pair.received, b"hello\n")
        self.assertEqual(self.of(pair, "handshake_failed"), [])

    def assert_refused(self, pair: TLSPair, alert: str | None = None) -> str:
        """The handshake fails, nothing is echoed; return the logged reason.

        ``alert``: the TLS alert the client must have received (its words in
        OpenSSL's error text, e.g. ``bad certificate``).
        """
        # TLS 1.3: the client finishes its side before the server checks its
        # certificate, so the refusal shows on the client's next read.
        told = ""
        try:
            pair.handshake()
            pair.send(b"hello\n")
            pair.pump()
        except ssl.SSLError as error:
            told = str(error).lower()
        if alert is not None:
            self.assertIn(f"alert {alert}", told)
        self.assertNotIn("internal error", told)
        self.assertEqual(pair.received, b"")
        self.assertTrue(pair.transport.disconnecting)
        pair.finish_stream()
        (failed,) = self.of(pair, "handshake_failed")
        (closed,) = self.of(pair, "connection_closed")
        self.assertEqual(closed["close_reason"], "handshake_failed")
        self.assertEqual(closed["tls_error"], failed["reason"])
        return str(failed["reason"])

    def test_listed_cn_passes(self) -> None:
        """A client whose CN is listed completes the handshake and is echoed."""
        factory = self.factory(AllowList.build(cns=["test client"]))
        self.assert_echoes(self.pair(factory, self.pki.client_cert, self.pki.client_key))

    def test_unlisted_cn_refused(self) -> None:
        """A verified client not on the allow-list is refused with bad_certificate.

        The client is told why (the alert), never internal_error, and both records
        name the certificate it presented.
        """
        factory = self.factory(AllowList.build(cns=["someone else"]))
        pair = self.pair(factory, self.pki.client_cert, self.pki.client_key)
        reason = self.assert_refused(pair, alert="bad certificate")
        self.assertIn("not on the allow-list", reason)
        self.assertIn("CN=test client", reason)
        self.assert_presented(pair, self.pki.client_cert)

    def assert_presented(self, pair: TLSPair, cert: Path) -> None:
        """handshake_failed and connection_closed name ``cert``: subject, issuer, SHA-256."""
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        expected = {
            "client_cert_subject": leaf.subject.rfc4514_string(),
            "client_cert_issuer": leaf.issuer.rfc4514_string(),
            "client_cert_sha256": fingerprint_sha256(leaf),
        }
        for name in ("handshake_failed", "connection_closed"):
            (event,) = self.of(pair, name)
            self.assertEqual({key: event[key] for key in expected}, expected, name)

    def test_spiffe_uri_passes(self) -> None:
        """A client whose URI subjectAltName is a listed SPIFFE ID passes."""
        cert, key = self.client("web", uris=[SPIFFE_WEB])
        factory = self.factory(AllowList.build(uris=[SPIFFE_WEB]))
        self.assert_echoes(self.pair(factory, cert, key))

    def test_spiffe_uri_other_refused(self) -> None:
        """A client with a different SPIFFE ID is refused."""
        cert, key = self.client("db", uris=["spiffe://example.org/ns/prod/sa/db"])
        factory = self.factory(AllowList.build(uris=[SPIFFE_WEB]))
        self.assertIn("not on the allow-list", self.assert_refused(self.pair(factory, cert, key)))

    def test_spki_pin_passes(self) -> None:
        """A client whose key's SPKI SHA-256 is pinned passes, whatever its names."""
        cert, key = self.client("pinned")
        pin = spki_sha256(certgen.load_issued(cert.read_bytes(), key.read_bytes()).certificate)
        factory = self.factory(AllowList.build(cns=["nobody"], spki=[pin]))
        self.assert_echoes(self.pair(factory, cert, key))

    def test_spki_pin_other_key_refused(self) -> None:
        """A pin of another key does not let a client in."""
        cert, key = self.client("pinned")
        other = spki_sha256(
            certgen.load_issued(
                self.pki.client_cert.read_bytes(), self.pki.client_key.read_bytes()
            ).certificate
        )
        factory = self.factory(AllowList.build(spki=[other]))
        self.assertIn("not on the allow-list", self.assert_refused(self.pair(factory, cert, key)))

    def test_expired_client_refused(self) -> None:
        """An expired client certificate is refused even if its CN is listed."""
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        cert, key = self.client("expired", now=past, days=2)
        factory = self.factory(AllowList.build(cns=["expired"]))
        self.assertIn("expired", self.assert_refused(self.pair(factory, cert, key)))

    def test_server_auth_only_client_refused(self) -> None:
        """A client certificate with EKU serverAuth only is refused for its purpose."""
        cert, key = self.client("wrong purpose", usage=ExtendedKeyUsageOID.SERVER_AUTH)
        factory = self.factory(AllowList.build(cns=["wrong purpose"]))
        reason = self.assert_refused(self.pair(factory, cert, key))
        # OpenSSL 1.1 says "unsupported", OpenSSL 3 "unsuitable" certificate purpose.
        self.assertRegex(reason, "uns(?:upported|uitable) certificate purpose")

    def test_other_ca_refused_even_if_listed(self) -> None:
        """The allow-list only narrows: a listed CN from another CA is still refused.

        The client hears unknown_ca, and the records name the stranger's certificate.
        """
        factory = self.factory(AllowList.build(cns=["stranger"]))
        pair = self.pair(factory, self.pki.other_client_cert, self.pki.other_client_key)
        reason = self.assert_refused(pair, alert="unknown ca")
        self.assertIn("unable to get local issuer certificate", reason)
        self.assert_presented(pair, self.pki.other_client_cert)

    def test_unparsable_certificate_refused_with_reason(self) -> None:
        """A certificate cryptography cannot read, checked against an allow-list, is refused.

        It ends as handshake_failed with a reason, the client hears bad_certificate,
        and nothing escapes as an unhandled error.
        """
        cert, key = write_v4_client(self.pki.directory, self.pki.ca)
        factory = self.factory(AllowList.build(cns=["v4 client"]))
        pair = self.pair(factory, cert, key)
        reason = self.assert_refused(pair, alert="bad certificate")
        self.assertIn("could not be checked", reason)
        (closed,) = self.of(pair, "connection_closed")
        self.assertEqual(closed["client_cert_subject"], "CN=v4 client")
        self.assertEqual(
            closed["client_cert_issuer"], self.pki.ca.certificate.subject.rfc4514_string()
        )

    def test_unparsable_certificate_without_allow_list(self) -> None:
        """Without an allow-list, such a certificate that OpenSSL verified is served.

        The record names it from OpenSSL's reading of its names.
        """
        cert, key = write_v4_client(self.pki.directory, self.pki.ca)
        factory = self.factory(AllowList())
        pair = self.pair(factory, cert, key)
        self.assert_echoes(pair)
        pair.server.loseConnection()
        pair.finish_stream()
        (closed,) = self.of(pair, "connection_closed")
        self.assertEqual(closed["client_cert_subject"], "CN=v4 client")
        self.assertEqual(len(closed["client_cert_sha256"]), 64)

    def test_replace_applies_to_new_connections_only(self) -> None:
        """After a context swap, a connection accepted before keeps the old allow-list."""
        other_cert, other_key = self.client("other client")
        factory = self.factory(AllowList.build(cns=["test client"]))
        before = self.pair(factory, self.pki.client_cert, self.pki.client_key)
        before_other = self.pair(factory, other_cert, other_key)
        factory.contexts.replace(
            load_and_validate(self.settings(AllowList.build(cns=["other client"])))
        )
        # Accepted before the swap, handshaking after it: the old list applies.
        self.assert_echoes(before)
        self.assertIn("not on the allow-list", self.assert_refused(before_other))
        # Accepted after the swap: the new list applies.
        self.assertIn(
            "not on the allow-list",
            self.assert_refused(self.pair(factory, self.pki.client_cert, self.pki.client_key)),
        )
        self.assert_echoes(self.pair(factory, other_cert, other_key))
