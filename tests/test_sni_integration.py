"""The real daemon with several certificates, test certificates, CRLs and ALPN.

``twistd -n secure-echo`` is started with the options of
:mod:`secure_echo.daemon.settings` that turn these on, and real clients (Python's
``ssl``, ``openssl s_client``) check what it serves: the certificate chosen by the
server name, the refusal of an unknown name under ``--strict-sni``, a test
certificate served as it is, a revoked client certificate refused, the ALPN
protocol selected, and a SIGHUP swapping one of two certificates.

Shared daemons (:func:`tests.daemon.shared_daemon`) use the certificates of
:func:`tests.test_integration.shared_pki` plus files written next to them at
start; tests find their own records by the client's address and a log position.
"""

from __future__ import annotations

import hashlib
import signal
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from secure_echo.tools import certgen
from tests.daemon import Daemon, shared_daemon, start_daemon
from tests.helpers import make_pki, write_crl, write_named_server, write_test_certs
from tests.test_integration import (
    IntegrationCase,
    TLSClient,
    client_context,
    server_args,
    shared_pki,
)

if TYPE_CHECKING:
    from tests.daemon import Event

#: The names the second certificate carries.
OTHER_NAMES: Final = ("other.example", "*.wild.example")


def other_pair() -> tuple[Path, Path]:
    """The second certificate of the shared PKI, for :data:`OTHER_NAMES` (made once)."""
    pki = shared_pki()
    cert, key = pki.directory / "sni-other.pem", pki.directory / "sni-other-key.pem"
    if not cert.exists():
        write_named_server(pki, "sni-other", OTHER_NAMES)
    return cert, key


def two_cert_args(*extra: str) -> tuple[str, ...]:
    """``--cert``/``--key`` of the default (localhost) and the second certificate."""
    cert, key = other_pair()
    return server_args(shared_pki(), "--cert", str(cert), "--key", str(key), *extra)


def sni_daemon() -> Daemon:
    """Two certificates, a test certificate for expired.localhost, ALPN h2 then http/1.1."""

    def make_args(directory: Path) -> tuple[str, ...]:
        test_dir = write_test_certs(directory / "test-certs", shared_pki().ca)
        return two_cert_args("--test-certs", str(test_dir), "--alpn", "h2", "--alpn", "http/1.1")

    return shared_daemon("sni-several", make_args)


def strict_daemon() -> Daemon:
    """Two certificates and ``--strict-sni``."""
    return shared_daemon("sni-strict", lambda _: two_cert_args("--strict-sni"))


def crl_daemon() -> Daemon:
    """Client certificates required, with a CRL revoking ``revoked.pem`` in its directory."""
    pki = shared_pki()

    def make_args(directory: Path) -> tuple[str, ...]:
        revoked = certgen.issue_client(pki.ca, "revoked client", days=2)
        certgen.write_pair(revoked, directory / "revoked.pem", directory / "revoked-key.pem")
        crl = write_crl(pki, (revoked.certificate.serial_number,), name="sni-crl.pem")
        return server_args(pki, "--client-ca", str(pki.ca_cert), "--crl", str(crl))

    return shared_daemon("sni-crl", make_args)


def der(path: Path) -> bytes:
    """The DER form of the (first) certificate in a PEM file."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def unverified() -> ssl.SSLContext:
    """A client context that accepts any certificate (to see what is served)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class SNICase(IntegrationCase):
    """Helpers: connect with a server name, finish a connection, see what was served."""

    def connect(
        self, daemon: Daemon, name: str, context: ssl.SSLContext | None = None
    ) -> TLSClient:
        """A client asking for ``name`` (an IP address sends no SNI), handshake done."""
        client = TLSClient(
            daemon.port, context or client_context(shared_pki().ca_cert), server_hostname=name
        )
        self.addCleanup(client.close)
        client.handshake()
        return client

    def echo_and_close(self, daemon: Daemon, client: TLSClient, since: int) -> Event:
        """One line echoed, then an orderly close; the connection's record."""
        client.write(b"sni\n")
        client.send_close_notify()
        self.assertEqual(client.read_to_end(), b"sni\n")
        return self.assert_closed_as(daemon, since, client.peer, "eof")

    def served(self, client: TLSClient) -> bytes:
        """The DER certificate the server presented to ``client``."""
        served = client.tls.getpeercert(binary_form=True)
        assert served is not None
        return served


class CertificateChoiceTests(SNICase):
    """Two --cert: each served to the names it carries, the first to everyone else."""

    def test_python_client_gets_each_by_name(self) -> None:
        """Python's ssl, verifying: each name gets the certificate that carries it.

        other.example and a name under the wildcard get the second certificate;
        localhost, an unknown name and no SNI get the first.
        """
        daemon = sni_daemon()
        pki = shared_pki()
        cases = [
            ("other.example", der(other_pair()[0])),
            ("a.wild.example", der(other_pair()[0])),
            ("localhost", der(pki.server_cert)),
            ("127.0.0.1", der(pki.server_cert)),
        ]
        for name, expected in cases:
            since = daemon.mark()
            client = self.connect(daemon, name)
            self.assertEqual(self.served(client), expected, name)
            event = self.echo_and_close(daemon, client, since)
            self.assertEqual(event["sni"], None if name == "127.0.0.1" else name)
        since = daemon.mark()
        client = self.connect(daemon, "unknown.example", unverified())
        self.assertEqual(self.served(client), der(pki.server_cert))
        self.echo_and_close(daemon, client, since)

    def test_openssl_servername(self) -> None:
        """``openssl s_client -servername other.example`` verifies the second certificate."""
        daemon = sni_daemon()
        since = daemon.mark()
        client = self.s_client(
            daemon,
            "-servername",
            "other.example",
            "-verify_hostname",
            "other.example",
            "-verify_return_error",
            "-CAfile",
            str(shared_pki().ca_cert),
            "-quiet",
            "-no_ign_eof",
        )
        client.send(b"named\n")
        self.assertEqual(client.read_until(6), b"named\n")
        code, output, stderr = client.finish()
        self.assertEqual((code, output), (0, b"named\n"), stderr)
        self.assertIn("depth=0 CN = other.example", stderr)
        self.assertNotIn("verify error", stderr)
        event = daemon.wait_closed(since=since)
        self.assertEqual(event["sni"], "other.example")

    def test_openssl_default_for_unknown_name(self) -> None:
        """Without --strict-sni an unknown name gets the default certificate (CN=localhost)."""
        daemon = sni_daemon()
        since = daemon.mark()
        client = self.s_client(
            daemon,
            "-servername",
            "nowhere.example",
            "-CAfile",
            str(shared_pki().ca_cert),
            "-quiet",
            "-no_ign_eof",
        )
        client.send(b"x\n")
        self.assertEqual(client.read_until(2), b"x\n")
        code, _, stderr = client.finish()
        self.assertEqual(code, 0, stderr)
        self.assertIn("depth=0 CN = localhost", stderr)
        daemon.wait_closed(since=since)

    def test_start_up_lists_both(self) -> None:
        """tls_context_loaded names both certificates, the default first."""
        daemon = sni_daemon()
        loaded = daemon.wait_for_event(lambda e: e.get("event") == "tls_context_loaded")
        self.assertEqual(
            [(c["subject"], c["names"], c["default"]) for c in loaded["certificates"]],
            [
                ("CN=localhost", ["localhost"], True),
                ("CN=other.example", list(OTHER_NAMES), False),
            ],
        )
        self.assertEqual(loaded["subject"], "CN=localhost")


class StrictSNITests(SNICase):
    """--strict-sni: a name no certificate carries is refused with unrecognized_name."""

    def test_openssl_unknown_name_refused(self) -> None:
        """s_client asking for an unknown name hears the unrecognized_name alert."""
        daemon = strict_daemon()
        since = daemon.mark()
        client = self.s_client(
            daemon,
            "-servername",
            "nowhere.example",
            "-CAfile",
            str(shared_pki().ca_cert),
            "-quiet",
            "-no_ign_eof",
        )
        code, output, stderr = client.finish()
        self.assertNotEqual(code, 0, stderr)
        self.assertEqual(output, b"")
        self.assertIn("unrecognized name", stderr)
        event = self.assert_closed_as(daemon, since, None, "handshake_failed")
        self.assertIn("nowhere.example", event["tls_error"])

    def test_python_unknown_name_refused(self) -> None:
        """Python's ssl gets the same alert; a known name and no name are still served."""
        daemon = strict_daemon()
        since = daemon.mark()
        client = TLSClient(daemon.port, unverified(), server_hostname="nowhere.example")
        self.addCleanup(client.close)
        with self.assertRaises(ssl.SSLError) as raised:
            client.handshake()
        self.assertIn("UNRECOGNIZED_NAME", str(raised.exception).upper())
        self.assert_closed_as(daemon, since, client.peer, "handshake_failed")
        for name, expected in (("other.example", other_pair()[0]), ("127.0.0.1", None)):
            since = daemon.mark()
            served = self.connect(daemon, name)
            wanted = der(expected) if expected else der(shared_pki().server_cert)
            self.assertEqual(self.served(served), wanted, name)
            self.echo_and_close(daemon, served, since)


class TestCertificateTests(SNICase):
    """--test-certs: served as they are for their name; the default stays valid."""

    def test_expired_served_for_its_name(self) -> None:
        """A verifying client asking for expired.localhost finds it expired.

        The certificate served is the test file's; localhost still verifies.
        """
        daemon = sni_daemon()
        since = daemon.mark()
        client = TLSClient(
            daemon.port, client_context(shared_pki().ca_cert), server_hostname="expired.localhost"
        )
        self.addCleanup(client.close)
        with self.assertRaises(ssl.SSLCertVerificationError) as raised:
            client.handshake()
        self.assertIn("certificate has expired", str(raised.exception))
        client.flush()  # the client's alert, so the server learns why
        client.close()
        event = self.assert_closed_as(daemon, since, client.peer, "handshake_failed")
        self.assertIn("certificate expired", event["tls_error"])
        since = daemon.mark()
        seen = self.connect(daemon, "expired.localhost", unverified())
        test_file = daemon.directory / "test-certs" / "expired.localhost.pem"
        self.assertEqual(self.served(seen), der(test_file))
        self.echo_and_close(daemon, seen, since)
        since = daemon.mark()
        self.echo_and_close(daemon, self.connect(daemon, "localhost"), since)

    def test_openssl_reports_expired(self) -> None:
        """s_client -verify_return_error against expired.localhost stops at the expiry."""
        daemon = sni_daemon()
        since = daemon.mark()
        client = self.s_client(
            daemon,
            "-servername",
            "expired.localhost",
            "-verify_return_error",
            "-CAfile",
            str(shared_pki().ca_cert),
            "-quiet",
            "-no_ign_eof",
        )
        code, output, stderr = client.finish()
        self.assertNotEqual(code, 0, stderr)
        self.assertEqual(output, b"")
        self.assertIn("certificate has expired", stderr)
        daemon.wait_closed(since=since)

    def test_start_up_warning(self) -> None:
        """Start-up warns that test certificates are served, naming them."""
        daemon = sni_daemon()
        warning = daemon.wait_for_event(lambda e: e.get("event") == "test_certificates")
        self.assertEqual(warning["level"], "warn")
        self.assertEqual(warning["names"], ["expired.localhost"])
        self.assertEqual(warning["subject"], "CN=localhost")
        loaded = daemon.wait_for_event(lambda e: e.get("event") == "tls_context_loaded")
        self.assertEqual(loaded["test_certificates"], ["expired.localhost"])
        # Both real certificates live 2 days, inside the 14-day window; the expired
        # test certificate is never warned about.
        expiring = daemon.find_events(lambda e: e.get("event") == "certificate_expiring")
        self.assertEqual(
            sorted(e["subject"] for e in expiring), ["CN=localhost", "CN=other.example"]
        )


class CRLTests(SNICase):
    """--crl: a revoked client certificate is refused with certificate_revoked."""

    def test_openssl_revoked_client_refused(self) -> None:
        """s_client presenting the revoked certificate hears certificate_revoked.

        The record's tls_error says revoked and names the certificate.
        """
        daemon = crl_daemon()
        since = daemon.mark()
        client = self.s_client(
            daemon,
            "-CAfile",
            str(shared_pki().ca_cert),
            "-cert",
            str(daemon.directory / "revoked.pem"),
            "-key",
            str(daemon.directory / "revoked-key.pem"),
            "-quiet",
            "-no_ign_eof",
        )
        client.send(b"hello\n")
        self.assertEqual(client.read_until(1 << 20), b"")
        code, output, stderr = client.finish()
        self.assertNotEqual(code, 0, stderr)
        self.assertEqual(output, b"")
        self.assertIn("certificate revoked", stderr)
        event = self.assert_closed_as(daemon, since, None, "handshake_failed")
        self.assertIn("revoked", event["tls_error"])
        self.assertEqual(event["client_cert_subject"], "CN=revoked client")

    def test_python_revoked_refused_and_others_served(self) -> None:
        """Python's ssl with the revoked certificate is refused; an unrevoked one is served."""
        daemon = crl_daemon()
        pki = shared_pki()
        since = daemon.mark()
        revoked = (daemon.directory / "revoked.pem", daemon.directory / "revoked-key.pem")
        client = TLSClient(daemon.port, client_context(pki.ca_cert, cert=revoked))
        self.addCleanup(client.close)
        told = ""
        try:
            client.handshake()
            client.write(b"ping\n")
            client.flush()
            client.read_to_end()
        except ssl.SSLError as error:
            told = str(error).upper()
        self.assertIn("CERTIFICATE_REVOKED", told)
        event = self.assert_closed_as(daemon, since, client.peer, "handshake_failed")
        self.assertIn("revoked", event["tls_error"])
        since = daemon.mark()
        good = self.connect(
            daemon,
            "localhost",
            client_context(pki.ca_cert, cert=(pki.client_cert, pki.client_key)),
        )
        event = self.echo_and_close(daemon, good, since)
        self.assertEqual(event["client_cert_subject"], "CN=test client")


class ALPNTests(SNICase):
    """--alpn h2 --alpn http/1.1: the server's first protocol the client offers."""

    def test_openssl_server_preference(self) -> None:
        """s_client offering http/1.1 then h2 gets h2; the record's alpn says so."""
        daemon = sni_daemon()
        since = daemon.mark()
        client = self.s_client(
            daemon,
            "-CAfile",
            str(shared_pki().ca_cert),
            "-alpn",
            "http/1.1,h2",
            "-quiet",
            "-no_ign_eof",
        )
        client.send(b"alpn\n")
        self.assertEqual(client.read_until(5), b"alpn\n")
        code, _, stderr = client.finish()
        self.assertEqual(code, 0, stderr)
        event = daemon.wait_closed(since=since)
        self.assertEqual(event["alpn"], "h2")

    def test_python_offers(self) -> None:
        """Offering only http/1.1 selects it; offering nothing in common goes on without ALPN."""
        daemon = sni_daemon()
        for offered, selected in ((["http/1.1"], "http/1.1"), (["spdy/3", "foo"], None)):
            context = client_context(shared_pki().ca_cert)
            context.set_alpn_protocols(offered)
            since = daemon.mark()
            client = self.connect(daemon, "localhost", context)
            self.assertEqual(client.tls.selected_alpn_protocol(), selected)
            event = self.echo_and_close(daemon, client, since)
            self.assertEqual(event["alpn"], selected)


class ReloadTests(SNICase):
    """SIGHUP swaps one of two certificates for new connections."""

    def test_sighup_swaps_the_second_certificate(self) -> None:
        """After a new second pair and SIGHUP, its name gets the new certificate.

        The default one is unchanged, and tls_reloaded lists both.
        """
        pki = make_pki(Path(self.mktemp()).absolute())
        other = write_named_server(pki, "other", ("other.example",))
        args = [
            *("--cert", str(pki.server_cert), "--cert", str(other[0])),
            *("--key", str(pki.server_key), "--key", str(other[1])),
        ]
        daemon = start_daemon(self, pki.directory / "daemon", args)
        context = client_context(pki.ca_cert)
        old_other = der(other[0])
        since = daemon.mark()
        client = self.connect(daemon, "other.example", context)
        self.assertEqual(self.served(client), old_other)
        self.echo_and_close(daemon, client, since)
        write_named_server(pki, "other", ("other.example",))
        self.assertNotEqual(der(other[0]), old_other)
        since = daemon.mark()
        daemon.process.send_signal(signal.SIGHUP)
        reloaded = daemon.wait_for_event(lambda e: e.get("event") == "tls_reloaded", since=since)
        self.assertEqual(reloaded["trigger"], "SIGHUP")
        shown = [(c["subject"], c["sha256"]) for c in reloaded["certificates"]]
        self.assertEqual(
            shown,
            [
                ("CN=localhost", hashlib.sha256(der(pki.server_cert)).hexdigest()),
                ("CN=other.example", hashlib.sha256(der(other[0])).hexdigest()),
            ],
        )
        for name, expected in (
            ("other.example", der(other[0])),
            ("localhost", der(pki.server_cert)),
        ):
            since = daemon.mark()
            client = self.connect(daemon, name, context)
            self.assertEqual(self.served(client), expected, name)
            self.echo_and_close(daemon, client, since)
