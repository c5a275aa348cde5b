"""Tests for :mod:`secure_echo.daemon.reload`: one-transaction reloads, SIGHUP and file polling."""

from __future__ import annotations

import datetime
import os
import signal
import ssl
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.daemon.reload import ReloadService, TLSReloader, files_of
from secure_echo.tls.material import load_tls
from secure_echo.tls.policy import ContextHolder, TLSSettings, load_and_validate
from secure_echo.tools import certgen
from tests.helpers import (
    make_pki,
    write_crl,
    write_expired_server,
    write_named_server,
    write_server_with,
    write_test_certs,
)
from tests.tlspair import TLSPair, capture_events, client_context, named, server_factory

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import FrameType

    from secure_echo.tls.factory import TLSServerFactory


def wall_clock() -> Clock:
    """A Clock set to the real time: certificates are checked against its time."""
    clock = Clock()
    clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
    return clock


def der(path: Path) -> bytes:
    """The DER form of the (first) certificate in a PEM file."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


class FakeReactor(Clock):
    """A clock that records ``callFromThread`` calls instead of running them."""

    def __init__(self) -> None:
        super().__init__()
        self.thread_calls: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        self.thread_calls.append((f, args))


class ReloaderTestsMixin:
    """A PKI, a server factory on its files and a reloader sharing its holder."""

    def set_up(self, case: SynchronousTestCase, expiry_warning_days: float = 1.0) -> None:
        self.case = case
        self.pki = make_pki(case.mktemp())
        self.clock = wall_clock()
        self.events = capture_events(case)
        self.tls_settings = TLSSettings(self.pki.server_cert, self.pki.server_key)
        self.factory: TLSServerFactory = server_factory(self.pki, self.clock)
        self.reloader = TLSReloader(
            self.factory.contexts,
            lambda: self.tls_settings,
            self.clock,
            expiry_warning_days=expiry_warning_days,
        )

    def new_server_cert(self, days: int = 2) -> None:
        """Write a new server certificate and key, from the same CA, over the old files."""
        issued = certgen.issue_server(self.pki.ca, ("localhost",), days=days)
        certgen.write_pair(issued, self.pki.server_cert, self.pki.server_key)

    def connected(self) -> TLSPair:
        pair = TLSPair(self.factory, client_context(self.pki))
        pair.handshake()
        return pair


class TLSReloaderTests(ReloaderTestsMixin, SynchronousTestCase):
    """A reload swaps in a whole new valid set, or nothing."""

    def setUp(self) -> None:
        self.set_up(self)

    def test_good_set_used_by_new_connections(self) -> None:
        """A valid new certificate is used for new connections; old ones keep working."""
        old_der = der(self.pki.server_cert)
        old = self.connected()
        self.assertEqual(old.client.getpeercert(binary_form=True), old_der)
        self.new_server_cert()
        self.assertTrue(self.reloader.reload("SIGHUP"))
        (reloaded,) = named(self.events, "tls_reloaded")
        self.assertEqual(reloaded["trigger"], "SIGHUP")
        self.assertEqual(reloaded["subject"], "CN=localhost")
        self.assertEqual(reloaded["cert"], str(self.pki.server_cert))
        self.assertEqual(self.reloader.reloads, 1)
        new = self.connected()
        new_der = der(self.pki.server_cert)
        self.assertNotEqual(new_der, old_der)
        self.assertEqual(new.client.getpeercert(binary_form=True), new_der)
        old.send(b"still here\n")
        old.pump()
        self.assertEqual(old.received, b"still here\n")
        new.send(b"new\n")
        new.pump()
        self.assertEqual(new.received, b"new\n")

    def assert_failed(self, trigger: str, *fragments: str) -> None:
        """A reload fails, names the problem and leaves the context alone."""
        holder = self.factory.contexts
        context, loaded = holder.context, holder.loaded
        self.assertFalse(self.reloader.reload(trigger))
        self.assertIs(holder.context, context)
        self.assertIs(holder.loaded, loaded)
        self.assertEqual(self.reloader.failures, 1)
        self.assertEqual(self.reloader.reloads, 0)
        self.assertEqual(named(self.events, "tls_reloaded"), [])
        (failed,) = named(self.events, "tls_reload_failed")
        self.assertEqual(failed["trigger"], trigger)
        self.assertEqual(failed["subject"], loaded.subject)
        for fragment in fragments:
            self.assertIn(fragment, failed["error"])

    def test_key_not_matching(self) -> None:
        """A key that does not belong to the certificate fails the reload."""
        stranger = certgen.issue_server(self.pki.ca, ("localhost",), days=2)
        certgen.write_private(self.pki.server_key, stranger.key_pem())
        self.assert_failed("SIGHUP", "--key", "does not match the certificate")

    def test_new_cert_with_old_key(self) -> None:
        """Half a rotation (new certificate, old key) fails as a whole."""
        fresh = certgen.issue_server(self.pki.ca, ("localhost",), days=2)
        certgen.write_public(self.pki.server_cert, fresh.cert_pem())
        self.assert_failed("file-change", "does not match")

    def test_expired_cert(self) -> None:
        """An expired certificate fails the reload."""
        cert, key = write_expired_server(self.pki.directory, self.pki.ca)
        self.tls_settings = TLSSettings(cert, key)
        self.assert_failed("SIGHUP", "--cert", "expired on")

    def test_client_certificate_refused(self) -> None:
        """A certificate without serverAuth in its EKU fails the reload."""
        client = (ExtendedKeyUsageOID.CLIENT_AUTH,)
        self.tls_settings = TLSSettings(
            *write_server_with(self.pki.directory, self.pki.ca, "client-only", usages=client)
        )
        self.assert_failed("SIGHUP", "--cert", "serverAuth")

    def test_ca_certificate_refused(self) -> None:
        """A CA certificate fails the reload."""
        cert, key = self.pki.directory / "ca-as-cert.pem", self.pki.directory / "ca-key.pem"
        certgen.write_pair(self.pki.ca, cert, key)
        self.tls_settings = TLSSettings(cert, key)
        self.assert_failed("file-change", "--cert", "CA certificate")

    def test_missing_file(self) -> None:
        """A missing key file fails the reload."""
        self.pki.server_key.unlink()
        self.assert_failed("SIGHUP", "--key", "does not exist")

    def test_garbage_pem(self) -> None:
        """A certificate file without PEM certificates fails the reload."""
        self.pki.server_cert.write_bytes(b"-----BEGIN GARBAGE-----\nnot a cert\n")
        self.assert_failed("SIGHUP", "--cert", "holds no PEM certificate")

    def test_garbage_key(self) -> None:
        """A key file that is not a PEM key fails the reload."""
        self.pki.server_key.write_bytes(b"garbage")
        self.assert_failed("SIGHUP", "--key", "no usable PEM private key")

    def test_failed_reload_keeps_serving_old_cert(self) -> None:
        """After a failed reload new connections still get the old certificate."""
        old_der = der(self.pki.server_cert)
        self.pki.server_cert.write_bytes(b"garbage")
        self.assertFalse(self.reloader.reload("SIGHUP"))
        pair = self.connected()
        self.assertEqual(pair.client.getpeercert(binary_form=True), old_der)

    def test_recovers_after_failure(self) -> None:
        """Once the files are fixed, the next reload succeeds."""
        self.pki.server_key.write_bytes(b"garbage")
        self.assertFalse(self.reloader.reload("SIGHUP"))
        self.new_server_cert()
        self.assertTrue(self.reloader.reload("SIGHUP"))
        self.assertEqual((self.reloader.failures, self.reloader.reloads), (1, 1))


class ExpiryWarningTests(ReloaderTestsMixin, SynchronousTestCase):
    """``certificate_expiring`` after a load whose certificate expires soon."""

    def setUp(self) -> None:
        self.set_up(self, expiry_warning_days=14)

    def test_expiring_cert_warns(self) -> None:
        """A new certificate valid for 5 more days, with a 14-day warning, warns."""
        self.new_server_cert(days=5)
        self.assertTrue(self.reloader.reload("SIGHUP"))
        (expiring,) = named(self.events, "certificate_expiring")
        self.assertEqual(expiring["subject"], "CN=localhost")
        self.assertAlmostEqual(expiring["days"], 5.0, places=2)

    def test_long_lived_cert_does_not_warn(self) -> None:
        """A certificate valid for longer than the warning period does not warn."""
        self.new_server_cert(days=30)
        self.assertTrue(self.reloader.reload("SIGHUP"))
        self.assertEqual(named(self.events, "certificate_expiring"), [])

    def test_warning_follows_the_clock(self) -> None:
        """The remaining time is measured on the injected clock."""
        self.new_server_cert(days=30)
        self.assertTrue(self.reloader.reload("SIGHUP"))
        self.assertEqual(named(self.events, "certificate_expiring"), [])
        self.clock.advance(datetime.timedelta(days=20).total_seconds())
        self.reloader.warn_if_expiring(self.factory.contexts.loaded)
        (expiring,) = named(self.events, "certificate_expiring")
        self.assertAlmostEqual(expiring["days"], 10.0, places=2)


class ReloadServiceSignalTests(ReloaderTestsMixin, SynchronousTestCase):
    """While running, the service owns SIGHUP; the handler only hops into the reactor."""

    def setUp(self) -> None:
        self.set_up(self)
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        self.previous_calls: list[int] = []
        signal.signal(signal.SIGHUP, self.previous)
        self.reactor = FakeReactor()
        self.service = ReloadService(self.reloader, self.reactor)

    def previous(self, signum: int, _frame: FrameType | None) -> None:
        self.previous_calls.append(signum)

    def test_installs_and_restores_handler(self) -> None:
        """StartService installs the service's SIGHUP handler; stopService restores the old."""
        self.service.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.service._on_sighup)
        self.service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.previous)

    def test_handler_installed_before_listening(self) -> None:
        """The privileged start (before the listening service binds) takes SIGHUP, once."""
        self.service.privilegedStartService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.service._on_sighup)
        self.service.startService()
        self.service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.previous)

    def test_handler_schedules_reload_in_reactor(self) -> None:
        """The handler runs no reload itself: it passes reload("SIGHUP") to callFromThread."""
        self.service.startService()
        self.addCleanup(self.service.stopService)
        handler: Any = signal.getsignal(signal.SIGHUP)
        self.new_server_cert()
        handler(signal.SIGHUP, None)
        self.assertEqual(self.reactor.thread_calls, [(self.reloader.reload, ("SIGHUP",))])
        self.assertEqual(named(self.events, "tls_reloaded"), [])
        function, args = self.reactor.thread_calls[0]
        function(*args)
        (reloaded,) = named(self.events, "tls_reloaded")
        self.assertEqual(reloaded["trigger"], "SIGHUP")
        self.assertEqual(self.previous_calls, [])

    def test_real_signal_reaches_handler(self) -> None:
        """A real SIGHUP to the process lands in the reactor queue, not in a crash."""
        self.service.startService()
        self.addCleanup(self.service.stopService)
        # Without a handler SIGHUP would kill the test run: fail instead.
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.service._on_sighup)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(self.reactor.thread_calls, [(self.reloader.reload, ("SIGHUP",))])

    def test_start_warns_about_expiring_cert(self) -> None:
        """Starting checks the current certificate's expiry once."""
        self.reloader.expiry_warning = datetime.timedelta(days=14)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertEqual(len(named(self.events, "certificate_expiring")), 1)


class ReloadServicePollTests(ReloaderTestsMixin, SynchronousTestCase):
    """With an interval, a change of any file's identity triggers a reload."""

    def setUp(self) -> None:
        self.set_up(self)
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        self.service = ReloadService(self.reloader, self.clock, interval=5)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def reloads(self) -> list[dict[str, Any]]:
        return named(self.events, "tls_reloaded")

    def test_unchanged_files_do_not_reload(self) -> None:
        """Polls that see the same files reload nothing."""
        for _ in range(10):
            self.clock.advance(5)
        self.assertEqual(self.reloads(), [])
        self.assertEqual(named(self.events, "tls_reload_failed"), [])

    def test_touch_reloads_on_next_poll(self) -> None:
        """A new mtime on the certificate file reloads at the next poll, once."""
        info = self.pki.server_cert.stat()
        later = info.st_mtime_ns + 10**9
        os.utime(self.pki.server_cert, ns=(later, later))
        self.clock.advance(4.9)
        self.assertEqual(self.reloads(), [])
        self.clock.advance(0.2)
        (reloaded,) = self.reloads()
        self.assertEqual(reloaded["trigger"], "file-change")
        self.clock.advance(50)
        self.assertEqual(len(self.reloads()), 1)

    def test_replaced_files_reload(self) -> None:
        """Certificate and key renamed into place are picked up and used."""
        self.new_server_cert()
        self.clock.advance(5)
        self.assertEqual(len(self.reloads()), 1)
        pair = self.connected()
        self.assertEqual(pair.client.getpeercert(binary_form=True), der(self.pki.server_cert))

    def test_bad_change_fails_then_retries_on_next_change(self) -> None:
        """A half-written file fails once; the next change reloads."""
        context = self.factory.contexts.context
        self.pki.server_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
        self.clock.advance(5)
        self.assertEqual(len(named(self.events, "tls_reload_failed")), 1)
        self.clock.advance(5)
        self.assertEqual(len(named(self.events, "tls_reload_failed")), 1, "no retry unchanged")
        self.assertIs(self.factory.contexts.context, context)
        self.new_server_cert()
        self.clock.advance(5)
        self.assertEqual(len(self.reloads()), 1)

    def test_stop_ends_polling(self) -> None:
        """After stopService no poll runs."""
        self.service.stopService()
        self.new_server_cert()
        self.clock.advance(50)
        self.assertEqual(self.reloads(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PeriodicExpiryTests(SynchronousTestCase):
    """The expiry check repeats while the daemon runs, not only at start."""

    def test_warns_again_later(self) -> None:
        """Twelve hours on, a certificate now inside the window is warned about."""
        from secure_echo.daemon.reload import EXPIRY_CHECK_INTERVAL  # noqa: PLC0415

        pki = make_pki(self.mktemp())
        holder = ContextHolder(load_and_validate(TLSSettings(pki.server_cert, pki.server_key)))
        clock = FakeReactor()
        clock.advance(time.time())
        # The test certificate is valid for 2 days: a 1-day window is entered later.
        reloader = TLSReloader(
            holder, lambda: holder.loaded.settings, clock, expiry_warning_days=1.0
        )
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        service = ReloadService(reloader, clock)
        service.startService()
        self.addCleanup(service.stopService)

        def warnings() -> int:
            return sum(1 for e in events if e.get("event") == "certificate_expiring")

        self.assertEqual(warnings(), 0)
        clock.advance(EXPIRY_CHECK_INTERVAL * 3)
        self.assertGreaterEqual(warnings(), 1)


class SeveralCertificatesReloadTests(SynchronousTestCase):
    """A reload covers every certificate, the CRLs and the test certificates as one set."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = wall_clock()
        self.events = capture_events(self)
        self.other = write_named_server(self.pki, "other", ("other.example",))
        self.test_dir = write_test_certs(self.pki.directory / "test-certs", self.pki.ca)
        self.tls_settings = TLSSettings(
            self.pki.server_cert,
            self.pki.server_key,
            extra_certs=(self.other,),
            test_certs=self.test_dir,
        )
        holder = ContextHolder(load_tls(self.tls_settings))
        self.factory = server_factory(self.pki, self.clock, contexts=holder)
        self.reloader = TLSReloader(
            holder, lambda: self.tls_settings, self.clock, expiry_warning_days=14
        )

    def served(self, name: str) -> bytes:
        """The DER certificate a client asking for ``name`` is served (not verified)."""
        context = client_context(self.pki)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        pair = TLSPair(self.factory, context, server_hostname=name)
        pair.handshake()
        served = pair.client.getpeercert(binary_form=True)
        assert served is not None
        return served

    def test_swaps_one_of_two(self) -> None:
        """A new second certificate is served for its name; the default is unchanged."""
        default, old_other = self.served("localhost"), self.served("other.example")
        self.assertEqual(old_other, der(self.other[0]))
        write_named_server(self.pki, "other", ("other.example",))
        self.assertTrue(self.reloader.reload("SIGHUP"))
        self.assertEqual(self.served("other.example"), der(self.other[0]))
        self.assertNotEqual(self.served("other.example"), old_other)
        self.assertEqual(self.served("localhost"), default)
        (reloaded,) = named(self.events, "tls_reloaded")
        self.assertEqual(reloaded["subject"], "CN=localhost")
        self.assertEqual(
            [(c["subject"], c["names"], c["default"]) for c in reloaded["certificates"]],
            [
                ("CN=localhost", ["localhost"], True),
                ("CN=other.example", ["other.example"], False),
            ],
        )
        self.assertEqual(reloaded["certificates"][1]["cert"], str(self.other[0]))
        self.assertEqual(reloaded["test_certificates"], ["expired.localhost"])
        self.assertEqual(reloaded["crls"], [])

    def test_bad_second_certificate_keeps_all(self) -> None:
        """A broken second key fails the whole reload: both certificates stay."""
        before = (self.served("localhost"), self.served("other.example"))
        self.new_default()
        self.other[1].write_bytes(b"garbage")
        self.assertFalse(self.reloader.reload("SIGHUP"))
        (failed,) = named(self.events, "tls_reload_failed")
        self.assertIn(str(self.other[1]), failed["error"])
        self.assertEqual((self.served("localhost"), self.served("other.example")), before)

    def test_bad_test_certificate_keeps_all(self) -> None:
        """A test certificate whose key is not its own fails the reload as a whole."""
        before = self.served("localhost")
        self.new_default()
        (self.test_dir / "expired.localhost.key").write_bytes(self.pki.client_key.read_bytes())
        self.assertFalse(self.reloader.reload("file-change"))
        (failed,) = named(self.events, "tls_reload_failed")
        self.assertTrue(failed["error"].startswith("--test-certs: "), failed["error"])
        self.assertEqual(self.served("localhost"), before)

    def new_default(self) -> None:
        """Write a fresh default certificate and key over the old files."""
        write_named_server(self.pki, "server", ("localhost",))

    def test_expiry_of_each_real_certificate(self) -> None:
        """Each real certificate expiring soon warns by itself; the test certificates never."""
        # The default certificate lives 2 days: outside a 1-day window, for now.
        self.reloader.expiry_warning = datetime.timedelta(days=1)
        write_named_server(self.pki, "other", ("other.example",), days=1)
        self.assertTrue(self.reloader.reload("SIGHUP"))
        (expiring,) = named(self.events, "certificate_expiring")
        self.assertEqual(expiring["subject"], "CN=other.example")
        self.assertEqual(expiring["cert"], str(self.other[0]))
        self.assertIs(expiring["default"], False)
        self.assertAlmostEqual(expiring["days"], 1.0, places=2)
        self.clock.advance(datetime.timedelta(days=1.5).total_seconds())
        self.reloader.warn_if_expiring(self.reloader.holder.loaded)
        subjects = [e["subject"] for e in named(self.events, "certificate_expiring")]
        self.assertEqual(subjects, ["CN=other.example", "CN=localhost", "CN=other.example"])

    def test_files_of_every_part(self) -> None:
        """Watched: each cert and key, the client CA, CRLs, the test directory and its files."""
        crl = write_crl(self.pki, ())
        settings = replace(self.tls_settings, client_ca=self.pki.ca_cert, crls=(crl,))
        self.assertEqual(
            files_of(settings),
            (
                self.pki.server_cert,
                self.pki.server_key,
                *self.other,
                self.pki.ca_cert,
                crl,
                self.test_dir,
                self.test_dir / "expired.localhost.key",
                self.test_dir / "expired.localhost.pem",
            ),
        )
        gone = replace(settings, test_certs=self.pki.directory / "nowhere")
        self.assertEqual(files_of(gone)[-1], self.pki.directory / "nowhere")

    def test_poll_sees_a_second_key_and_a_new_test_certificate(self) -> None:
        """With --reload-interval, a renewed second pair or an added test pair reloads."""
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        service = ReloadService(self.reloader, self.clock, interval=5)
        service.startService()
        self.addCleanup(service.stopService)
        write_named_server(self.pki, "other", ("other.example",))
        self.clock.advance(5)
        self.assertEqual(len(named(self.events, "tls_reloaded")), 1)
        issued = certgen.issue_server(self.pki.ca, ("new.test",), days=2)
        certgen.write_pair(issued, self.test_dir / "new.test.pem", self.test_dir / "new.test.key")
        self.clock.advance(5)
        reloads = named(self.events, "tls_reloaded")
        self.assertEqual(len(reloads), 2)
        self.assertEqual(reloads[-1]["test_certificates"], ["expired.localhost", "new.test"])
        self.assertEqual(
            self.served("new.test"), issued.certificate.public_bytes(serialization.Encoding.DER)
        )
