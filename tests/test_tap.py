"""Tests for :mod:`secure_echo.daemon.maker`: the service tree, start-up events and shutdown."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from secure_echo import tap
from secure_echo.daemon import maker
from secure_echo.daemon.load import load
from secure_echo.daemon.logs import JSONLogService
from secure_echo.daemon.metrics import Metrics
from secure_echo.daemon.reload import ReloadService
from secure_echo.daemon.services import ListeningService
from secure_echo.daemon.signals import SignalService
from secure_echo.line.handler import EchoHandler
from secure_echo.line.protocol import LineFactory, LineSettings
from secure_echo.tls.factory import TLSServerFactory
from secure_echo.tls.record import CloseReason, ConnectionRecord
from tests.helpers import make_pki, write_crl, write_named_server, write_test_certs

if TYPE_CHECKING:
    from secure_echo.daemon.load import Config
    from secure_echo.tls.connection import TLSServerConnection


class FakeConnection:
    """Just enough of a TLSServerConnection for shutdown: drain and abort."""

    def __init__(self, factory: TLSServerFactory, *, closes: bool) -> None:
        self.factory = factory
        self.closes = closes
        self.close_reasons: list[CloseReason] = []
        self.aborted = False
        self.peer_key = "127.0.0.1"
        self.record = ConnectionRecord(1, "127.0.0.1:1", "127.0.0.1:2", 0.0)

    def drain(self) -> None:
        """Record the drain; a cooperative connection goes away at once."""
        self.close_reasons.append(CloseReason.SERVER_SHUTDOWN)
        self.record.close_reason = CloseReason.SERVER_SHUTDOWN
        if self.closes:
            self.gone()

    def drain_expired(self) -> None:
        """Record the abort at the drain deadline; the connection goes away."""
        self.aborted = True
        self.record.close_reason = CloseReason.DRAIN_TIMEOUT
        self.gone()

    def gone(self) -> None:
        """Report the end to the factory, as a closed connection does."""
        self.factory.connection_closed(cast("TLSServerConnection", self))


class TapTestCase(SynchronousTestCase):
    """Options built from a test PKI, with stdout captured."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.stdout = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        # The banner goes to the original stdout, which twistd leaves alone.
        self.patch(sys, "__stdout__", self.stdout)
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def options(self, *args: str, dev: bool = False) -> tap.Options:
        options = tap.Options()
        if dev:
            tls_args = ["--state-dir", self.mktemp()]
        else:
            tls_args = ["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)]
        options.parseOptions([*tls_args, *args])
        return options

    def start(self, top: MultiService) -> None:
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)

    def named_events(self, name: str) -> list[dict[str, object]]:
        return [dict(e) for e in self.events if e.get("event") == name]


class MakeServiceTests(TapTestCase):
    """makeService builds, never starts, the daemon's services."""

    def test_services(self) -> None:
        """The tree: TLSService, SignalService, ReloadService and ListeningService.

        Stopped in reverse: listening ends, then the signals are taken, then the drain.
        """
        top = tap.makeService(self.options(), reactor=MemoryReactorClock())
        self.assertIsInstance(top, MultiService)
        self.assertEqual(
            [type(c) for c in top],
            [maker.TLSService, SignalService, ReloadService, ListeningService],
        )
        self.assertFalse(top.running)

    def test_log_service_first(self) -> None:
        """With --log-file the JSON log service comes first, so it sees start-up events."""
        log_file = Path(self.mktemp())
        log_file.parent.mkdir(parents=True, exist_ok=True)
        top = tap.makeService(
            self.options("--log-file", str(log_file)), reactor=MemoryReactorClock()
        )
        children = list(top)
        self.assertEqual(
            [type(c) for c in children],
            [JSONLogService, maker.TLSService, SignalService, ReloadService, ListeningService],
        )
        log_service = children[0]
        assert isinstance(log_service, JSONLogService)
        self.assertEqual(log_service.path, log_file.absolute())

    def test_start_writes_log_file(self) -> None:
        """Starting with --log-file writes the listening and TLS events to the file."""
        log_file = Path(self.mktemp())
        log_file.parent.mkdir(parents=True, exist_ok=True)
        top = tap.makeService(
            self.options("--log-file", str(log_file), "--listen", "tcp:9443"),
            reactor=MemoryReactorClock(),
        )
        top.privilegedStartService()
        top.startService()
        top.stopService()
        names = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
        self.assertIn("listening", names)
        self.assertIn("tls_context_loaded", names)

    def test_listen_recorded(self) -> None:
        """Starting listens on the configured port with backlog 4096 and logs it."""
        reactor = MemoryReactorClock()
        top = tap.makeService(
            self.options("--listen", "tcp:9443:interface=127.0.0.1"), reactor=reactor
        )
        self.assertEqual(reactor.tcpServers, [])
        self.start(top)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (9443, 4096, "127.0.0.1"))
        self.assertIsInstance(factory, TLSServerFactory)
        [event] = self.named_events("listening")
        self.assertEqual(event["port"], 9443)

    def test_default_listen(self) -> None:
        """Without --listen the daemon listens on 127.0.0.1:8443."""
        reactor = MemoryReactorClock()
        self.start(tap.makeService(self.options(), reactor=reactor))
        [(port, _, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (8443, 4096, "127.0.0.1"))

    def test_several_listens(self) -> None:
        """Every --listen endpoint is listened on with the same factory."""
        reactor = MemoryReactorClock()
        top = tap.makeService(
            self.options("--listen", "tcp:9443", "--listen", "tcp:9444:backlog=7"),
            reactor=reactor,
        )
        self.start(top)
        self.assertEqual([(s[0], s[2]) for s in reactor.tcpServers], [(9443, 4096), (9444, 7)])
        self.assertIs(reactor.tcpServers[0][1], reactor.tcpServers[1][1])

    def test_tls_context_loaded(self) -> None:
        """Start-up logs tls_context_loaded with the certificate's facts."""
        options = self.options("--client-ca", str(self.pki.ca_cert))
        self.start(tap.makeService(options, reactor=MemoryReactorClock()))
        [event] = self.named_events("tls_context_loaded")
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["subject"], "CN=localhost")
        self.assertEqual(event["profile"], "intermediate")
        self.assertEqual(event["client_auth"], "required")
        self.assertEqual(event["client_ca"], str(self.pki.ca_cert))
        self.assertEqual(event["cert"], str(self.pki.server_cert))
        self.assertEqual(event["not_after"], load(options.settings).tls.not_after.isoformat())
        self.assertEqual(self.named_events("dev_certificate"), [])
        self.assertEqual(self.stdout.getvalue(), "")

    def test_tls_context_loaded_lists_every_certificate(self) -> None:
        """With several certificates, test certificates, CRLs and ALPN, start-up lists each.

        The test certificates get a warning of their own, naming them; the default
        certificate stays the first --cert.
        """
        other = write_named_server(self.pki, "other", ("other.example",))
        test_dir = write_test_certs(self.pki.directory / "test-certs", self.pki.ca)
        crl = write_crl(self.pki, ())
        options = self.options(
            "--cert",
            str(other[0]),
            "--key",
            str(other[1]),
            "--test-certs",
            str(test_dir),
            "--client-ca",
            str(self.pki.ca_cert),
            "--crl",
            str(crl),
            "--alpn",
            "h2",
            "--strict-sni",
        )
        self.start(tap.makeService(options, reactor=MemoryReactorClock()))
        [event] = self.named_events("tls_context_loaded")
        self.assertEqual(event["subject"], "CN=localhost")
        self.assertEqual(event["cert"], str(self.pki.server_cert))
        certificates = cast("list[dict[str, Any]]", event["certificates"])
        self.assertEqual(
            [(c["cert"], c["subject"], c["names"], c["default"]) for c in certificates],
            [
                (str(self.pki.server_cert), "CN=localhost", ["localhost"], True),
                (str(other[0]), "CN=other.example", ["other.example"], False),
            ],
        )
        self.assertEqual(len(certificates[1]["sha256"]), 64)
        self.assertEqual(event["test_certificates"], ["expired.localhost"])
        self.assertEqual(event["crls"], [str(crl)])
        self.assertEqual(event["alpn"], ["h2"])
        self.assertIs(event["strict_sni"], True)
        [warning] = self.named_events("test_certificates")
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["names"], ["expired.localhost"])
        self.assertEqual(warning["directory"], str(test_dir))
        self.assertEqual(warning["subject"], "CN=localhost")
        [test] = cast("list[dict[str, Any]]", warning["certificates"])
        self.assertEqual(test["name"], "expired.localhost")

    def test_no_test_certificates_no_warning(self) -> None:
        """Without --test-certs there is no test_certificates warning and the lists are empty."""
        self.start(tap.makeService(self.options(), reactor=MemoryReactorClock()))
        [event] = self.named_events("tls_context_loaded")
        self.assertEqual(
            (event["test_certificates"], event["crls"], event["alpn"], event["strict_sni"]),
            ([], [], [], False),
        )
        self.assertEqual(len(cast("list[object]", event["certificates"])), 1)
        self.assertEqual(self.named_events("test_certificates"), [])

    def test_dev_certificate(self) -> None:
        """With development certificates start-up warns with dev_certificate."""
        options = self.options(dev=True)
        self.start(tap.makeService(options, reactor=MemoryReactorClock()))
        dev = load(options.settings).dev_certs
        assert dev is not None
        [event] = self.named_events("dev_certificate")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["ca_cert"], str(dev.ca_cert))
        self.assertEqual(event["cert"], str(dev.server_cert))
        self.assertIs(event["created"], True)
        self.assertEqual(len(self.named_events("tls_context_loaded")), 1)

    def test_dev_banner_from_make_service(self) -> None:
        """Once listening with development certificates, the daemon prints where the CA is."""
        options = self.options("--listen", "tcp:9443", dev=True)
        top = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual(self.stdout.getvalue(), "", "nothing is printed before listening")
        self.start(top)
        dev = load(options.settings).dev_certs
        assert dev is not None
        output = self.stdout.getvalue()
        self.assertIn(f"CA certificate: {dev.ca_cert}", output)
        self.assertIn("127.0.0.1:9443", output)


class ConnectionRecordTests(TapTestCase):
    """Where connection_closed goes: the JSON sinks always, the text log by choice."""

    def close_one(self, *args: str) -> tuple[list[str], list[dict[str, object]]]:
        """Start with ``args`` and --log-file, close one connection: (file events, global)."""
        log_file = Path(self.mktemp())
        log_file.parent.mkdir(parents=True, exist_ok=True)
        top = tap.makeService(
            self.options("--log-file", str(log_file), *args), reactor=MemoryReactorClock()
        )
        self.start(top)
        (service,) = [c for c in top if isinstance(c, maker.TLSService)]
        FakeConnection(service._factory, closes=True).gone()
        written = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
        return written, self.named_events("connection_closed")

    def test_file_only_by_default(self) -> None:
        """With --log-file alone the record is in the file, not in the text log."""
        written, in_global = self.close_one()
        self.assertEqual(written.count("connection_closed"), 1)
        self.assertEqual(in_global, [])
        # Everything else still reaches the text log.
        self.assertNotEqual(self.named_events("listening"), [])

    def test_text_log_when_asked(self) -> None:
        """--log-stdout text puts the records in the text log as well."""
        written, in_global = self.close_one("--log-stdout", "text")
        self.assertEqual(written.count("connection_closed"), 1)
        self.assertEqual(len(in_global), 1)

    def test_json_stdout_gets_them(self) -> None:
        """--log-stdout json: every sink is JSON, so every one gets the records."""
        written, in_global = self.close_one("--log-stdout", "json")
        self.assertEqual(written.count("connection_closed"), 1)
        self.assertEqual(len(in_global), 1)

    def test_without_log_file(self) -> None:
        """No --log-file: the text log is the only log, and has them."""
        top = tap.makeService(self.options(), reactor=MemoryReactorClock())
        self.start(top)
        (service,) = [c for c in top if isinstance(c, maker.TLSService)]
        FakeConnection(service._factory, closes=True).gone()
        self.assertEqual(len(self.named_events("connection_closed")), 1)

    def test_metrics_count_them(self) -> None:
        """The metrics observe the records that skip the text log."""
        made: list[Metrics] = []

        class Recorded(Metrics):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                made.append(self)

        self.patch(maker, "Metrics", Recorded)
        self.close_one("--metrics", "tcp:0:interface=127.0.0.1")
        (metrics,) = made
        value = metrics.registry.get_sample_value(
            "secure_echo_connections_total", {"close_reason": "connection_lost"}
        )
        self.assertEqual(value, 1.0)


class DevBannerTests(TapTestCase):
    """print_dev_banner."""

    def config(self, *args: str, dev: bool = True) -> Config:
        return load(self.options(*args, dev=dev).settings)

    def test_names_ca_and_port(self) -> None:
        """The banner names the CA file and a client command for the listening port."""
        cfg = self.config("--listen", "tcp:9555:interface=127.0.0.1")
        self.stdout.truncate(0)
        maker.print_dev_banner(cfg)
        output = self.stdout.getvalue()
        assert cfg.dev_certs is not None
        self.assertIn(str(cfg.dev_certs.ca_cert), output)
        self.assertIn("127.0.0.1:9555", output)
        self.assertIn("(created)", output)

    def test_reused(self) -> None:
        """A second run says the certificates were reused."""
        state = self.mktemp()
        first = tap.Options()
        first.parseOptions(["--state-dir", state])
        load(first.settings)
        options = tap.Options()
        options.parseOptions(["--state-dir", state])
        maker.print_dev_banner(load(options.settings))
        self.assertIn("(reused)", self.stdout.getvalue())

    def test_parsing_makes_nothing(self) -> None:
        """Parsing names the development certificate; only the load step makes it."""
        state = Path(self.mktemp())
        options = tap.Options()
        options.parseOptions(["--state-dir", str(state)])
        self.assertFalse(state.exists())
        self.assertEqual(options.settings.dev_state_dir, state)
        cfg = load(options.settings)
        assert cfg.dev_certs is not None
        self.assertTrue(cfg.dev_certs.server_cert.exists())
        self.assertEqual(cfg.tls_settings.cert, cfg.dev_certs.server_cert)

    def test_default_port_for_unix(self) -> None:
        """For a non-TCP first endpoint the banner falls back to port 8443."""
        path = Path(self.mktemp()).absolute()
        maker.print_dev_banner(self.config("--listen", f"unix:{path}"))
        self.assertIn("127.0.0.1:8443", self.stdout.getvalue())

    def test_silent_with_real_certificate(self) -> None:
        """With --cert there is no banner."""
        maker.print_dev_banner(self.config(dev=False))
        self.assertEqual(self.stdout.getvalue(), "")


class ShutdownTests(TapTestCase):
    """TLSService.stopService closes every open connection with server_shutdown."""

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        cfg = load(self.options().settings)
        self.factory = TLSServerFactory(
            cfg.contexts, LineFactory(EchoHandler(), LineSettings(), self.clock), self.clock
        )
        self.service = maker.TLSService(cfg, self.factory, self.clock)
        self.service.startService()

    def add(self, *, closes: bool) -> FakeConnection:
        connection = FakeConnection(self.factory, closes=closes)
        self.factory.connections.add(cast("TLSServerConnection", connection))
        return connection

    def test_no_connections(self) -> None:
        """With nothing open, stopping is immediate and leaves no timer."""
        stopped = self.service.stopService()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertFalse(self.service.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closes_with_server_shutdown(self) -> None:
        """Each open connection is closed with server_shutdown; done when all are gone."""
        connections = [self.add(closes=True) for _ in range(3)]
        stopped = self.service.stopService()
        for connection in connections:
            self.assertEqual(connection.close_reasons, [CloseReason.SERVER_SHUTDOWN])
            self.assertFalse(connection.aborted)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_for_slow_connections(self) -> None:
        """Stopping waits while a connection is still closing, then finishes."""
        slow = self.add(closes=False)
        stopped = self.service.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(slow.close_reasons, [CloseReason.SERVER_SHUTDOWN])
        self.clock.advance(1)
        self.assertNoResult(stopped)
        slow.gone()
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertFalse(slow.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_aborts_after_grace(self) -> None:
        """A connection that does not close within the grace period is aborted."""
        stuck = self.add(closes=False)
        polite = self.add(closes=True)
        stopped = self.service.stopService()
        self.clock.advance(10 - 0.1)
        self.assertNoResult(stopped)
        self.assertFalse(stuck.aborted)
        self.clock.advance(0.2)
        self.assertTrue(stuck.aborted)
        self.assertFalse(polite.aborted)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.clock.getDelayedCalls(), [])
