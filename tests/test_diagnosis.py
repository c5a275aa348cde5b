"""Tests for :mod:`secure_echo.tls.diagnosis`: every failure code, unit and on the wire."""

from __future__ import annotations

import contextlib
import datetime
import ssl
from typing import TYPE_CHECKING, Any, Final

from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls.allowlist import AllowList
from secure_echo.tls.diagnosis import (
    V_ERR_CERT_HAS_EXPIRED,
    V_ERR_CERT_NOT_YET_VALID,
    V_ERR_CERT_REJECTED,
    V_ERR_CERT_REVOKED,
    V_ERR_INVALID_PURPOSE,
    V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    Presented,
    ServerPolicy,
    diagnose,
    plaintext_failure,
    policy_of,
)
from secure_echo.tls.material import load_tls
from secure_echo.tls.policy import (
    GROUPS,
    TLS12_CIPHERS,
    TLS13_CIPHERS,
    ClientAuth,
    ContextHolder,
    TLSSettings,
)
from secure_echo.tools import certgen
from secure_echo.wire.clienthello import ClientHello
from tests.helpers import make_pki
from tests.tlspair import (
    CountingTransport,
    TLSPair,
    capture_events,
    client_context,
    named,
    server_factory,
)

if TYPE_CHECKING:
    from pathlib import Path

    from secure_echo.tls.factory import TLSServerFactory

POLICY: Final = ServerPolicy(
    profile="intermediate",
    versions=(0x0303, 0x0304),
    tls12_suites=TLS12_CIPHERS,
    tls13_suites=TLS13_CIPHERS,
    groups=GROUPS,
    key_kinds=frozenset({"ec"}),
    client_cas=("CN=test CA",),
    names=("localhost",),
)
NOW: Final = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)


def hello(**fields: Any) -> ClientHello:
    """A modern TLS 1.3 ClientHello, with ``fields`` changed."""
    base: dict[str, Any] = {
        "record_version": 0x0301,
        "legacy_version": 0x0303,
        "session_id_length": 32,
        "cipher_suites": (0x1301, 0x1302, 0xC02B),
        "compression_methods": (0,),
        "extensions": (0x000A, 0x000D, 0x002B, 0x0033),
        "supported_versions": (0x0304, 0x0303),
        "supported_groups": (0x001D, 0x0017),
        "key_share_groups": (0x001D,),
        "signature_algorithms": (0x0403, 0x0804),
    }
    base.update(fields)
    return ClientHello(**base)


class OfferTests(SynchronousTestCase):
    """Failures explained from what the client offered."""

    def test_no_common_version(self) -> None:
        """Names both sides' versions."""
        failure = diagnose(
            "unsupported protocol",
            hello=hello(supported_versions=(0x0302, 0x0301)),
            policy=POLICY,
        )
        self.assertEqual(failure.code, "no_common_version")
        self.assertIn("offers TLS 1.1, TLS 1.0", failure.hint)
        self.assertIn("accepts TLS 1.3, TLS 1.2 (profile intermediate)", failure.hint)

    def test_legacy_version_without_supported_versions(self) -> None:
        """A TLS 1.1 client (no supported_versions) is read from its legacy version."""
        failure = diagnose(
            "unsupported protocol",
            hello=hello(supported_versions=(), legacy_version=0x0302),
            policy=POLICY,
        )
        self.assertEqual(failure.code, "no_common_version")
        # It names its highest version only: the lower ones are not known offered.
        self.assertIn("the client offers up to TLS 1.1;", failure.hint)
        self.assertNotIn("TLS 1.0", failure.hint)

    def test_no_common_cipher(self) -> None:
        """A TLS 1.2 client with only CBC suites: both lists named."""
        failure = diagnose(
            "no shared cipher",
            hello=hello(supported_versions=(0x0303,), cipher_suites=(0x002F, 0x0035)),
            policy=POLICY,
        )
        self.assertEqual(failure.code, "no_common_cipher")
        self.assertIn("TLS_RSA_WITH_AES_128_CBC_SHA", failure.hint)
        self.assertIn("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", failure.hint)
        self.assertNotIn("ECDHE_RSA", failure.hint, "an EC key serves no RSA suites")

    def test_no_common_group(self) -> None:
        """Only groups the server does not take."""
        failure = diagnose(
            "no suitable key share",
            hello=hello(supported_groups=(0x001E,), key_share_groups=(0x001E,)),
            policy=POLICY,
        )
        self.assertEqual(failure.code, "no_common_group")
        self.assertIn("x448", failure.hint)
        self.assertIn("X25519MLKEM768", failure.hint)

    def test_no_common_signature(self) -> None:
        """Only RSA signatures for a server with an EC certificate."""
        failure = diagnose(
            "no suitable signature algorithm",
            hello=hello(signature_algorithms=(0x0804, 0x0401)),
            policy=POLICY,
        )
        self.assertEqual(failure.code, "no_common_signature")
        self.assertIn("ecdsa_secp256r1_sha256", failure.hint)

    def test_grease_is_ignored(self) -> None:
        """GREASE values neither satisfy the server nor show in the hint."""
        failure = diagnose(
            "unsupported protocol",
            hello=hello(supported_versions=(0x0A0A, 0x0302)),
            policy=POLICY,
        )
        self.assertEqual(failure.code, "no_common_version")
        self.assertNotIn("0x0a0a", failure.hint)

    def test_a_good_offer_leaves_it_to_openssl(self) -> None:
        """An offer the server can meet does not explain the failure; OpenSSL's words do."""
        failure = diagnose("decryption failed", hello=hello(), policy=POLICY)
        self.assertEqual(failure.code, "other")
        self.assertIn("decryption failed", failure.hint)


class CertificateTests(SynchronousTestCase):
    """Failures explained from the client certificate and its check."""

    presented: Final = Presented(
        "CN=alice",
        "CN=other CA",
        datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        datetime.datetime(2026, 2, 1, tzinfo=datetime.UTC),
        ("serverAuth",),
    )

    def explain(self, code: int, refusal: str = "refused") -> tuple[str, str]:
        failure = diagnose(
            "certificate verify failed",
            policy=POLICY,
            verify_code=code,
            refusal=refusal,
            presented=self.presented,
            now=NOW,
        )
        return failure.code, failure.hint

    def test_unknown_ca(self) -> None:
        """Names the issuer and the CAs this server trusts."""
        code, hint = self.explain(V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY)
        self.assertEqual(code, "unknown_ca")
        self.assertIn("issued by CN=other CA", hint)
        self.assertIn("trusts: CN=test CA", hint)

    def test_expired(self) -> None:
        """Names the dates and now."""
        code, hint = self.explain(V_ERR_CERT_HAS_EXPIRED)
        self.assertEqual(code, "certificate_expired")
        self.assertIn("2026-01-01 00:00 to 2026-02-01 00:00", hint)
        self.assertIn("now 2026-12-06 12:00 UTC", hint)

    def test_not_yet_valid(self) -> None:
        """Points at the client's clock."""
        code, hint = self.explain(V_ERR_CERT_NOT_YET_VALID)
        self.assertEqual(code, "certificate_not_yet_valid")
        self.assertIn("clock", hint)

    def test_purpose(self) -> None:
        """Names the usages it has."""
        code, hint = self.explain(V_ERR_INVALID_PURPOSE)
        self.assertEqual(code, "certificate_purpose")
        self.assertIn("serverAuth", hint)
        self.assertIn("clientAuth", hint)

    def test_revoked(self) -> None:
        """Says revoked."""
        self.assertEqual(self.explain(V_ERR_CERT_REVOKED)[0], "certificate_revoked")

    def test_allow_list(self) -> None:
        """Quotes which rule refused it."""
        code, hint = self.explain(
            V_ERR_CERT_REJECTED, "client certificate CN=alice is not on the allow-list"
        )
        self.assertEqual(code, "allow_list")
        self.assertIn("CN=alice is not on the allow-list", hint)

    def test_unreadable(self) -> None:
        """A certificate that could not be checked at all."""
        code, _ = self.explain(V_ERR_CERT_REJECTED, "the certificate could not be checked: x")
        self.assertEqual(code, "certificate_unreadable")

    def test_no_certificate(self) -> None:
        """OpenSSL's words when a required certificate is missing."""
        failure = diagnose("peer did not return a certificate", policy=POLICY)
        self.assertEqual(failure.code, "no_client_certificate")
        self.assertIn("CN=test CA", failure.hint)


class OtherTests(SynchronousTestCase):
    """The rest: names, alerts, closes, plaintext."""

    def test_unknown_sni(self) -> None:
        """Names the name asked for and the ones the server has."""
        failure = diagnose("callback failed", policy=POLICY, sni_refused="nowhere.example")
        self.assertEqual(failure.code, "unknown_sni")
        self.assertIn("'nowhere.example'", failure.hint)
        self.assertIn("localhost", failure.hint)

    def test_client_refused_our_certificate(self) -> None:
        """The client's alert about our certificate, named, with what it means."""
        failure = diagnose("tlsv1 alert unknown ca", hello=hello(), policy=POLICY)
        self.assertEqual(failure.code, "client_refused_certificate")
        self.assertIn("(unknown ca): it does not trust its CA", failure.hint)
        for alert, meaning in (
            ("sslv3 alert certificate expired", "expired or not yet valid"),
            ("sslv3 alert unsupported certificate", "serverAuth"),
            ("sslv3 alert certificate revoked", "revoked"),
            ("sslv3 alert bad certificate", "does not trust its CA"),
            ("tlsv1 alert certificate unknown", "does not trust its CA"),
        ):
            failure = diagnose(alert, hello=hello(), policy=POLICY)
            self.assertEqual(failure.code, "client_refused_certificate", alert)
            self.assertIn(meaning, failure.hint)

    def test_client_closed(self) -> None:
        """The client left mid-handshake."""
        failure = diagnose("client closed the connection during the handshake", policy=POLICY)
        self.assertEqual(failure.code, "client_closed")

    def test_plaintext_and_http(self) -> None:
        """Plaintext and HTTP on the TLS port."""
        self.assertEqual(plaintext_failure(http=True).code, "http")
        self.assertEqual(plaintext_failure(http=False).code, "plaintext")


def settings_for(pki: Any, **kwargs: Any) -> TLSSettings:
    """Settings serving ``pki``'s server certificate, with ``kwargs``."""
    return TLSSettings(pki.server_cert, pki.server_key, **kwargs)


class OnTheWireTests(SynchronousTestCase):
    """Real handshakes in memory: the record's failure and hint."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)

    def factory(self, **kwargs: Any) -> TLSServerFactory:
        holder = ContextHolder(load_tls(settings_for(self.pki, **kwargs)))
        return server_factory(self.pki, self.clock, contexts=holder)

    def fail(self, pair: TLSPair) -> dict[str, Any]:  # type: ignore[override]
        """Run ``pair``'s handshake to its failure; return the handshake_failed event."""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            pair.handshake()
            pair.send(b"x\n")
            pair.pump()
        pair.finish_stream()
        (failed,) = named(self.events, "handshake_failed")
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual((closed["failure"], closed["hint"]), (failed["failure"], failed["hint"]))
        self.assertIsNotNone(closed["client_hello"])
        self.assertIsNotNone(failed["ja4"])
        return failed

    def test_old_client(self) -> None:
        """A TLS 1.1 client: no_common_version."""
        context = client_context(self.pki)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT@SECLEVEL=0")
        failed = self.fail(TLSPair(self.factory(), context))
        self.assertEqual(failed["failure"], "no_common_version", failed)

    def test_cbc_only_client(self) -> None:
        """A TLS 1.2 client with only CBC suites: no_common_cipher."""
        context = client_context(self.pki)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-ECDSA-AES128-SHA")
        failed = self.fail(TLSPair(self.factory(), context))
        self.assertEqual(failed["failure"], "no_common_cipher", failed)

    def test_x448_only_client(self) -> None:
        """A client offering only X448: no_common_group (a pyOpenSSL client)."""
        factory = self.factory()
        transport = CountingTransport()
        server = factory.buildProtocol(transport.getPeer())
        assert server is not None
        server.makeConnection(transport)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.assertEqual(_lib.SSL_CTX_set1_curves_list(context._context, b"X448"), 1)
        client = SSL.Connection(context, None)
        client.set_connect_state()
        for _ in range(5):
            with contextlib.suppress(SSL.Error):
                client.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                server.dataReceived(client.bio_read(65536))
            data = transport.value()
            transport.clear()
            if data:
                client.bio_write(data)
        (failed,) = named(self.events, "handshake_failed")
        self.assertEqual(failed["failure"], "no_common_group", failed)
        self.assertIn("x448", failed["hint"])

    def test_strict_sni(self) -> None:
        """A name no certificate carries, with strict SNI: unknown_sni."""
        context = client_context(self.pki)
        failed = self.fail(
            TLSPair(self.factory(strict_sni=True), context, server_hostname="nowhere.example")
        )
        self.assertEqual(failed["failure"], "unknown_sni", failed)
        self.assertIn("nowhere.example", failed["hint"])

    def mtls(self, cert: Path | None, key: Path | None, **kwargs: Any) -> dict[str, Any]:
        factory = self.factory(
            client_ca=self.pki.ca_cert, client_auth=ClientAuth.REQUIRED, **kwargs
        )
        context = client_context(self.pki, cert=cert, key=key)
        return self.fail(TLSPair(factory, context))

    def test_no_client_certificate(self) -> None:
        """Client auth required, none sent: no_client_certificate."""
        failed = self.mtls(None, None)
        self.assertEqual(failed["failure"], "no_client_certificate", failed)

    def test_unknown_ca(self) -> None:
        """A certificate from another CA: unknown_ca, naming it."""
        failed = self.mtls(self.pki.other_client_cert, self.pki.other_client_key)
        self.assertEqual(failed["failure"], "unknown_ca", failed)
        self.assertIn("CN=other CA", failed["hint"])

    def test_expired_client(self) -> None:
        """An expired certificate: certificate_expired, with its dates."""
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        issued = certgen.issue_client(self.pki.ca, "old", days=2, now=past)
        cert, key = self.pki.directory / "old.pem", self.pki.directory / "old-key.pem"
        certgen.write_pair(issued, cert, key)
        failed = self.mtls(cert, key)
        self.assertEqual(failed["failure"], "certificate_expired", failed)
        self.assertIn("valid from", failed["hint"])

    def test_allow_list(self) -> None:
        """Not on the allow-list: allow_list."""
        failed = self.mtls(
            self.pki.client_cert, self.pki.client_key, allow=AllowList.build(cns=["nobody"])
        )
        self.assertEqual(failed["failure"], "allow_list", failed)

    def test_plaintext(self) -> None:
        """HTTP on the TLS port: the record says http."""
        pair = TLSPair(self.factory(), client_context(self.pki))
        pair.server.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        pair.finish_stream()
        (closed,) = named(self.events, "connection_closed")
        self.assertEqual(closed["failure"], "http")

    def test_policy_of(self) -> None:
        """The policy read from a loaded set names the certificates' names and kinds."""
        loaded = load_tls(settings_for(self.pki))
        policy = policy_of(loaded)
        self.assertEqual(policy.key_kinds, {"ec"})
        self.assertIn("localhost", policy.names)
        self.assertEqual(policy.versions, (0x0303, 0x0304))
