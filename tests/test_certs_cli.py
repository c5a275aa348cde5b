"""Tests for :mod:`secure_echo.tools.certs_cli`, the ``secure-echo-certs`` command."""

from __future__ import annotations

import datetime
import io
import ipaddress
import shlex
import stat
import sys
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls.material import load_test_certs
from secure_echo.tls.policy import TLSConfigError, TLSSettings, load_and_validate
from secure_echo.tools import badssl, certgen
from secure_echo.tools.certs_cli import main
from tests.test_badssl import HandshakeRefusedError, handshake

INIT_FILES = (
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
)


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


class _CLITestCase(SynchronousTestCase):
    """Runs ``main`` with stdout and stderr captured."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def run_cli(self, *argv: str) -> int:
        self.stdout.seek(0)
        self.stdout.truncate()
        self.stderr.seek(0)
        self.stderr.truncate()
        return main(list(argv))

    def assert_error(self, status: int, *fragments: str) -> None:
        """``status`` is 1 with one ``secure-echo-certs: error:`` line and no traceback."""
        self.assertEqual(status, 1)
        message = self.stderr.getvalue()
        self.assertEqual(message.count("\n"), 1, message)
        self.assertTrue(message.startswith("secure-echo-certs: error: "), message)
        self.assertNotIn("Traceback", message)
        for fragment in fragments:
            self.assertIn(fragment, message)


class InitTests(_CLITestCase):
    """``secure-echo-certs init DIR``."""

    def test_writes_files_with_modes(self) -> None:
        """The init command creates DIR 0700 with six files: keys 0600, certificates 0644."""
        self.assertEqual(self.run_cli("init", str(self.directory)), 0)
        self.assertEqual(sorted(p.name for p in self.directory.iterdir()), sorted(INIT_FILES))
        self.assertEqual(_mode(self.directory), 0o700)
        for name in INIT_FILES:
            expected = 0o600 if name.endswith("-key.pem") else 0o644
            self.assertEqual(_mode(self.directory / name), expected, name)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_pairs_match_and_chain(self) -> None:
        """Every key matches its certificate and the server verifies for each default name."""
        self.run_cli("init", str(self.directory))
        for stem in ("ca", "server", "client"):
            certgen.load_issued(
                (self.directory / f"{stem}.pem").read_bytes(),
                (self.directory / f"{stem}-key.pem").read_bytes(),
            )
        ca = _certificate(self.directory / "ca.pem")
        server = _certificate(self.directory / "server.pem")
        now = datetime.datetime.now(datetime.UTC)
        for name in (
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ):
            verifier = PolicyBuilder().store(Store([ca])).time(now).build_server_verifier(name)
            verifier.verify(server, [])

    def test_client_certificate(self) -> None:
        """The client certificate has the default CN and EKU clientAuth."""
        self.run_cli("init", str(self.directory))
        client = _certificate(self.directory / "client.pem")
        cn = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(cn, "secure-echo client")
        eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])

    def test_options(self) -> None:
        """--server-name (repeatable) replaces the names, --client-name and --days apply."""
        status = self.run_cli(
            "init",
            str(self.directory),
            "--server-name",
            "echo.example.test",
            "--server-name",
            "10.0.0.7",
            "--client-name",
            "alice",
            "--days",
            "3",
        )
        self.assertEqual(status, 0)
        server = _certificate(self.directory / "server.pem")
        san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["echo.example.test"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("10.0.0.7")]
        )
        lifetime = server.not_valid_after_utc - server.not_valid_before_utc
        self.assertEqual(lifetime, datetime.timedelta(days=3) + certgen.CLOCK_SKEW)
        client = _certificate(self.directory / "client.pem")
        self.assertEqual(
            client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "alice"
        )
        ca = _certificate(self.directory / "ca.pem")
        self.assertGreaterEqual(ca.not_valid_after_utc, server.not_valid_after_utc)

    def test_server_certificate_passes_the_daemons_checks(self) -> None:
        """The server certificate of init loads as --cert; its client certificate would not.

        The daemon refuses a --cert without serverAuth or with CA:TRUE, so what init
        prints as the twistd command must start.
        """
        self.run_cli("init", str(self.directory))
        root = self.directory
        loaded = load_and_validate(TLSSettings(root / "server.pem", root / "server-key.pem"))
        self.assertEqual(loaded.subject, "CN=localhost")
        for cert, key in (("client.pem", "client-key.pem"), ("ca.pem", "ca-key.pem")):
            self.assertRaises(
                TLSConfigError, load_and_validate, TLSSettings(root / cert, root / key)
            )

    def test_prints_usage(self) -> None:
        """The output gives the twistd command with --client-ca and both client commands."""
        self.run_cli("init", str(self.directory))
        root = self.directory.absolute()
        lines = self.stdout.getvalue().splitlines()
        commands = [shlex.split(line) for line in lines if line.startswith("  ") and " -" in line]
        self.assertIn(
            [
                "twistd",
                "-n",
                "--pidfile=",
                "secure-echo",
                "--cert",
                str(root / "server.pem"),
                "--key",
                str(root / "server-key.pem"),
                "--client-ca",
                str(root / "ca.pem"),
            ],
            commands,
        )
        client = next(c for c in commands if c[0] == "secure-echo-client")
        self.assertEqual(
            client[1:],
            [
                "127.0.0.1:8443",
                "--ca",
                str(root / "ca.pem"),
                "--cert",
                str(root / "client.pem"),
                "--key",
                str(root / "client-key.pem"),
            ],
        )
        self.assertTrue(any(c[:2] == ["openssl", "s_client"] for c in commands))

    def test_each_ca_has_its_own_subject(self) -> None:
        """Two inits make two CAs whose subjects differ: base name, date and a random tag."""
        other = Path(self.mktemp())
        self.run_cli("init", str(self.directory))
        self.run_cli("init", str(other))
        first = _certificate(self.directory / "ca.pem").subject
        second = _certificate(other / "ca.pem").subject
        self.assertNotEqual(first, second)
        common = first.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertTrue(str(common).startswith("secure-echo test CA 20"), common)
        server = _certificate(self.directory / "server.pem")
        self.assertEqual(server.issuer, first)

    def test_prints_the_commands_for_more_certificates(self) -> None:
        """The output ends with the commands that issue more certificates from this CA."""
        self.run_cli("init", str(self.directory))
        root = shlex.quote(str(self.directory.absolute()))
        output = self.stdout.getvalue()
        self.assertIn(f"secure-echo-certs server NAME... --ca {root}", output)
        self.assertIn(f"secure-echo-certs client NAME --ca {root}", output)

    def test_refuses_to_overwrite(self) -> None:
        """A second init fails with status 1, names the files and changes nothing."""
        self.run_cli("init", str(self.directory))
        before = _snapshot(self.directory)
        status = self.run_cli("init", str(self.directory))
        self.assert_error(status, "refusing to overwrite", "ca-key.pem", "--force")
        self.assertEqual(_snapshot(self.directory), before)

    def test_one_existing_file_blocks_all(self) -> None:
        """If any one target exists, nothing at all is written."""
        self.directory.mkdir()
        (self.directory / "client-key.pem").write_bytes(b"precious")
        status = self.run_cli("init", str(self.directory))
        self.assert_error(status, "client-key.pem")
        self.assertEqual(_snapshot(self.directory), {"client-key.pem": b"precious"})

    def test_force_overwrites(self) -> None:
        """With --force every file is replaced by a fresh one."""
        self.run_cli("init", str(self.directory))
        before = _snapshot(self.directory)
        self.assertEqual(self.run_cli("init", str(self.directory), "--force"), 0)
        after = _snapshot(self.directory)
        for name in INIT_FILES:
            self.assertNotEqual(after[name], before[name], name)

    def test_unwritable_location(self) -> None:
        """A directory that cannot be created is status 1 with one line, no traceback."""
        blocker = Path(self.mktemp())
        blocker.write_bytes(b"")
        status = self.run_cli("init", str(blocker / "certs"))
        self.assert_error(status, "not a directory")

    def test_directory_is_a_file(self) -> None:
        """DIR being a regular file is reported as such."""
        self.directory.write_bytes(b"")
        status = self.run_cli("init", str(self.directory))
        self.assert_error(status, "exists and is not a directory")

    def test_ca_shorter_than_leaves(self) -> None:
        """--ca-days below --days is refused: a leaf cannot outlive its CA."""
        status = self.run_cli("init", str(self.directory), "--days", "30", "--ca-days", "10")
        self.assert_error(status, "--ca-days 10")
        self.assertFalse(self.directory.exists())

    def test_usage_errors(self) -> None:
        """Bad option values are usage errors (status 2) and write nothing."""
        for argv in (
            ["init", str(self.directory), "--days", "0"],
            ["init", str(self.directory), "--days", "soon"],
            ["init", str(self.directory), "--server-name", "bad name"],
            ["init", str(self.directory), "--client-name", ""],
            ["init"],
            [],
        ):
            self.assertEqual(self.run_cli(*argv), 2, argv)
            self.assertIn("usage:", self.stderr.getvalue())
        self.assertFalse(self.directory.exists())

    def test_help(self) -> None:
        """--help prints the help and returns 0."""
        self.assertEqual(self.run_cli("init", "--help"), 0)
        self.assertIn("--server-name", self.stdout.getvalue())


class ClientTests(_CLITestCase):
    """``secure-echo-certs client DIR --name CN``."""

    def setUp(self) -> None:
        super().setUp()
        self.assertEqual(self.run_cli("init", str(self.directory)), 0)

    def test_issues_from_existing_ca(self) -> None:
        """The new client certificate verifies against ca.pem and carries the SANs given."""
        status = self.run_cli(
            "client",
            str(self.directory),
            "--name",
            "Alice Example",
            "--dns",
            "alice.example.test",
            "--uri",
            "spiffe://example.test/alice",
        )
        self.assertEqual(status, 0)
        cert_path = self.directory / "client-alice-example.pem"
        key_path = self.directory / "client-alice-example-key.pem"
        self.assertEqual((_mode(cert_path), _mode(key_path)), (0o644, 0o600))
        issued = certgen.load_issued(cert_path.read_bytes(), key_path.read_bytes())
        ca = _certificate(self.directory / "ca.pem")
        verifier = PolicyBuilder().store(Store([ca])).time(datetime.datetime.now(datetime.UTC))
        verified = verifier.build_client_verifier().verify(issued.certificate, [])
        self.assertEqual(
            verified.subjects,
            [
                x509.DNSName("alice.example.test"),
                x509.UniformResourceIdentifier("spiffe://example.test/alice"),
            ],
        )
        self.assertIn(str(cert_path.absolute()), self.stdout.getvalue())

    def test_out_stem(self) -> None:
        """--out names the files."""
        self.assertEqual(
            self.run_cli("client", str(self.directory), "--name", "bob", "--out", "bob"), 0
        )
        self.assertTrue((self.directory / "bob.pem").is_file())
        self.assertTrue((self.directory / "bob-key.pem").is_file())

    def test_refuses_to_overwrite(self) -> None:
        """Issuing the same name twice needs --force."""
        self.run_cli("client", str(self.directory), "--name", "bob")
        before = _snapshot(self.directory)
        status = self.run_cli("client", str(self.directory), "--name", "bob")
        self.assert_error(status, "client-bob.pem")
        self.assertEqual(_snapshot(self.directory), before)
        self.assertEqual(
            self.run_cli("client", str(self.directory), "--name", "bob", "--force"), 0
        )
        self.assertNotEqual(_snapshot(self.directory), before)

    def test_no_ca(self) -> None:
        """Without a CA in DIR the error says to run init first."""
        empty = Path(self.mktemp())
        status = self.run_cli("client", str(empty), "--name", "bob")
        self.assert_error(status, "ca.pem", "init")

    def test_corrupt_ca(self) -> None:
        """A CA key that does not match ca.pem is reported, not used."""
        other = certgen.make_ca("other")
        certgen.write_private(self.directory / "ca-key.pem", other.key_pem())
        status = self.run_cli("client", str(self.directory), "--name", "bob")
        self.assert_error(status, "not a usable CA", "does not match")

    def test_days_beyond_ca(self) -> None:
        """A client certificate that would outlive the CA is refused."""
        status = self.run_cli("client", str(self.directory), "--name", "bob", "--days", "400")
        self.assert_error(status, "--days 400", "expires")
        self.assertFalse((self.directory / "client-bob.pem").exists())

    def test_expired_ca(self) -> None:
        """An expired CA is refused with the fix."""
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        old = certgen.make_ca("old", days=1, now=past)
        certgen.write_pair(old, self.directory / "ca.pem", self.directory / "ca-key.pem")
        status = self.run_cli("client", str(self.directory), "--name", "bob")
        self.assert_error(status, "expired", "init --force")

    def test_bad_values(self) -> None:
        """A relative URI, a bad stem or a missing --name are usage errors."""
        for argv in (
            ["--name", "bob", "--uri", "not a uri"],
            ["--name", "bob", "--out", "../escape"],
            ["--name", "x" * 65],
            [],
        ):
            self.assertEqual(self.run_cli("client", str(self.directory), *argv), 2, argv)


class ClientWithCAOptionTests(_CLITestCase):
    """``secure-echo-certs client NAME --ca DIR [--uri URI]``, the form that names the CA."""

    def setUp(self) -> None:
        super().setUp()
        self.assertEqual(self.run_cli("init", str(self.directory)), 0)

    def test_issues_from_the_ca_directory(self) -> None:
        """NAME is the common name; the files go into DIR; the URI is a SAN."""
        status = self.run_cli(
            "client",
            "carol",
            "--ca",
            str(self.directory),
            "--uri",
            "spiffe://example.test/carol",
        )
        self.assertEqual(status, 0, self.stderr.getvalue())
        cert_path = self.directory / "client-carol.pem"
        issued = certgen.load_issued(
            cert_path.read_bytes(), (self.directory / "client-carol-key.pem").read_bytes()
        )
        common = issued.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual(common[0].value, "carol")
        ca = _certificate(self.directory / "ca.pem")
        verifier = PolicyBuilder().store(Store([ca])).time(datetime.datetime.now(datetime.UTC))
        verified = verifier.build_client_verifier().verify(issued.certificate, [])
        self.assertEqual(
            verified.subjects, [x509.UniformResourceIdentifier("spiffe://example.test/carol")]
        )
        eku = issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])

    def test_both_forms_make_the_same_files(self) -> None:
        """``client DIR --name CN`` still works and names its files like the new form."""
        self.assertEqual(self.run_cli("client", str(self.directory), "--name", "dave"), 0)
        self.assertTrue((self.directory / "client-dave.pem").is_file())
        status = self.run_cli("client", "dave", "--ca", str(self.directory))
        self.assert_error(status, "client-dave.pem", "--force")

    def test_ambiguous_or_incomplete(self) -> None:
        """--ca with --name, or neither, is a usage error (status 2) that says which form."""
        for argv in (
            ["client", "erin", "--ca", str(self.directory), "--name", "erin"],
            ["client", str(self.directory)],
        ):
            self.assertEqual(self.run_cli(*argv), 2, argv)
            self.assertIn("client NAME --ca DIR", self.stderr.getvalue())

    def test_no_ca_there(self) -> None:
        """A --ca directory without a CA says to run init."""
        status = self.run_cli("client", "erin", "--ca", self.mktemp())
        self.assert_error(status, "ca.pem", "init")


class ServerTests(_CLITestCase):
    """``secure-echo-certs server NAME... --ca DIR``."""

    def setUp(self) -> None:
        super().setUp()
        self.assertEqual(self.run_cli("init", str(self.directory)), 0)

    def test_issues_a_server_certificate(self) -> None:
        """Every NAME is a SAN, the first is the CN and names the files; it verifies."""
        status = self.run_cli(
            "server", "echo.example.test", "10.0.0.9", "--ca", str(self.directory), "--days", "5"
        )
        self.assertEqual(status, 0, self.stderr.getvalue())
        cert_path = self.directory / "server-echo-example-test.pem"
        key_path = self.directory / "server-echo-example-test-key.pem"
        self.assertEqual((_mode(cert_path), _mode(key_path)), (0o644, 0o600))
        issued = certgen.load_issued(cert_path.read_bytes(), key_path.read_bytes())
        cert = issued.certificate
        common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual(common[0].value, "echo.example.test")
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertEqual(
            cert.not_valid_after_utc - cert.not_valid_before_utc,
            datetime.timedelta(days=5) + certgen.CLOCK_SKEW,
        )
        ca = _certificate(self.directory / "ca.pem")
        now = datetime.datetime.now(datetime.UTC)
        for name in (
            x509.DNSName("echo.example.test"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.9")),
        ):
            verifier = PolicyBuilder().store(Store([ca])).time(now).build_server_verifier(name)
            verifier.verify(cert, [])
        output = self.stdout.getvalue()
        self.assertIn(str(cert_path.absolute()), output)
        self.assertIn("--pidfile=", output)

    def test_out_and_force(self) -> None:
        """--out names the files; issuing them again needs --force."""
        argv = ["server", "a.test", "--ca", str(self.directory), "--out", "edge"]
        self.assertEqual(self.run_cli(*argv), 0)
        self.assertTrue((self.directory / "edge.pem").is_file())
        self.assertTrue((self.directory / "edge-key.pem").is_file())
        self.assert_error(self.run_cli(*argv), "edge.pem", "--force")
        self.assertEqual(self.run_cli(*argv, "--force"), 0)

    def test_refusals(self) -> None:
        """No CA, a leaf outliving the CA: status 1 with the reason."""
        self.assert_error(self.run_cli("server", "a.test", "--ca", self.mktemp()), "init")
        status = self.run_cli("server", "a.test", "--ca", str(self.directory), "--days", "999")
        self.assert_error(status, "--days 999", "expires")

    def test_usage_errors(self) -> None:
        """No name, a bad name or no --ca are usage errors (status 2)."""
        for argv in (
            ["server", "--ca", str(self.directory)],
            ["server", "bad name", "--ca", str(self.directory)],
            ["server", "a.test"],
        ):
            self.assertEqual(self.run_cli(*argv), 2, argv)


class BadsslTests(_CLITestCase):
    """``secure-echo-certs badssl DIR``."""

    def test_writes_the_set(self) -> None:
        """DIR gets ca.pem, its key 0600, one .pem/.key pair per case and a README.txt."""
        self.assertEqual(self.run_cli("badssl", str(self.directory)), 0, self.stderr.getvalue())
        names = sorted(p.name for p in self.directory.iterdir())
        expected = ["README.txt", "ca-key.pem", "ca.pem"]
        for case in badssl.CASES:
            expected += [f"{case.server_name}.key", f"{case.server_name}.pem"]
        self.assertEqual(names, sorted(expected))
        self.assertEqual(_mode(self.directory), 0o700)
        self.assertEqual(_mode(self.directory / "ca-key.pem"), 0o600)
        for case in badssl.CASES:
            self.assertEqual(_mode(self.directory / f"{case.server_name}.key"), 0o600)
            self.assertEqual(_mode(self.directory / f"{case.server_name}.pem"), 0o644)
            certgen.load_issued(
                (self.directory / f"{case.server_name}.pem").read_bytes(),
                (self.directory / f"{case.server_name}.key").read_bytes(),
            )
        readme = (self.directory / "README.txt").read_text()
        for case in badssl.CASES:
            self.assertIn(case.expectation, readme)

    def test_verdicts_from_the_written_files(self) -> None:
        """The files as written get their verdicts from a verifying client trusting ca.pem."""
        self.run_cli("badssl", str(self.directory))
        ca = self.directory / "ca.pem"
        for case in badssl.CASES:
            cert = self.directory / f"{case.server_name}.pem"
            key = self.directory / f"{case.server_name}.key"
            if case.verify_code is None:
                self.assertEqual(handshake(cert, key, ca, case.server_name), "TLSv1.3")
                continue
            with self.assertRaises(HandshakeRefusedError) as caught:
                handshake(cert, key, ca, case.server_name)
            self.assertEqual(caught.exception.verify_code, case.verify_code, case.name)

    def test_the_daemon_serves_each_case_by_its_name(self) -> None:
        """The daemon's --test-certs loader finds each case under its SNI name, not the CA."""
        self.run_cli("badssl", str(self.directory))
        loaded = load_test_certs(self.directory)
        self.assertEqual(
            sorted(test.name for test in loaded),
            sorted(case.server_name for case in badssl.CASES),
        )

    def test_prints_how_to_serve_and_test(self) -> None:
        """The summary names each case and gives the daemon and client commands."""
        self.run_cli("badssl", str(self.directory))
        output = self.stdout.getvalue()
        root = shlex.quote(str(self.directory.absolute()))
        self.assertIn(f"twistd -n --pidfile= secure-echo --test-certs {root}", output)
        self.assertIn("--servername expired.localhost", output)
        for case in badssl.CASES:
            self.assertIn(case.server_name, output)

    def test_refuses_to_overwrite(self) -> None:
        """A second run needs --force and changes nothing without it; the CA is new with it."""
        self.run_cli("badssl", str(self.directory))
        before = _snapshot(self.directory)
        self.assert_error(self.run_cli("badssl", str(self.directory)), "--force")
        self.assertEqual(_snapshot(self.directory), before)
        self.assertEqual(self.run_cli("badssl", str(self.directory), "--force"), 0)
        self.assertNotEqual(_snapshot(self.directory)["ca.pem"], before["ca.pem"])
