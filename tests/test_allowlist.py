"""Tests for :mod:`secure_echo.tls.allowlist`: matching and validating allow-list entries."""

from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls.allowlist import AllowList, AllowListError, spki_sha256
from secure_echo.tools import certgen

SPIFFE_WEB = "spiffe://example.org/ns/prod/sa/web"


def _cert_for_key(
    ca: certgen.Issued, common_name: str, public: ec.EllipticCurvePublicKey
) -> x509.Certificate:
    """Issue a bare leaf for ``public`` (certgen always makes a fresh key)."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )


def _colons(hex_digest: str) -> str:
    """``ab:cd:...`` as ``openssl`` prints fingerprints."""
    return ":".join(hex_digest[i : i + 2] for i in range(0, len(hex_digest), 2))


class _CertificateCase(SynchronousTestCase):
    """A CA and a few client certificates shared by the tests."""

    def setUp(self) -> None:
        self.ca = certgen.make_ca("allow-list test CA")
        self.web = certgen.issue_client(
            self.ca, "web-client", dns=["web.example.org"], uris=[SPIFFE_WEB]
        ).certificate
        self.bare = certgen.issue_client(self.ca, "bare-client").certificate


class InactiveTests(_CertificateCase):
    """An allow-list with no entries."""

    def test_empty_is_inactive(self) -> None:
        """An allow-list built from nothing is not active."""
        self.assertFalse(AllowList.build().active)
        self.assertFalse(AllowList().active)

    def test_inactive_passes_everything(self) -> None:
        """With no entries every verified certificate passes, with or without SANs."""
        allow = AllowList.build()
        self.assertIsNone(allow.check(self.web))
        self.assertIsNone(allow.check(self.bare))

    def test_any_entry_activates(self) -> None:
        """One entry in any of the four lists makes the allow-list active."""
        self.assertTrue(AllowList.build(cns=["a"]).active)
        self.assertTrue(AllowList.build(dns=["a.example"]).active)
        self.assertTrue(AllowList.build(uris=[SPIFFE_WEB]).active)
        self.assertTrue(AllowList.build(spki=["0" * 64]).active)


class CommonNameTests(_CertificateCase):
    """``--allow-cn``."""

    def test_match(self) -> None:
        """A certificate whose subject CN is listed passes."""
        allow = AllowList.build(cns=["other", "web-client"])
        self.assertIsNone(allow.check(self.web))

    def test_mismatch(self) -> None:
        """A certificate whose CN is not listed fails with a reason naming its subject."""
        reason = AllowList.build(cns=["web-client"]).check(self.bare)
        assert reason is not None
        self.assertIn("CN=bare-client", reason)
        self.assertIn("not on the allow-list", reason)

    def test_case_sensitive(self) -> None:
        """CN matching is exact: a CN differing only in case fails."""
        self.assertIsNotNone(AllowList.build(cns=["WEB-CLIENT"]).check(self.web))


class DNSNameTests(_CertificateCase):
    """``--allow-dns``."""

    def test_match(self) -> None:
        """A certificate with the listed DNS subjectAltName passes."""
        self.assertIsNone(AllowList.build(dns=["web.example.org"]).check(self.web))

    def test_case_insensitive(self) -> None:
        """DNS names match regardless of case, in the list and in the certificate."""
        self.assertIsNone(AllowList.build(dns=["WEB.Example.ORG"]).check(self.web))
        upper = certgen.issue_client(self.ca, "upper", dns=["API.Example.ORG"]).certificate
        self.assertIsNone(AllowList.build(dns=["api.example.org"]).check(upper))

    def test_trailing_dot(self) -> None:
        """A trailing dot on either side does not stop a match."""
        self.assertIsNone(AllowList.build(dns=["web.example.org."]).check(self.web))
        dotted = certgen.issue_client(self.ca, "dotted", dns=["db.example.org."]).certificate
        self.assertIsNone(AllowList.build(dns=["db.example.org"]).check(dotted))

    def test_mismatch(self) -> None:
        """A certificate whose DNS names are all unlisted fails."""
        reason = AllowList.build(dns=["api.example.org"]).check(self.web)
        assert reason is not None
        self.assertIn("CN=web-client", reason)

    def test_cn_is_not_a_dns_name(self) -> None:
        """A DNS entry equal to the certificate's CN does not match: only SANs count."""
        self.assertIsNotNone(AllowList.build(dns=["web-client"]).check(self.web))

    def test_no_san(self) -> None:
        """A certificate without any SAN fails a DNS-only list, with its subject named."""
        reason = AllowList.build(dns=["bare-client"]).check(self.bare)
        assert reason is not None
        self.assertIn("CN=bare-client", reason)
        self.assertIn("not on the allow-list", reason)


class URITests(_CertificateCase):
    """``--allow-uri`` (SPIFFE IDs)."""

    def test_exact_match(self) -> None:
        """A certificate with the listed SPIFFE ID as a URI SAN passes."""
        self.assertIsNone(AllowList.build(uris=[SPIFFE_WEB]).check(self.web))

    def test_near_miss_path(self) -> None:
        """A SPIFFE ID with another path in the same trust domain fails."""
        allow = AllowList.build(uris=["spiffe://example.org/ns/prod/sa/api"])
        self.assertIsNotNone(allow.check(self.web))

    def test_prefix_is_not_a_match(self) -> None:
        """A listed URI that is a prefix of the certificate's URI does not match."""
        allow = AllowList.build(uris=["spiffe://example.org/ns/prod"])
        self.assertIsNotNone(allow.check(self.web))

    def test_dns_name_is_not_a_uri(self) -> None:
        """A DNS SAN does not satisfy the URI list, and a URI SAN not the DNS list."""
        self.assertIsNotNone(AllowList.build(uris=["web.example.org:443"]).check(self.web))
        self.assertIsNotNone(AllowList.build(dns=[SPIFFE_WEB]).check(self.web))

    def test_no_san(self) -> None:
        """A certificate without a SAN fails a URI-only list."""
        self.assertIsNotNone(AllowList.build(uris=[SPIFFE_WEB]).check(self.bare))

    def test_generator(self) -> None:
        """Entries given as a one-shot iterator are all kept (validation must not use them up)."""
        allow = AllowList.build(uris=(uri for uri in [SPIFFE_WEB]))
        self.assertEqual(allow.uris, frozenset([SPIFFE_WEB]))
        self.assertIsNone(allow.check(self.web))


class SPKIPinTests(_CertificateCase):
    """``--allow-spki-sha256``."""

    def setUp(self) -> None:
        super().setUp()
        self.pin = spki_sha256(self.web)

    def test_plain_hex(self) -> None:
        """A pin in lower-case hex matches."""
        self.assertIsNone(AllowList.build(spki=[self.pin]).check(self.web))

    def test_colons(self) -> None:
        """A pin written as colon-separated byte pairs matches."""
        self.assertIsNone(AllowList.build(spki=[_colons(self.pin)]).check(self.web))

    def test_uppercase(self) -> None:
        """A pin in upper-case hex matches."""
        self.assertIsNone(AllowList.build(spki=[self.pin.upper()]).check(self.web))

    def test_sha256_slash_prefix(self) -> None:
        """A pin prefixed with ``sha256/`` matches."""
        self.assertIsNone(AllowList.build(spki=["sha256/" + self.pin]).check(self.web))

    def test_sha256_colon_prefix(self) -> None:
        """A pin prefixed with ``sha256:``, bare or with colons between bytes, matches."""
        for pin in ["sha256:" + self.pin, "SHA256:" + _colons(self.pin).upper()]:
            self.assertIsNone(AllowList.build(spki=[pin]).check(self.web), pin)

    def test_whitespace(self) -> None:
        """Whitespace around a pin (as pasted from ``sha256sum``) is ignored."""
        self.assertIsNone(AllowList.build(spki=[f"  {self.pin}\n"]).check(self.web))

    def test_normalised(self) -> None:
        """All spellings of a pin normalise to the same lower-case hex."""
        allow = AllowList.build(
            spki=[self.pin, self.pin.upper(), _colons(self.pin), "sha256/" + self.pin]
        )
        self.assertEqual(allow.spki_sha256, frozenset([self.pin]))

    def test_wrong_pin(self) -> None:
        """A well-formed pin of another key fails."""
        reason = AllowList.build(spki=[spki_sha256(self.bare)]).check(self.web)
        assert reason is not None
        self.assertIn("CN=web-client", reason)

    def test_malformed_pin(self) -> None:
        """A pin that is not 64 hex digits is rejected naming --allow-spki-sha256, on one line."""
        for bad in ["abc", self.pin[:-1], self.pin + "0", "g" * 64, "sha1/" + self.pin, ""]:
            error = self.assertRaises(AllowListError, AllowList.build, spki=[bad])
            message = str(error)
            self.assertTrue(message.startswith("--allow-spki-sha256:"), message)
            self.assertNotIn("\n", message)

    def test_error_is_value_error(self) -> None:
        """AllowListError is a ValueError, so generic config handling catches it."""
        self.assertTrue(issubclass(AllowListError, ValueError))


class SPKIDigestTests(SynchronousTestCase):
    """:func:`spki_sha256`."""

    def setUp(self) -> None:
        self.ca = certgen.make_ca("spki test CA")

    def test_digest_of_spki_der(self) -> None:
        """The pin is the hex SHA-256 of the DER SubjectPublicKeyInfo."""
        issued = certgen.issue_client(self.ca, "client")
        der = issued.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.assertEqual(spki_sha256(issued.certificate), hashlib.sha256(der).hexdigest())

    def test_stable_across_reissue(self) -> None:
        """Two certificates for one key share the pin, and the pin passes both."""
        key = ec.generate_private_key(ec.SECP256R1())
        first = _cert_for_key(self.ca, "first", key.public_key())
        second = _cert_for_key(self.ca, "second", key.public_key())
        self.assertNotEqual(first.serial_number, second.serial_number)
        self.assertEqual(spki_sha256(first), spki_sha256(second))
        allow = AllowList.build(spki=[spki_sha256(first)])
        self.assertIsNone(allow.check(second))

    def test_differs_across_keys(self) -> None:
        """Certificates with different keys have different pins."""
        one = certgen.issue_client(self.ca, "same").certificate
        two = certgen.issue_client(self.ca, "same").certificate
        self.assertNotEqual(spki_sha256(one), spki_sha256(two))


class AnyOfTests(_CertificateCase):
    """Several lists together: a certificate passes if it matches any entry of any list."""

    def test_match_in_one_list_is_enough(self) -> None:
        """A certificate matching only one of several lists passes, whichever list it is."""
        others = {
            "cns": ["nobody"],
            "dns": ["nowhere.example"],
            "uris": ["spiffe://example.org/none"],
            "spki": ["0" * 64],
        }
        matches = {
            "cns": ["web-client"],
            "dns": ["web.example.org"],
            "uris": [SPIFFE_WEB],
            "spki": [spki_sha256(self.web)],
        }
        for name, entries in matches.items():
            allow = AllowList.build(**{**others, name: others[name] + entries})
            self.assertIsNone(allow.check(self.web), name)

    def test_no_match_in_any_list(self) -> None:
        """A certificate matching no entry of any list fails."""
        allow = AllowList.build(
            cns=["nobody"],
            dns=["nowhere.example"],
            uris=["spiffe://example.org/none"],
            spki=["0" * 64],
        )
        reason = allow.check(self.web)
        assert reason is not None
        self.assertIn("CN=web-client", reason)

    def test_other_lists_rescue_a_cert_without_san(self) -> None:
        """A certificate without SANs fails the DNS list but passes by its CN or pin."""
        by_cn = AllowList.build(dns=["bare.example"], cns=["bare-client"])
        self.assertIsNone(by_cn.check(self.bare))
        by_pin = AllowList.build(uris=[SPIFFE_WEB], spki=[spki_sha256(self.bare)])
        self.assertIsNone(by_pin.check(self.bare))


class BuildValidationTests(SynchronousTestCase):
    """:meth:`AllowList.build` rejects malformed entries with a one-line message."""

    def test_non_uri(self) -> None:
        """An --allow-uri entry without a scheme is rejected, naming the option."""
        error = self.assertRaises(AllowListError, AllowList.build, uris=["example.org/svc"])
        message = str(error)
        self.assertTrue(message.startswith("--allow-uri:"), message)
        self.assertIn("example.org/svc", message)
        self.assertNotIn("\n", message)

    def test_non_uri_among_good_ones(self) -> None:
        """One bad URI fails the whole build even after good entries."""
        self.assertRaises(AllowListError, AllowList.build, uris=[SPIFFE_WEB, "web"])
