"""Tests for :mod:`secure_echo.tools.badssl`: each test certificate gets its verdict.

The verifying client is Python's ``ssl`` (OpenSSL's verifier) with ``ca.pem`` as its only
trust anchor and host-name checking on; the server is an ``ssl`` server context that
presents the case's files.  Both run over memory BIOs in this process: no socket.
"""

from __future__ import annotations

import contextlib
import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tools import badssl, certgen

NOW = datetime.datetime.now(datetime.UTC)


class HandshakeRefusedError(Exception):
    """The client refused the server's certificate."""

    def __init__(self, error: ssl.SSLCertVerificationError) -> None:
        super().__init__(error.verify_code, error.verify_message)
        self.verify_code: int = error.verify_code
        self.verify_message: str = error.verify_message


def handshake(cert: Path, key: Path, ca: Path, server_name: str) -> str:
    """Run a TLS handshake in memory; return the TLS version or raise on refusal."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(cafile=ca)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, to_server, server_hostname=server_name)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLCertVerificationError as error:
            raise HandshakeRefusedError(error) from error
        else:
            return client.version() or "unknown"
        server_in.write(to_server.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        to_client.write(server_out.read())
    raise AssertionError("the handshake did not finish in 10 rounds")


class CaseTableTests(SynchronousTestCase):
    """The list of cases."""

    def test_standard_set(self) -> None:
        """The set holds the seven standard cases, each served under .localhost."""
        self.assertEqual(
            [case.name for case in badssl.CASES],
            [
                "valid",
                "expired",
                "not-yet-valid",
                "wrong-host",
                "self-signed",
                "untrusted-root",
                "no-server-auth",
            ],
        )
        self.assertEqual(badssl.CASES[1].server_name, "expired.localhost")

    def test_expectation(self) -> None:
        """The control is to be accepted; a bad case names OpenSSL's error and its code."""
        cases = {case.name: case for case in badssl.CASES}
        self.assertEqual(cases["valid"].expectation, "accept it")
        self.assertEqual(
            cases["expired"].expectation,
            "refuse it: certificate has expired (OpenSSL verify error 10)",
        )


class MadeSetTests(SynchronousTestCase):
    """The certificates of a made set, written to files and verified by Python's ssl."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.made = badssl.make_set(now=NOW)
        self.ca = self.directory / "ca.pem"
        certgen.write_public(self.ca, self.made.ca.cert_pem())
        for name, issued in self.made.certificates.items():
            stem = self.directory / f"{name}.localhost"
            certgen.write_pair(
                issued, stem.with_suffix(".localhost.pem"), stem.with_suffix(".localhost.key")
            )

    def attempt(self, case: badssl.Case) -> str:
        """Connect to the case as a verifying client asking for its SNI name."""
        stem = self.directory / case.server_name
        return handshake(Path(f"{stem}.pem"), Path(f"{stem}.key"), self.ca, case.server_name)

    def test_valid_is_accepted(self) -> None:
        """A client trusting ca.pem accepts the control for valid.localhost."""
        self.assertEqual(self.attempt(badssl.CASES[0]), "TLSv1.3")

    def test_each_bad_case_is_refused_with_its_reason(self) -> None:
        """Every bad certificate is refused with exactly the OpenSSL error its case names."""
        seen = []
        for case in badssl.CASES[1:]:
            with self.assertRaises(HandshakeRefusedError, msg=case.name) as caught:
                self.attempt(case)
            self.assertEqual(caught.exception.verify_code, case.verify_code, case.name)
            self.assertIn(case.verdict, caught.exception.verify_message.lower(), case.name)
            seen.append(case.name)
        self.assertEqual(len(seen), 6)

    def test_one_fault_each(self) -> None:
        """Each SAN names its case (but wrong-host's); only no-server-auth lacks serverAuth."""
        for case in badssl.CASES:
            cert = self.made.certificates[case.name].certificate
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = san.get_values_for_type(x509.DNSName)
            expected = badssl.WRONG_HOST_NAME if case.name == "wrong-host" else case.server_name
            self.assertEqual(names, [expected], case.name)
            eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
            if case.name != "no-server-auth":
                usage = ExtendedKeyUsageOID.SERVER_AUTH
            self.assertEqual(eku, [usage], case.name)

    def test_dates(self) -> None:
        """The expired case ended and not-yet-valid starts after now; the rest cover now."""
        for case in badssl.CASES:
            cert = self.made.certificates[case.name].certificate
            if case.name == "expired":
                self.assertLess(cert.not_valid_after_utc, NOW)
            elif case.name == "not-yet-valid":
                self.assertGreater(cert.not_valid_before_utc, NOW)
            else:
                self.assertLess(cert.not_valid_before_utc, NOW, case.name)
                self.assertGreater(cert.not_valid_after_utc, NOW, case.name)

    def test_untrusted_root_is_another_ca(self) -> None:
        """untrusted-root is signed by a CA whose subject differs from ca.pem's."""
        leaf = self.made.certificates["untrusted-root"].certificate
        self.assertNotEqual(leaf.issuer, self.made.ca.certificate.subject)
        self.assertIn("untrusted", leaf.issuer.rfc4514_string())

    def test_trusting_the_right_ca_is_what_matters(self) -> None:
        """The control is refused by a client that trusts another CA: ca.pem is needed."""
        other = self.directory / "other-ca.pem"
        certgen.write_public(other, certgen.make_ca("stranger").cert_pem())
        stem = self.directory / "valid.localhost"
        with self.assertRaises(HandshakeRefusedError) as caught:
            handshake(Path(f"{stem}.pem"), Path(f"{stem}.key"), other, "valid.localhost")
        self.assertEqual(caught.exception.verify_code, 20)


class IndexTests(SynchronousTestCase):
    """The README.txt written next to the certificates."""

    def test_names_every_case_and_its_verdict(self) -> None:
        """Each SNI name appears with what a correct client must do."""
        text = badssl.index_text(NOW, "/tmp/badssl")
        for case in badssl.CASES:
            self.assertIn(case.server_name, text)
            self.assertIn(case.expectation, text)
        self.assertIn("twistd -n --pidfile= secure-echo --test-certs /tmp/badssl", text)
