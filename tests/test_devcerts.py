"""Tests for :mod:`secure_echo.tools.devcerts`: first-run certificates, reuse, repair, errors."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shlex
import stat
import threading
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from secure_echo.tls.policy import TLSSettings, load_and_validate
from secure_echo.tools import certgen, devcerts
from secure_echo.tools.devcerts import DevCerts, DevCertsError, ensure_dev_certs

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem")


def _snapshot(dev: DevCerts) -> dict[str, bytes]:
    return {name: (dev.directory / name).read_bytes() for name in FILES}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _assert_consistent(case: SynchronousTestCase, dev: DevCerts, at: datetime.datetime) -> None:
    """The server pair matches, chains to ca.pem for every dev name, and is valid at ``at``."""
    certgen.load_issued(dev.server_cert.read_bytes(), dev.server_key.read_bytes())
    store = Store([_certificate(dev.ca_cert)])
    for name in devcerts.DEV_NAMES:
        try:
            subject: x509.DNSName | x509.IPAddress = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            subject = x509.DNSName(name)
        verifier = PolicyBuilder().store(store).time(at).build_server_verifier(subject)
        chain = verifier.verify(_certificate(dev.server_cert), [])
        case.assertEqual(len(chain), 2)


class EnsureDevCertsTests(SynchronousTestCase):
    """Creating, reusing and repairing the development certificates."""

    def setUp(self) -> None:
        self.state = Path(self.mktemp())

    def test_first_run_creates_files(self) -> None:
        """The first call writes the four files into state/dev-ca and says it created them."""
        dev = ensure_dev_certs(self.state, now=T0)
        self.assertTrue(dev.created)
        self.assertEqual(dev.directory, self.state / "dev-ca")
        self.assertEqual(dev.ca_cert, dev.directory / "ca.pem")
        self.assertEqual(dev.server_cert, dev.directory / "server.pem")
        self.assertEqual(dev.server_key, dev.directory / "server-key.pem")
        for name in FILES:
            self.assertTrue((dev.directory / name).is_file(), name)
        _assert_consistent(self, dev, T0)

    def test_server_certificate_passes_the_daemons_checks(self) -> None:
        """The development certificate is a leaf for serverAuth: the load step takes it."""
        dev = ensure_dev_certs(self.state)
        loaded = load_and_validate(TLSSettings(dev.server_cert, dev.server_key))
        self.assertEqual(loaded.leaf, x509.load_pem_x509_certificate(dev.server_cert.read_bytes()))

    def test_modes(self) -> None:
        """The directory is 0700, keys 0600 and certificates 0644."""
        dev = ensure_dev_certs(self.state, now=T0)
        self.assertEqual(_mode(dev.directory), 0o700)
        self.assertEqual(_mode(dev.directory / "ca-key.pem"), 0o600)
        self.assertEqual(_mode(dev.server_key), 0o600)
        self.assertEqual(_mode(dev.ca_cert), 0o644)
        self.assertEqual(_mode(dev.server_cert), 0o644)

    def test_lifetimes(self) -> None:
        """The CA lasts a year and the server certificate 90 days from ``now``."""
        dev = ensure_dev_certs(self.state, now=T0)
        ca_end = _certificate(dev.ca_cert).not_valid_after_utc
        server_end = _certificate(dev.server_cert).not_valid_after_utc
        self.assertEqual(ca_end, T0 + datetime.timedelta(days=devcerts.CA_DAYS))
        self.assertEqual(server_end, T0 + datetime.timedelta(days=devcerts.SERVER_DAYS))

    def test_second_run_reuses(self) -> None:
        """A second call writes nothing: same bytes, ``created`` false."""
        first = ensure_dev_certs(self.state, now=T0)
        before = _snapshot(first)
        second = ensure_dev_certs(self.state, now=T0 + datetime.timedelta(days=30))
        self.assertFalse(second.created)
        self.assertEqual(_snapshot(second), before)
        self.assertEqual(second.ca_cert, first.ca_cert)

    def test_reuses_with_exactly_seven_days_left(self) -> None:
        """A server certificate with exactly RENEW_BEFORE left is still reused."""
        before = _snapshot(ensure_dev_certs(self.state, now=T0))
        at = T0 + datetime.timedelta(days=devcerts.SERVER_DAYS) - devcerts.RENEW_BEFORE
        dev = ensure_dev_certs(self.state, now=at)
        self.assertFalse(dev.created)
        self.assertEqual(_snapshot(dev), before)

    def test_reissues_expiring_server_certificate(self) -> None:
        """With under 7 days left the server pair is re-issued from the same CA."""
        before = _snapshot(ensure_dev_certs(self.state, now=T0))
        later = T0 + datetime.timedelta(days=devcerts.SERVER_DAYS - 6)
        dev = ensure_dev_certs(self.state, now=later)
        after = _snapshot(dev)
        self.assertTrue(dev.created)
        self.assertEqual(after["ca.pem"], before["ca.pem"])
        self.assertEqual(after["ca-key.pem"], before["ca-key.pem"])
        self.assertNotEqual(after["server.pem"], before["server.pem"])
        self.assertNotEqual(after["server-key.pem"], before["server-key.pem"])
        self.assertEqual(
            _certificate(dev.server_cert).not_valid_after_utc,
            later + datetime.timedelta(days=devcerts.SERVER_DAYS),
        )
        _assert_consistent(self, dev, later)

    def test_reissued_server_never_outlives_ca(self) -> None:
        """A server certificate re-issued late in the CA's life ends no later than the CA."""
        ensure_dev_certs(self.state, now=T0)
        later = T0 + datetime.timedelta(days=300)
        dev = ensure_dev_certs(self.state, now=later)
        ca_end = _certificate(dev.ca_cert).not_valid_after_utc
        server_end = _certificate(dev.server_cert).not_valid_after_utc
        self.assertLessEqual(server_end, ca_end)
        self.assertGreaterEqual(server_end - later, devcerts.RENEW_BEFORE)
        _assert_consistent(self, dev, later)

    def test_regenerates_expiring_ca(self) -> None:
        """With under 7 days left on the CA, everything is regenerated."""
        before = _snapshot(ensure_dev_certs(self.state, now=T0))
        later = T0 + datetime.timedelta(days=devcerts.CA_DAYS - 3)
        dev = ensure_dev_certs(self.state, now=later)
        after = _snapshot(dev)
        self.assertTrue(dev.created)
        for name in FILES:
            self.assertNotEqual(after[name], before[name], name)
        _assert_consistent(self, dev, later)

    def test_every_ca_has_its_own_subject(self) -> None:
        """Each development CA made, here or elsewhere, has a subject no other CA has."""
        first = _certificate(ensure_dev_certs(self.state, now=T0).ca_cert).subject
        elsewhere = ensure_dev_certs(Path(self.mktemp()), now=T0)
        later = T0 + datetime.timedelta(days=devcerts.CA_DAYS - 3)
        renewed = _certificate(ensure_dev_certs(self.state, now=later).ca_cert).subject
        subjects = {first, _certificate(elsewhere.ca_cert).subject, renewed}
        self.assertEqual(len(subjects), 3)
        for subject in subjects:
            common = str(subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)
            self.assertTrue(common.startswith(devcerts.CA_COMMON_NAME + " 20"), common)
        self.assertEqual(
            _certificate(elsewhere.server_cert).issuer, _certificate(elsewhere.ca_cert).subject
        )

    def test_regenerates_not_yet_valid(self) -> None:
        """Certificates from the future (the clock went back) are replaced."""
        before = _snapshot(ensure_dev_certs(self.state, now=T0))
        dev = ensure_dev_certs(self.state, now=T0 - datetime.timedelta(days=1))
        self.assertTrue(dev.created)
        self.assertNotEqual(_snapshot(dev)["ca.pem"], before["ca.pem"])

    def test_corrupt_server_certificate(self) -> None:
        """A corrupt server.pem is re-issued from the existing CA."""
        dev = ensure_dev_certs(self.state, now=T0)
        before = _snapshot(dev)
        dev.server_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
        again = ensure_dev_certs(self.state, now=T0)
        self.assertTrue(again.created)
        self.assertEqual(_snapshot(again)["ca.pem"], before["ca.pem"])
        _assert_consistent(self, again, T0)

    def test_missing_server_key(self) -> None:
        """A missing server key gets a new server pair from the existing CA."""
        dev = ensure_dev_certs(self.state, now=T0)
        before = _snapshot(dev)
        dev.server_key.unlink()
        again = ensure_dev_certs(self.state, now=T0)
        self.assertTrue(again.created)
        self.assertEqual(_snapshot(again)["ca.pem"], before["ca.pem"])
        _assert_consistent(self, again, T0)

    def test_mismatched_server_key(self) -> None:
        """A server key that does not belong to server.pem gets a new server pair."""
        dev = ensure_dev_certs(self.state, now=T0)
        stranger = certgen.make_ca("stranger", now=T0)
        certgen.write_private(dev.server_key, stranger.key_pem())
        again = ensure_dev_certs(self.state, now=T0)
        self.assertTrue(again.created)
        _assert_consistent(self, again, T0)

    def test_server_from_another_ca(self) -> None:
        """A valid server pair signed by some other CA is replaced by one from ca.pem."""
        dev = ensure_dev_certs(self.state, now=T0)
        other = certgen.make_ca("other", now=T0)
        certgen.write_pair(
            certgen.issue_server(other, devcerts.DEV_NAMES, now=T0),
            dev.server_cert,
            dev.server_key,
        )
        again = ensure_dev_certs(self.state, now=T0)
        self.assertTrue(again.created)
        _assert_consistent(self, again, T0)

    def test_server_missing_a_name(self) -> None:
        """A server certificate that lacks one of the development names is re-issued."""
        dev = ensure_dev_certs(self.state, now=T0)
        ca = certgen.load_issued(
            dev.ca_cert.read_bytes(), (dev.directory / "ca-key.pem").read_bytes()
        )
        certgen.write_pair(
            certgen.issue_server(ca, ("localhost",), now=T0), dev.server_cert, dev.server_key
        )
        again = ensure_dev_certs(self.state, now=T0)
        self.assertTrue(again.created)
        _assert_consistent(self, again, T0)

    def test_readable_server_key_replaced(self) -> None:
        """A server key readable by others is treated as exposed: a new 0600 pair is issued."""
        dev = ensure_dev_certs(self.state, now=T0)
        old_key = dev.server_key.read_bytes()
        dev.server_key.chmod(0o644)
        again = ensure_dev_certs(self.state, now=T0)
        self.assertTrue(again.created)
        self.assertNotEqual(again.server_key.read_bytes(), old_key)
        self.assertEqual(_mode(again.server_key), 0o600)

    def test_corrupt_ca(self) -> None:
        """A corrupt ca.pem regenerates everything."""
        dev = ensure_dev_certs(self.state, now=T0)
        before = _snapshot(dev)
        dev.ca_cert.write_bytes(b"not a certificate")
        again = ensure_dev_certs(self.state, now=T0)
        after = _snapshot(again)
        self.assertTrue(again.created)
        self.assertNotEqual(after["ca-key.pem"], before["ca-key.pem"])
        self.assertNotEqual(after["server.pem"], before["server.pem"])
        _assert_consistent(self, again, T0)

    def test_missing_ca_key(self) -> None:
        """Without the CA key nothing can be re-issued, so everything is regenerated."""
        dev = ensure_dev_certs(self.state, now=T0)
        before = _snapshot(dev)
        (dev.directory / "ca-key.pem").unlink()
        again = ensure_dev_certs(self.state, now=T0)
        self.assertNotEqual(_snapshot(again)["ca.pem"], before["ca.pem"])
        _assert_consistent(self, again, T0)

    def test_leaf_posing_as_ca(self) -> None:
        """A ca.pem that is not a CA certificate (CA:FALSE) regenerates everything."""
        dev = ensure_dev_certs(self.state, now=T0)
        before = _snapshot(dev)
        (dev.directory / "ca.pem").write_bytes(before["server.pem"])
        certgen.write_private(dev.directory / "ca-key.pem", before["server-key.pem"])
        again = ensure_dev_certs(self.state, now=T0)
        self.assertTrue(again.created)
        _assert_consistent(self, again, T0)

    def test_tightens_directory_mode(self) -> None:
        """An existing dev-ca directory readable by others is tightened to 0700."""
        directory = self.state / "dev-ca"
        directory.mkdir(parents=True)
        directory.chmod(0o755)
        ensure_dev_certs(self.state, now=T0)
        self.assertEqual(_mode(directory), 0o700)

    def test_concurrent_first_runs(self) -> None:
        """Simultaneous first runs leave one consistent set that a later call reuses.

        Without the lock, about half of such rounds leave a server certificate
        from one run next to a CA from another; three rounds make a miss unlikely.
        """
        for round_ in range(3):
            state = self.state / str(round_)
            errors: list[BaseException] = []

            def run(state: Path = state, errors: list[BaseException] = errors) -> None:
                try:
                    ensure_dev_certs(state, now=T0)
                except BaseException as error:  # reported below, in the test's thread
                    errors.append(error)

            threads = [threading.Thread(target=run) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.assertEqual(errors, [])
            dev = ensure_dev_certs(state, now=T0)
            self.assertFalse(dev.created)
            _assert_consistent(self, dev, T0)
            leftovers = [p.name for p in dev.directory.iterdir() if p.name not in FILES]
            self.assertEqual(leftovers, [".lock"])

    def test_naive_now_rejected(self) -> None:
        """A naive ``now`` is a programming error: ValueError."""
        naive = datetime.datetime(2030, 1, 1)  # noqa: DTZ001 - naive on purpose
        self.assertRaises(ValueError, ensure_dev_certs, self.state, now=naive)


class ErrorTests(SynchronousTestCase):
    """Filesystem failures become one-line DevCertsError messages."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()

    def _assert_one_line(self, error: DevCertsError, *fragments: str) -> None:
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn("set --state-dir to a writable directory or pass --cert/--key", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertIsInstance(error.__cause__, OSError)

    def test_parent_is_a_file(self) -> None:
        """A state directory below a regular file fails with 'not a directory'."""
        blocker = self.base / "file"
        blocker.write_bytes(b"")
        error = self.assertRaises(DevCertsError, ensure_dev_certs, blocker / "state", now=T0)
        self._assert_one_line(error, str(blocker / "state" / "dev-ca"), "not a directory")

    def test_dev_ca_is_a_file(self) -> None:
        """A regular file where dev-ca should be is named in the error."""
        (self.base / "dev-ca").write_bytes(b"")
        error = self.assertRaises(DevCertsError, ensure_dev_certs, self.base, now=T0)
        self._assert_one_line(error, "exists and is not a directory")

    def test_unwritable_directory(self) -> None:
        """An unwritable state directory fails with 'permission denied'."""
        self.base.chmod(0o500)
        self.addCleanup(self.base.chmod, 0o700)
        try:
            (self.base / "probe").mkdir()
        except PermissionError:
            pass
        else:
            raise SkipTest("this process ignores permissions (root or CAP_DAC_OVERRIDE)")
        error = self.assertRaises(DevCertsError, ensure_dev_certs, self.base, now=T0)
        self._assert_one_line(error, str(self.base / "dev-ca"), "permission denied")

    def test_write_failure(self) -> None:
        """A failure while writing a file (here a simulated EACCES) is a DevCertsError."""

        def refuse(path: Path, _data: bytes) -> None:
            raise PermissionError(13, "Permission denied", str(path))

        self.patch(certgen, "write_private", refuse)
        error = self.assertRaises(DevCertsError, ensure_dev_certs, self.base, now=T0)
        self._assert_one_line(error, str(self.base / "dev-ca"), "permission denied")

    def test_directory_of_another_user(self) -> None:
        """A dev-ca directory owned by another user is refused, not used."""
        directory = self.base / "dev-ca"
        directory.mkdir()
        directory.chmod(0o755)
        try:
            os.chown(directory, 65534, 65534)
        except PermissionError:
            raise SkipTest("only root can give a directory to another user") from None
        error = self.assertRaises(DevCertsError, ensure_dev_certs, self.base, now=T0)
        self._assert_one_line(error, "owned by another user")
        self.assertEqual(list(directory.iterdir()), [])


class DefaultStateDirTests(SynchronousTestCase):
    """Choosing the state directory from the environment."""

    def _with_environment(self, **variables: str) -> Path:
        self.patch(os, "environ", dict(variables))
        return devcerts.default_state_dir()

    def test_systemd_state_directory(self) -> None:
        """$STATE_DIRECTORY wins over everything else."""
        found = self._with_environment(
            STATE_DIRECTORY="/var/lib/secure-echo", XDG_STATE_HOME="/x", HOME="/h"
        )
        self.assertEqual(found, Path("/var/lib/secure-echo"))

    def test_systemd_first_of_several(self) -> None:
        """With several StateDirectory= entries the first one is used."""
        found = self._with_environment(STATE_DIRECTORY="/var/lib/a:/var/lib/b")
        self.assertEqual(found, Path("/var/lib/a"))

    def test_xdg_state_home(self) -> None:
        """Without $STATE_DIRECTORY, $XDG_STATE_HOME/secure-echo is used."""
        found = self._with_environment(STATE_DIRECTORY="", XDG_STATE_HOME="/x", HOME="/h")
        self.assertEqual(found, Path("/x/secure-echo"))

    def test_relative_xdg_ignored(self) -> None:
        """A relative $XDG_STATE_HOME is ignored, as the XDG spec requires."""
        found = self._with_environment(XDG_STATE_HOME="relative", HOME="/h")
        self.assertEqual(found, Path("/h/.local/state/secure-echo"))

    def test_home_fallback(self) -> None:
        """Otherwise ~/.local/state/secure-echo is used."""
        found = self._with_environment(HOME="/home/alice")
        self.assertEqual(found, Path("/home/alice/.local/state/secure-echo"))


class ClientCommandTests(SynchronousTestCase):
    """The commands printed for a first connection."""

    def _lines(self, *args: object, **kwargs: Path) -> list[list[str]]:
        text = devcerts.client_command(*args, **kwargs)  # type: ignore[arg-type]
        return [shlex.split(line) for line in text.splitlines()]

    def test_ipv4(self) -> None:
        """An IPv4 address: host:port, the CA, and an IP check for openssl."""
        client, openssl = self._lines(Path("/s/ca.pem"), "127.0.0.1", 8443)
        self.assertEqual(client, ["secure-echo-client", "127.0.0.1:8443", "--ca", "/s/ca.pem"])
        self.assertEqual(
            openssl,
            [
                "openssl",
                "s_client",
                "-connect",
                "127.0.0.1:8443",
                "-CAfile",
                "/s/ca.pem",
                "-verify_ip",
                "127.0.0.1",
                "-verify_return_error",
                "-quiet",
                "-no_ign_eof",
            ],
        )

    def test_ipv6_bracketed(self) -> None:
        """An IPv6 address is bracketed in host:port."""
        client, openssl = self._lines(Path("/s/ca.pem"), "::1", 8443)
        self.assertEqual(client[1], "[::1]:8443")
        self.assertIn("[::1]:8443", openssl)
        self.assertIn("::1", openssl[openssl.index("-verify_ip") + 1])

    def test_host_name(self) -> None:
        """A host name is sent as SNI and checked against the certificate."""
        _, openssl = self._lines(Path("/s/ca.pem"), "localhost", 9000)
        self.assertIn("localhost:9000", openssl)
        self.assertEqual(openssl[openssl.index("-servername") + 1], "localhost")
        self.assertEqual(openssl[openssl.index("-verify_hostname") + 1], "localhost")

    def test_wildcard_becomes_loopback(self) -> None:
        """0.0.0.0 and :: (listen-everywhere addresses) become the loopback address."""
        self.assertEqual(self._lines(Path("/c"), "0.0.0.0", 1)[0][1], "127.0.0.1:1")  # noqa: S104
        self.assertEqual(self._lines(Path("/c"), "::", 1)[0][1], "[::1]:1")

    def test_paths_quoted(self) -> None:
        """A path with spaces and quotes survives the shell as one argument."""
        awkward = Path("/tmp/it's a dir/ca.pem")
        text = devcerts.client_command(awkward, "127.0.0.1", 8443)
        client, openssl = (shlex.split(line) for line in text.splitlines())
        self.assertEqual(client[3], str(awkward))
        self.assertEqual(openssl[openssl.index("-CAfile") + 1], str(awkward))

    def test_client_certificate(self) -> None:
        """With ``cert`` and ``key`` both commands present the client certificate."""
        client, openssl = self._lines(
            Path("/s/ca.pem"), "127.0.0.1", 8443, cert=Path("/s/c.pem"), key=Path("/s/k.pem")
        )
        self.assertEqual(client[-4:], ["--cert", "/s/c.pem", "--key", "/s/k.pem"])
        self.assertEqual(openssl[openssl.index("-cert") + 1], "/s/c.pem")
        self.assertEqual(openssl[openssl.index("-key") + 1], "/s/k.pem")
