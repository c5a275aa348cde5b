"""Tests for :mod:`secure_echo.tools.report`, what ``secure-echo-client -v`` prints.

Connections are made in memory with Python's ``ssl`` on both ends (helpers from
:mod:`tests.test_handshake`); the report is built from the client's ``SSLObject`` and
the handshake bytes, exactly as the client does after a real handshake.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tools import certgen, report
from secure_echo.tools.handshake import ClientOffer
from tests.test_handshake import (
    Capture,
    Files,
    client_context,
    make_files,
    server_context,
    stdlib_handshake,
)

NOW = datetime.datetime.now(datetime.UTC)


def build_report(
    capture: Capture, trust: str = "against ca.pem", alpn: tuple[str, ...] = ()
) -> str:
    """The report for ``capture`` as one string."""
    lines = report.connection_report(
        capture.client,
        address="127.0.0.1:8443",
        server_name="localhost",
        trust=trust,
        offered_alpn=alpn,
        sent=capture.client_sent,
        received=capture.server_sent,
    )
    return "\n".join(lines) + "\n"


def root_and_intermediate() -> tuple[certgen.Issued, certgen.Issued]:
    """A root that may sign one intermediate CA, and that intermediate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "report root")])
    start = NOW - datetime.timedelta(minutes=5)
    root_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    root = certgen.Issued(root_cert, key)
    middle = certgen.make_ca("report intermediate", days=1)
    ski = root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    middle_cert = (
        x509.CertificateBuilder()
        .subject_name(middle.certificate.subject)
        .issuer_name(name)
        .public_key(middle.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(middle.key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return root, certgen.Issued(middle_cert, middle.key)


class _NoChainMethods:
    """An ``SSLObject`` seen through a Python whose ssl offers no chain at all."""

    def __init__(self, tls: ssl.SSLObject) -> None:
        self._tls = tls

    def getpeercert(self, binary_form: bool) -> bytes | None:
        assert binary_form
        return self._tls.getpeercert(binary_form=True)


class _WithGroup:
    """An ``SSLObject`` seen through Python 3.15+, whose ssl names the group itself."""

    def __init__(self, tls: ssl.SSLObject, group: str) -> None:
        self._tls = tls
        self._group = group

    def __getattr__(self, name: str) -> object:
        return getattr(self._tls, name)

    def group(self) -> str:
        return self._group


class ReportTests(SynchronousTestCase):
    """The report after a handshake between two Python ssl ends."""

    def setUp(self) -> None:
        self.files: Files = make_files(self)

    def test_negotiated_facts(self) -> None:
        """Address, name, version, cipher, group, ALPN and trust each get a line."""
        capture = stdlib_handshake(client_context(self.files), server_context(self.files))
        text = build_report(capture)
        cipher = (capture.client.cipher() or ("?",))[0]
        self.assertIn("* connected to 127.0.0.1:8443\n", text)
        self.assertIn(
            "*   server name: localhost (sent as SNI; checked in the certificate)\n", text
        )
        self.assertIn("*   TLS version: TLSv1.3\n", text)
        self.assertIn(f"*   cipher: {cipher}\n", text)
        self.assertIn("*   group: x25519\n", text)
        self.assertIn("*   ALPN: none (none offered)\n", text)
        self.assertIn("*   verification: against ca.pem\n", text)

    def test_alpn(self) -> None:
        """The selected protocol is shown with the list offered; no overlap shows none."""
        server = server_context(self.files)
        server.set_alpn_protocols(["secure-echo", "h2"])
        capture = stdlib_handshake(client_context(self.files, ["h2", "x"]), server)
        self.assertIn("*   ALPN: h2 (offered: h2, x)\n", build_report(capture, alpn=("h2", "x")))
        capture = stdlib_handshake(client_context(self.files, ["x"]), server_context(self.files))
        self.assertIn("*   ALPN: none (offered: x)\n", build_report(capture, alpn=("x",)))

    def test_group_after_hello_retry(self) -> None:
        """A group the server asked for with a HelloRetryRequest is named and so marked."""
        server = server_context(self.files)
        server.set_ecdh_curve("secp384r1")
        text = build_report(stdlib_handshake(client_context(self.files), server))
        self.assertIn(
            "*   group: secp384r1 (after a HelloRetryRequest: the server wanted another key "
            "share than the client sent)\n",
            text,
        )

    def test_group_in_tls12(self) -> None:
        """In TLS 1.2 the group comes from the ECDHE key exchange."""
        server = server_context(self.files)
        server.maximum_version = ssl.TLSVersion.TLSv1_2
        text = build_report(stdlib_handshake(client_context(self.files), server))
        self.assertIn("*   TLS version: TLSv1.2\n", text)
        self.assertIn("*   group: x25519\n", text)

    def test_group_unknown_without_handshake_bytes(self) -> None:
        """Without the server's handshake bytes the group is said to be unknown."""
        capture = stdlib_handshake(client_context(self.files), server_context(self.files))
        empty = Capture(capture.client_sent, b"", capture.client)
        self.assertIn("*   group: unknown\n", build_report(empty))

    def test_group_from_python(self) -> None:
        """Where Python's ssl names the group itself (3.15+), that name is used."""
        capture = stdlib_handshake(client_context(self.files), server_context(self.files))
        seen = Capture(b"", b"", _WithGroup(capture.client, "X25519MLKEM768"))  # type: ignore[arg-type]
        self.assertIn("*   group: X25519MLKEM768\n", build_report(seen))

    def test_offered_groups(self) -> None:
        """The groups the client offered are listed with its key share."""
        client = client_context(self.files)
        client.set_ecdh_curve("prime256v1")
        text = build_report(stdlib_handshake(client, server_context(self.files)))
        self.assertIn("*   groups offered: secp256r1 (key share: secp256r1)\n", text)

    def test_verified_chain(self) -> None:
        """The chain is the verified one, leaf first, with subject, issuer, dates and SANs."""
        capture = stdlib_handshake(client_context(self.files), server_context(self.files))
        text = build_report(capture)
        leaf = self.files.issued.certificate
        self.assertIn(
            "*   certificate chain, as verified (the server's certificate up to the trust "
            "anchor), 2 certificates:\n",
            text,
        )
        self.assertIn("*     [0] subject: CN=localhost\n", text)
        self.assertIn(f"*         issuer: {leaf.issuer.rfc4514_string()}\n", text)
        start = leaf.not_valid_before_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
        end = leaf.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
        self.assertRegex(text, rf"\*         valid: {start} to {end} \(\d+ days left\)\n")
        self.assertIn("*         SANs: DNS:localhost\n", text)
        self.assertIn("*     [1] subject: CN=handshake test CA,O=secure-echo\n", text)
        self.assertIn("*         issuer: CN=handshake test CA,O=secure-echo (self-signed)\n", text)
        self.assertIn("*         SANs: none\n", text)

    def test_chain_through_an_intermediate(self) -> None:
        """A chain sent with an intermediate shows all three certificates when verified."""
        root, middle = root_and_intermediate()
        leaf = certgen.issue_server(middle, ["localhost", "127.0.0.1"])
        directory = Path(self.mktemp())
        directory.mkdir()
        certgen.write_public(directory / "root.pem", root.cert_pem())
        certgen.write_private(directory / "leaf.key", leaf.key_pem())
        certgen.write_public(directory / "chain.pem", leaf.cert_pem() + middle.cert_pem())
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(directory / "chain.pem", directory / "leaf.key")
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(cafile=directory / "root.pem")
        text = build_report(stdlib_handshake(client, server))
        self.assertIn("the trust anchor), 3 certificates:\n", text)
        self.assertIn("*     [1] subject: CN=report intermediate,O=secure-echo\n", text)
        self.assertIn("*     [2] subject: CN=report root\n", text)
        self.assertIn("*         SANs: DNS:localhost, IP:127.0.0.1\n", text)

    def test_unverified_chain(self) -> None:
        """Without verification the chain shown is the one the server sent."""
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        capture = stdlib_handshake(client, server_context(self.files))
        text = build_report(capture, trust="none (--insecure)")
        self.assertIn("*   verification: none (--insecure)\n", text)
        self.assertIn("*   server name: localhost (sent as SNI; not checked)\n", text)
        self.assertIn(
            "*   certificate chain, as sent by the server (not verified), 1 certificate:\n", text
        )

    def test_leaf_only_fallback(self) -> None:
        """A Python that gives no chain still shows the server's certificate, and says so."""
        capture = stdlib_handshake(client_context(self.files), server_context(self.files))
        chain = report.peer_chain(_NoChainMethods(capture.client), verified=True)  # type: ignore[arg-type]
        self.assertEqual(len(chain.certificates), 1)
        self.assertIn("only the server's certificate", chain.description)
        self.assertEqual(
            x509.load_der_x509_certificate(chain.certificates[0]), self.files.issued.certificate
        )

    def test_certificate_dates(self) -> None:
        """An expired or future certificate says so instead of the days left."""
        ca = certgen.make_ca("dates CA")
        old = certgen.issue_server(
            ca,
            ["old.test"],
            now=NOW - datetime.timedelta(days=10),
            days=3,
            not_before=NOW - datetime.timedelta(days=10),
        )
        lines = report.certificate_lines(
            0, old.certificate.public_bytes(serialization.Encoding.DER), now=NOW
        )
        self.assertRegex("\n".join(lines), r"\(expired 7 days ago\)")
        future = certgen.issue_server(
            ca,
            ["new.test"],
            now=NOW + datetime.timedelta(days=5),
            days=3,
            not_before=NOW + datetime.timedelta(days=5),
        )
        lines = report.certificate_lines(
            0, future.certificate.public_bytes(serialization.Encoding.DER), now=NOW
        )
        self.assertRegex("\n".join(lines), r"\(not valid for another 4 days\)")

    def test_unparsable_certificate(self) -> None:
        """Bytes that are no certificate are reported as such, without a traceback."""
        lines = report.certificate_lines(3, b"\x30\x03\x02\x01\x00", now=NOW)
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith("[3] cannot be read: "), lines)


class PostQuantumTests(SynchronousTestCase):
    """The line saying whether a post-quantum group was offered, and why not."""

    def test_offered_and_chosen(self) -> None:
        """An offered ML-KEM group is named, with whether the server chose it."""
        offer = ClientOffer((0x11EC, 0x001D), (0x11EC, 0x001D), ())
        self.assertEqual(
            report.post_quantum_line(offer, 0x11EC, (3, 5, 0, 0, 0), "OpenSSL 3.5.0"),
            "offered (X25519MLKEM768); the server chose it",
        )
        self.assertEqual(
            report.post_quantum_line(offer, 0x001D, (3, 5, 0, 0, 0), "OpenSSL 3.5.0"),
            "offered (X25519MLKEM768); the server chose a classical group",
        )

    def test_library_too_old(self) -> None:
        """Before OpenSSL 3.5 the line says the library has no ML-KEM group."""
        offer = ClientOffer((0x001D,), (0x001D,), ())
        line = report.post_quantum_line(offer, 0x001D, (3, 0, 0, 19, 0), "OpenSSL 3.0.19")
        self.assertEqual(
            line,
            "not offered: OpenSSL 3.0.19, which this Python's ssl uses, has no ML-KEM group "
            "(OpenSSL 3.5 and later offer X25519MLKEM768 by default)",
        )

    def test_library_new_enough_but_not_offered(self) -> None:
        """With OpenSSL 3.5+ and no such group offered, the configuration is blamed."""
        offer = ClientOffer((0x001D,), (0x001D,), ())
        line = report.post_quantum_line(offer, 0x001D, (3, 5, 1, 0, 0), "OpenSSL 3.5.1")
        self.assertIn("not offered: OpenSSL 3.5.1 has ML-KEM groups", line)
