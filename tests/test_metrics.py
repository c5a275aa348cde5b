"""Tests for :mod:`secure_echo.daemon.metrics`: log events in, Prometheus samples and health."""

from __future__ import annotations

import datetime
import math
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import OpenSSL
import twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest
from typing_extensions import override

import secure_echo
from secure_echo.daemon.metrics import Metrics, metrics_site
from secure_echo.edge.limits import DRAINING, LIMIT_PER_IP, LIMIT_TOTAL, RefusalLog
from secure_echo.tls.failures import HANDSHAKE_FAILURE_REASONS, handshake_failure_reason
from secure_echo.tls.record import CloseReason, ConnectionRecord
from tests.daemon import start_daemon, wait_workers_ready
from tests.hostile_clients import flood
from tests.test_integration import IO_TIMEOUT, IntegrationCase, server_args, shared_pki

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort
    from twisted.internet.protocol import Protocol
    from twisted.web.server import Site

PROPERTY = settings(max_examples=300, deadline=None, database=None)

NOT_AFTER = "2030-01-02T03:04:05+00:00"
NOT_AFTER_TS = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC).timestamp()


def _emit(metrics: Metrics, event: str, **fields: Any) -> None:
    """Log ``event`` the way the daemon does: a twisted.logger call with named fields."""
    Logger(observer=metrics.observer).info("{event}", event=event, **fields)


def _closed_fields(
    close_reason: CloseReason = CloseReason.EOF,
    *,
    handshake_ms: float | None = 4.2,
    tls_error: str | None = None,
    bytes_in: int = 12,
    bytes_out: int = 12,
    lines_in: int = 2,
    lines_out: int = 2,
) -> dict[str, Any]:
    """The fields of a ``connection_closed`` event, built by the daemon's own record."""
    record = ConnectionRecord(1, "127.0.0.1:50000", "127.0.0.1:4433", 100.0)
    if handshake_ms is not None:
        record.handshake_ms = handshake_ms
        record.tls_version = "TLSv1.3"
        record.cipher = "TLS_AES_256_GCM_SHA384"
        record.group = "x25519"
    record.bytes_in = bytes_in
    record.bytes_out = bytes_out
    record.lines_in = lines_in
    record.lines_out = lines_out
    record.close_reason = close_reason
    record.tls_error = tls_error
    return record.close_fields(101.5)


def _failed(metrics: Metrics, tls_error: str | None) -> None:
    _emit(
        metrics,
        "connection_closed",
        **_closed_fields(
            CloseReason.HANDSHAKE_FAILED,
            handshake_ms=None,
            tls_error=tls_error,
            bytes_in=0,
            bytes_out=0,
            lines_in=0,
            lines_out=0,
        ),
    )


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def _label_values(metrics: Metrics, name: str, label: str) -> set[str]:
    """Every value ``label`` takes in the samples of metric family ``name``."""
    return {
        sample.labels[label]
        for family in metrics.registry.collect()
        if family.name == name
        for sample in family.samples
    }


def _realistic_mix(metrics: Metrics) -> None:
    """One of every event the observer reads, plus noise it must ignore."""
    _emit(metrics, "tls_context_loaded", not_after=NOT_AFTER, subject="CN=localhost")
    _emit(metrics, "listening", address="127.0.0.1:4433", port=4433)
    for _ in range(3):
        _emit(metrics, "connection_closed", **_closed_fields())
    _emit(metrics, "connection_closed", **_closed_fields(CloseReason.IDLE_TIMEOUT))
    _failed(metrics, "no shared cipher")
    _failed(metrics, "certificate verify failed: unable to get local issuer certificate")
    _emit(
        metrics,
        "connection_closed",
        **_closed_fields(CloseReason.HANDSHAKE_TIMEOUT, handshake_ms=None),
    )
    _emit(metrics, "handshake_failed", reason="no shared cipher", conn_id=5)
    _emit(metrics, "connection_refused", reason=LIMIT_PER_IP, peer="192.0.2.1:1")
    _emit(metrics, "connections_refused", total=3, counts={LIMIT_PER_IP: 3}, window=10.0)
    _emit(metrics, "slow_reader", conn_id=9, timeout=30.0, unsent=65536)
    _emit(metrics, "tls_reloaded", trigger="SIGHUP", not_after=NOT_AFTER)
    _emit(metrics, "tls_reload_failed", trigger="SIGHUP", error="--cert: bad", not_after=NOT_AFTER)
    _emit(metrics, "line_too_long", conn_id=1, line_no=1, length=99999, limit=8192)
    Logger(observer=metrics.observer).info("a Twisted record without an event name")


class ConnectionClosedTests(SynchronousTestCase):
    """``connection_closed`` feeds the per-connection counters and the histogram."""

    def setUp(self) -> None:
        self.metrics = Metrics()

    def test_completed_connection(self) -> None:
        """A closed TLS connection counts its reason, bytes, lines, version and handshake."""
        _emit(self.metrics, "connection_closed", **_closed_fields(bytes_in=10, bytes_out=11))
        m = self.metrics
        self.assertEqual(_value(m, "secure_echo_connections_total", close_reason="eof"), 1.0)
        self.assertEqual(_value(m, "secure_echo_bytes_received_total"), 10.0)
        self.assertEqual(_value(m, "secure_echo_bytes_sent_total"), 11.0)
        self.assertEqual(_value(m, "secure_echo_lines_received_total"), 2.0)
        self.assertEqual(_value(m, "secure_echo_lines_sent_total"), 2.0)
        self.assertEqual(
            _value(
                m,
                "secure_echo_tls_connections_total",
                tls_version="TLSv1.3",
                cipher="TLS_AES_256_GCM_SHA384",
            ),
            1.0,
        )
        name = "secure_echo_handshake_duration_seconds"
        self.assertEqual(_value(m, f"{name}_count"), 1.0)
        self.assertAlmostEqual(_value(m, f"{name}_sum"), 0.0042)
        self.assertEqual(_value(m, f"{name}_bucket", le="0.0025"), 0.0)
        self.assertEqual(_value(m, f"{name}_bucket", le="0.005"), 1.0)
        self.assertEqual(_value(m, f"{name}_bucket", le="+Inf"), 1.0)
        self.assertEqual(
            _value(m, "secure_echo_handshake_failures_total", reason="other"),
            0.0,
        )

    def test_counters_add_up(self) -> None:
        """Counters sum over connections; each reason has its own series."""
        for _ in range(3):
            _emit(self.metrics, "connection_closed", **_closed_fields())
        _emit(self.metrics, "connection_closed", **_closed_fields(CloseReason.SLOW_READER))
        m = self.metrics
        self.assertEqual(_value(m, "secure_echo_connections_total", close_reason="eof"), 3.0)
        self.assertEqual(
            _value(m, "secure_echo_connections_total", close_reason="slow_reader"), 1.0
        )
        self.assertEqual(_value(m, "secure_echo_bytes_received_total"), 48.0)
        self.assertEqual(_value(m, "secure_echo_handshake_duration_seconds_count"), 4.0)

    def test_children_looked_up_once(self) -> None:
        """A record's counters find their labelled child once per distinct value, then cached."""
        m = self.metrics
        calls: list[tuple[str, ...]] = []
        for metric in (m._connections, m._tls_connections, m._offered_versions):
            original = metric.labels

            def counting(*values: str, _original: Any = original) -> Any:
                calls.append(values)
                return _original(*values)

            self.patch(metric, "labels", counting)
        hello = {"supported_versions": ["TLS 1.3", "TLS 1.2"], "key_share_groups": []}
        for _ in range(5):
            _emit(m, "connection_closed", **{**_closed_fields(), "client_hello": hello})
        self.assertEqual(
            sorted(calls),
            [("TLS 1.2",), ("TLS 1.3",), ("TLSv1.3", "TLS_AES_256_GCM_SHA384"), ("eof",)],
        )
        self.assertEqual(_value(m, "secure_echo_connections_total", close_reason="eof"), 5.0)
        self.assertEqual(
            _value(m, "secure_echo_client_hello_versions_total", version="TLS 1.2"), 5.0
        )

    def test_every_close_reason_starts_at_zero(self) -> None:
        """Each documented close reason is exported at 0 before any connection."""
        self.assertEqual(
            _label_values(self.metrics, "secure_echo_connections", "close_reason"),
            {reason.value for reason in CloseReason},
        )
        for reason in CloseReason:
            self.assertEqual(
                _value(self.metrics, "secure_echo_connections_total", close_reason=reason), 0.0
            )

    def test_no_handshake_no_duration(self) -> None:
        """A connection without a handshake adds no duration and no TLS-version series."""
        _failed(self.metrics, "no shared cipher")
        m = self.metrics
        self.assertEqual(_value(m, "secure_echo_handshake_duration_seconds_count"), 0.0)
        self.assertEqual(_label_values(m, "secure_echo_tls_connections", "tls_version"), set())
        self.assertEqual(
            _value(m, "secure_echo_connections_total", close_reason="handshake_failed"), 1.0
        )

    def test_unknown_close_reason_is_other(self) -> None:
        """A close reason outside the documented set is counted as ``other``."""
        fields = _closed_fields()
        fields["close_reason"] = "something new"
        _emit(self.metrics, "connection_closed", **fields)
        self.assertEqual(
            _value(self.metrics, "secure_echo_connections_total", close_reason="other"), 1.0
        )

    def test_odd_tls_facts_are_bounded(self) -> None:
        """An unknown TLS version or a cipher that is not a cipher name becomes ``other``."""
        fields = _closed_fields()
        fields["tls_version"] = "SSLv3"
        fields["cipher"] = "x" * 500
        _emit(self.metrics, "connection_closed", **fields)
        self.assertEqual(
            _value(
                self.metrics,
                "secure_echo_tls_connections_total",
                tls_version="other",
                cipher="other",
            ),
            1.0,
        )

    def test_malformed_fields(self) -> None:
        """Ill-typed or negative fields count as nothing and never raise."""
        fields = _closed_fields()
        fields.update(
            bytes_in="12", bytes_out=-5, lines_in=True, lines_out=None, handshake_ms=math.inf
        )
        _emit(self.metrics, "connection_closed", **fields)
        fields.update(handshake_ms=-1.0, close_reason=None)
        _emit(self.metrics, "connection_closed", **fields)
        m = self.metrics
        for name in ("bytes_received", "bytes_sent", "lines_received", "lines_sent"):
            self.assertEqual(_value(m, f"secure_echo_{name}_total"), 0.0)
        self.assertEqual(_value(m, "secure_echo_handshake_duration_seconds_count"), 0.0)
        self.assertEqual(_value(m, "secure_echo_connections_total", close_reason="eof"), 1.0)
        self.assertEqual(_value(m, "secure_echo_connections_total", close_reason="other"), 1.0)

    def test_other_events_ignored(self) -> None:
        """Records without a known ``event`` name change nothing."""
        before = list(self.metrics.registry.collect())
        log = Logger(observer=self.metrics.observer)
        log.info("Twisted's own record")
        log.info("odd", event=17)
        log.info("odd", event=["connection_closed"])
        log.info("unknown", event="handshake_failed", reason="no shared cipher")
        after = list(self.metrics.registry.collect())
        self.assertEqual(
            [s for f in before if not f.name.startswith("process_") for s in f.samples],
            [s for f in after if not f.name.startswith("process_") for s in f.samples],
        )

    def test_slow_reader(self) -> None:
        """Each ``slow_reader`` event counts one dropped client."""
        _emit(self.metrics, "slow_reader", conn_id=1, timeout=30.0, unsent=100)
        _emit(self.metrics, "slow_reader", conn_id=2, timeout=30.0, unsent=100)
        self.assertEqual(_value(self.metrics, "secure_echo_slow_readers_total"), 2.0)


class HandshakeFailureTests(SynchronousTestCase):
    """Handshake failures: one count per connection, with a bounded reason label."""

    # Reasons as transport.py logs them; the OpenSSL strings were recorded from real
    # handshakes against OpenSSL 4.0 (no shared cipher, TLS 1.2 client against a
    # TLS 1.3-only server, no client certificate, a stranger's certificate, a client
    # that does not trust the server, garbage after a 0x16 byte).
    REASONS = (
        ("no shared cipher", "no_shared_cipher"),
        ("no shared signature algorithms", "no_shared_cipher"),
        ("unsupported protocol", "unsupported_protocol"),
        ("tlsv1 alert protocol version", "unsupported_protocol"),
        ("peer did not return a certificate", "certificate_required"),
        (
            "certificate verify failed: unable to get local issuer certificate (depth 0)",
            "certificate_unknown",
        ),
        ("certificate verify failed: certificate has expired (depth 0)", "certificate_unknown"),
        (
            "certificate verify failed: client certificate CN=stranger is not on the allow-list",
            "allow_list",
        ),
        ("tlsv1 alert unknown ca", "client_rejected_certificate"),
        ("sslv3 alert bad certificate", "client_rejected_certificate"),
        ("ssl/tls alert certificate expired", "client_rejected_certificate"),
        ("client closed the connection during the handshake", "closed"),
        ("connection closed before the handshake", "closed"),
        ("unexpected EOF", "closed"),
        ("system error: (104, 'ECONNRESET')", "closed"),
        ("http request", "plaintext"),
        ("wrong version number", "other"),
        ("unexpected message", "other"),
        ("", "other"),
    )

    def test_known_reasons(self) -> None:
        """OpenSSL's and the transport's reasons map to the documented labels."""
        for reason, label in self.REASONS:
            self.assertEqual(handshake_failure_reason(reason), label, reason)
        self.assertEqual(handshake_failure_reason(None), "other")

    @PROPERTY
    @given(st.text())
    def test_any_reason_is_bounded(self, reason: str) -> None:
        """Whatever the text, the label is one of the documented set."""
        self.assertIn(handshake_failure_reason(reason), HANDSHAKE_FAILURE_REASONS)

    def test_counted_per_connection(self) -> None:
        """Each failed connection counts once, under its normalised reason."""
        metrics = Metrics()
        for reason, _label in self.REASONS:
            _failed(metrics, reason)
        for label in HANDSHAKE_FAILURE_REASONS:
            expected = sum(1 for _reason, known in self.REASONS if known == label)
            self.assertEqual(
                _value(metrics, "secure_echo_handshake_failures_total", reason=label),
                float(expected),
                label,
            )

    def test_handshake_failed_event_not_counted_twice(self) -> None:
        """``handshake_failed`` adds nothing: its connection's ``connection_closed`` counts."""
        metrics = Metrics()
        _emit(metrics, "handshake_failed", conn_id=1, peer="p", reason="no shared cipher")
        _failed(metrics, "no shared cipher")
        self.assertEqual(
            _value(metrics, "secure_echo_handshake_failures_total", reason="no_shared_cipher"),
            1.0,
        )

    def test_timeout_and_plaintext(self) -> None:
        """A handshake timeout and a plaintext client are failures of their own kind."""
        metrics = Metrics()
        _emit(
            metrics,
            "connection_closed",
            **_closed_fields(
                CloseReason.HANDSHAKE_TIMEOUT,
                handshake_ms=None,
                tls_error="no handshake within 10 s",
            ),
        )
        _emit(
            metrics,
            "connection_closed",
            **_closed_fields(CloseReason.PLAINTEXT_CLIENT, handshake_ms=None),
        )
        self.assertEqual(
            _value(metrics, "secure_echo_handshake_failures_total", reason="timeout"), 1.0
        )
        self.assertEqual(
            _value(metrics, "secure_echo_handshake_failures_total", reason="plaintext"), 1.0
        )

    def test_label_set_stays_bounded(self) -> None:
        """A thousand distinct unknown reasons add no series: they all count as ``other``."""
        metrics = Metrics()
        for number in range(1000):
            _failed(metrics, f"mystery error {number}")
        self.assertEqual(
            _label_values(metrics, "secure_echo_handshake_failures", "reason"),
            set(HANDSHAKE_FAILURE_REASONS),
        )
        self.assertEqual(
            _value(metrics, "secure_echo_handshake_failures_total", reason="other"), 1000.0
        )


class RefusalTests(SynchronousTestCase):
    """``connection_refused`` and ``connections_refused`` count each refusal once."""

    def test_first_plus_summary(self) -> None:
        """The first refusal of a window and the summary of the rest add up."""
        metrics = Metrics()
        _emit(metrics, "connection_refused", reason=LIMIT_TOTAL, close_reason=LIMIT_TOTAL)
        _emit(metrics, "connection_refused", reason=DRAINING, close_reason=DRAINING)
        _emit(
            metrics,
            "connections_refused",
            total=6,
            window=10.0,
            counts={LIMIT_TOTAL: 4, LIMIT_PER_IP: 2},
            top_peers={"192.0.2.1": 6},
        )
        name = "secure_echo_connections_refused_total"
        self.assertEqual(_value(metrics, name, reason=LIMIT_TOTAL), 5.0)
        self.assertEqual(_value(metrics, name, reason=LIMIT_PER_IP), 2.0)
        self.assertEqual(_value(metrics, name, reason=DRAINING), 1.0)
        self.assertEqual(
            _value(metrics, "secure_echo_connections_total", close_reason=LIMIT_TOTAL), None
        )

    def test_odd_summaries(self) -> None:
        """Unknown reasons count as ``other``; ill-typed counts are ignored."""
        metrics = Metrics()
        _emit(metrics, "connection_refused", reason="cosmic rays")
        _emit(metrics, "connections_refused", counts={"cosmic rays": 2, LIMIT_TOTAL: "9"})
        _emit(metrics, "connections_refused", counts=[("limit_total", 3)])
        name = "secure_echo_connections_refused_total"
        self.assertEqual(_value(metrics, name, reason="other"), 3.0)
        self.assertEqual(_value(metrics, name, reason=LIMIT_TOTAL), 0.0)

    def test_real_refusal_log(self) -> None:
        """Refusals logged by the daemon's RefusalLog are counted exactly once each."""
        metrics = Metrics()
        globalLogPublisher.addObserver(metrics.observer)
        self.addCleanup(globalLogPublisher.removeObserver, metrics.observer)
        clock = task.Clock()
        refusals = RefusalLog(clock)
        self.addCleanup(refusals.stop)
        name = "secure_echo_connections_refused_total"
        for number in range(5):
            refusals.refused_connection(LIMIT_TOTAL, f"192.0.2.{number}:1", f"192.0.2.{number}")
        refusals.refused_connection(DRAINING, "192.0.2.9:1", "192.0.2.9")
        self.assertEqual(_value(metrics, name, reason=LIMIT_TOTAL), 1.0)
        clock.advance(10)
        self.assertEqual(_value(metrics, name, reason=LIMIT_TOTAL), 5.0)
        self.assertEqual(_value(metrics, name, reason=DRAINING), 1.0)
        refusals.refused_connection(LIMIT_TOTAL, "192.0.2.1:2", "192.0.2.1")
        clock.advance(10)
        clock.advance(10)
        self.assertEqual(_value(metrics, name, reason=LIMIT_TOTAL), 6.0)
        self.assertEqual(
            sum(refusals.refused.values()),
            sum(_value(metrics, name, reason=r) or 0.0 for r in (LIMIT_TOTAL, DRAINING)),
        )


class ProxyRejectionTests(SynchronousTestCase):
    """PROXY header rejections: one count per ``proxy_rejected`` event."""

    def test_counted_by_reason(self) -> None:
        """Each event counts once under its reason; an unknown reason is ``other``."""
        metrics = Metrics()
        _emit(metrics, "proxy_rejected", reason="proxy_timeout")
        _emit(metrics, "proxy_rejected", reason="proxy_timeout")
        _emit(metrics, "proxy_rejected", reason="proxy_untrusted")
        _emit(metrics, "proxy_rejected", reason="cosmic rays")
        # The window's summary repeats what the events counted: not counted again.
        _emit(metrics, "proxy_rejections", counts={"proxy_timeout": 1})
        name = "secure_echo_proxy_rejected_total"
        self.assertEqual(_value(metrics, name, reason="proxy_timeout"), 2.0)
        self.assertEqual(_value(metrics, name, reason="proxy_untrusted"), 1.0)
        self.assertEqual(_value(metrics, name, reason="proxy_malformed"), 0.0)
        self.assertEqual(_value(metrics, name, reason="other"), 1.0)


class CertificateTests(SynchronousTestCase):
    """TLS loads and reloads: outcomes and the certificate's expiry."""

    def test_expiry_unknown_until_loaded(self) -> None:
        """Before ``tls_context_loaded`` the expiry gauge is NaN, which no alert matches."""
        value = _value(Metrics(), "secure_echo_certificate_not_after_seconds")
        assert value is not None
        self.assertTrue(math.isnan(value))

    def test_context_loaded(self) -> None:
        """``tls_context_loaded`` sets the expiry and counts no reload."""
        metrics = Metrics()
        _emit(metrics, "tls_context_loaded", not_after=NOT_AFTER, subject="CN=localhost")
        self.assertEqual(
            _value(metrics, "secure_echo_certificate_not_after_seconds"), NOT_AFTER_TS
        )
        self.assertEqual(metrics.state.not_after, NOT_AFTER_TS)
        for outcome in ("success", "failure"):
            self.assertEqual(
                _value(metrics, "secure_echo_tls_reloads_total", outcome=outcome), 0.0
            )

    def test_reload_outcomes(self) -> None:
        """A reload counts its outcome; a success moves the expiry to the new certificate."""
        metrics = Metrics()
        _emit(metrics, "tls_context_loaded", not_after="2029-01-01T00:00:00+00:00")
        _emit(metrics, "tls_reloaded", trigger="SIGHUP", not_after=NOT_AFTER)
        _emit(
            metrics,
            "tls_reload_failed",
            trigger="file-change",
            error="--cert: x",
            not_after=NOT_AFTER,
        )
        _emit(
            metrics, "tls_reload_failed", trigger="SIGHUP", error="--key: y", not_after=NOT_AFTER
        )
        name = "secure_echo_tls_reloads_total"
        self.assertEqual(_value(metrics, name, outcome="success"), 1.0)
        self.assertEqual(_value(metrics, name, outcome="failure"), 2.0)
        self.assertEqual(
            _value(metrics, "secure_echo_certificate_not_after_seconds"), NOT_AFTER_TS
        )

    def test_bad_not_after_keeps_the_last(self) -> None:
        """An unparseable ``not_after`` leaves the known expiry; a naive one is UTC."""
        metrics = Metrics()
        _emit(metrics, "tls_context_loaded", not_after="2030-01-02T03:04:05")
        self.assertEqual(metrics.state.not_after, NOT_AFTER_TS)
        _emit(metrics, "tls_reloaded", not_after="next tuesday")
        _emit(metrics, "tls_reloaded", not_after=None)
        self.assertEqual(metrics.state.not_after, NOT_AFTER_TS)
        self.assertEqual(_value(metrics, "secure_echo_tls_reloads_total", outcome="success"), 2.0)


class GaugeAndInfoTests(SynchronousTestCase):
    """Values read at scrape time, and the build information."""

    def test_active_connections(self) -> None:
        """The active gauge reads the given callable at each scrape."""
        connections: set[object] = set()
        metrics = Metrics(active_connections=lambda: len(connections))
        self.assertEqual(_value(metrics, "secure_echo_connections_active"), 0.0)
        connections.update({object(), object()})
        self.assertEqual(_value(metrics, "secure_echo_connections_active"), 2.0)

    def test_build_info(self) -> None:
        """The build info names secure-echo's, Twisted's and pyOpenSSL's versions."""
        metrics = Metrics()
        families = [f for f in metrics.registry.collect() if f.name == "secure_echo_build"]
        self.assertEqual(len(families), 1)
        [sample] = families[0].samples
        self.assertEqual(sample.name, "secure_echo_build_info")
        self.assertEqual(sample.value, 1.0)
        self.assertEqual(sample.labels["version"], secure_echo.__version__)
        self.assertEqual(sample.labels["twisted"], twisted.__version__)
        self.assertEqual(sample.labels["pyopenssl"], OpenSSL.__version__)
        self.assertIn("SSL", sample.labels["openssl"])

    def test_private_registry(self) -> None:
        """Each Metrics has its own registry unless one is given; process metrics optional."""
        registry = CollectorRegistry()
        metrics = Metrics(registry, process_metrics=False)
        self.assertIs(metrics.registry, registry)
        self.assertIsNot(Metrics().registry, registry)
        names = {family.name for family in registry.collect()}
        self.assertFalse(any(name.startswith("process_") for name in names), names)


class StateTests(SynchronousTestCase):
    """:class:`MetricsState`: liveness and readiness from events and the clock."""

    def test_lifecycle(self) -> None:
        """Ready only while listening, not draining and before the certificate expires."""
        metrics = Metrics()
        state = metrics.state
        self.assertEqual(state.health(), (False, "not listening yet"))
        self.assertEqual(state.readiness(0.0), (False, "not listening yet"))
        _emit(metrics, "listening", address="127.0.0.1:4433")
        self.assertEqual(state.health(), (True, "ok"))
        self.assertEqual(state.readiness(0.0), (False, "no server certificate loaded yet"))
        _emit(metrics, "tls_context_loaded", not_after=NOT_AFTER)
        self.assertEqual(state.readiness(NOT_AFTER_TS - 1), (True, "ready"))
        self.assertEqual(
            state.readiness(NOT_AFTER_TS),
            (False, f"the server certificate expired at {NOT_AFTER}"),
        )
        _emit(metrics, "drain_started", connections=0, timeout=10.0)
        self.assertEqual(state.readiness(0.0), (False, "draining: the daemon is shutting down"))
        self.assertEqual(state.health(), (True, "ok"))


def _request(
    site: Site, path: bytes, method: bytes = b"GET", accept: bytes | None = None
) -> tuple[DummyRequest, bytes]:
    """Route ``path`` through ``site``'s resources and render it."""
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.method = method
    if accept is not None:
        request.requestHeaders.setRawHeaders(b"accept", [accept])
    resource = getChildForRequest(site.resource, request)
    body = resource.render(request)
    assert isinstance(body, bytes)
    return request, body


def _header(request: DummyRequest, name: bytes) -> bytes:
    values = request.responseHeaders.getRawHeaders(name)
    assert values is not None
    [value] = values
    return value


class ResourceTests(SynchronousTestCase):
    """The site's resources, rendered with DummyRequest and a fake clock."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.metrics = Metrics()
        self.site = metrics_site(self.metrics, self.metrics.state, self.clock)

    def test_healthz(self) -> None:
        """/healthz is 503 until the daemon listens, then 200 ``ok``."""
        request, body = _request(self.site, b"/healthz")
        self.assertEqual((request.responseCode, body), (503, b"not listening yet\n"))
        _emit(self.metrics, "listening")
        request, body = _request(self.site, b"/healthz")
        self.assertEqual((request.responseCode, body), (200, b"ok\n"))
        self.assertEqual(_header(request, b"content-type"), b"text/plain; charset=utf-8")
        self.assertEqual(_header(request, b"cache-control"), b"no-store")

    def test_readyz_follows_the_clock(self) -> None:
        """/readyz turns 503 with a reason when the certificate expires by the clock."""
        _emit(self.metrics, "listening")
        _emit(self.metrics, "tls_context_loaded", not_after=NOT_AFTER)
        self.clock.advance(NOT_AFTER_TS - 1)
        request, body = _request(self.site, b"/readyz")
        self.assertEqual((request.responseCode, body), (200, b"ready\n"))
        self.clock.advance(1)
        request, body = _request(self.site, b"/readyz")
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(body, f"the server certificate expired at {NOT_AFTER}\n".encode())

    def test_readyz_draining(self) -> None:
        """/readyz is 503 once the drain starts."""
        _emit(self.metrics, "listening")
        _emit(self.metrics, "tls_context_loaded", not_after=NOT_AFTER)
        _emit(self.metrics, "drain_started", connections=2, timeout=10.0)
        request, body = _request(self.site, b"/readyz")
        self.assertEqual(
            (request.responseCode, body), (503, b"draining: the daemon is shutting down\n")
        )

    def test_head(self) -> None:
        """HEAD gets GET's status and length without a body."""
        request, body = _request(self.site, b"/healthz", method=b"HEAD")
        self.assertEqual((request.responseCode, body), (503, b""))
        self.assertEqual(_header(request, b"content-length"), b"%d" % len("not listening yet\n"))

    def test_metrics_text(self) -> None:
        """/metrics is the Prometheus text format by default."""
        _realistic_mix(self.metrics)
        request, body = _request(self.site, b"/metrics")
        self.assertEqual(
            _header(request, b"content-type"), b"text/plain; version=0.0.4; charset=utf-8"
        )
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        self.assertEqual(families["secure_echo_connections"].type, "counter")
        self.assertEqual(families["secure_echo_handshake_duration_seconds"].type, "histogram")
        self.assertIn(b'secure_echo_connections_total{close_reason="eof"} 3.0\n', body)
        self.assertIn(b'secure_echo_connections_refused_total{reason="limit_per_ip"} 4.0\n', body)

    def test_metrics_openmetrics(self) -> None:
        """A scraper that asks for OpenMetrics gets it."""
        request, body = _request(
            self.site,
            b"/metrics",
            accept=b"application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        self.assertTrue(
            _header(request, b"content-type").startswith(b"application/openmetrics-text")
        )
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_not_found(self) -> None:
        """Anything but the three paths is 404."""
        for path in (b"/", b"/nope", b"/metrics/x", b"/healthz/x"):
            request, _body = _request(self.site, path)
            self.assertEqual(request.responseCode, 404, path)

    def test_quiet_site(self) -> None:
        """The site logs no start, stop or access lines."""
        self.assertFalse(self.site.noisy)
        self.assertFalse(self.site.displayTracebacks)
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)
        request, _body = _request(self.site, b"/healthz")
        self.site.log(request)  # type: ignore[arg-type]
        self.assertEqual([formatEvent(e) for e in events], [])


class PromtoolTests(SynchronousTestCase):
    """Prometheus's own linter accepts the exposition."""

    def test_promtool_check_metrics(self) -> None:
        """``promtool check metrics`` finds no problem in /metrics after a mix of events."""
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool is not installed (Debian: apt-get install prometheus)")
        metrics = Metrics()
        _realistic_mix(metrics)
        site = metrics_site(metrics, metrics.state, task.Clock())
        _request_made, body = _request(site, b"/metrics")
        result = subprocess.run(
            [promtool, "check", "metrics"],
            input=body,
            capture_output=True,
            check=False,
            timeout=60,
        )
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        self.assertEqual((result.returncode, output.strip()), (0, ""))


class _TrackingFactory(WrappingFactory):
    """Wrap a factory and tell when its last server-side connection is gone."""

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self._waiting: list[Deferred[None]] = []

    @override
    def unregisterProtocol(self, p: Protocol) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fire once no connection is open."""
        if not self.protocols:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter


class HTTPRoundTripTests(TestCase):
    """The site over a real TCP port on 127.0.0.1, spoken to by Twisted's HTTP client."""

    @defer.inlineCallbacks
    def test_round_trip(self) -> Any:
        """/metrics, /healthz, /readyz and a 404 over real HTTP."""
        metrics = Metrics(active_connections=lambda: 7)
        _realistic_mix(metrics)
        tracking = _TrackingFactory(metrics_site(metrics, metrics.state, reactor))
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        port: IListeningPort = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            tracking
        )
        self.addCleanup(port.stopListening)
        self.addCleanup(tracking.when_idle)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        base = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]

        response = yield agent.request(b"GET", f"{base}/metrics".encode())
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"),
            [b"text/plain; version=0.0.4; charset=utf-8"],
        )
        self.assertIn(b"secure_echo_connections_active 7.0\n", body)
        self.assertIn(b'secure_echo_handshake_failures_total{reason="timeout"} 1.0\n', body)

        for path, code, text in (
            (b"/healthz", 200, b"ok\n"),
            (b"/readyz", 200, b"ready\n"),
            (b"/nope", 404, None),
        ):
            response = yield agent.request(
                b"GET", base.encode() + path, Headers({b"accept": [b"*/*"]})
            )
            body = yield readBody(response)
            self.assertEqual(response.code, code, path)
            if text is not None:
                self.assertEqual(body, text)

        response = yield agent.request(b"HEAD", f"{base}/readyz".encode())
        body = yield readBody(response)
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"6"])

        _emit(metrics, "drain_started", connections=0, timeout=1.0)
        response = yield agent.request(b"GET", f"{base}/readyz".encode())
        body = yield readBody(response)
        self.assertEqual((response.code, body), (503, b"draining: the daemon is shutting down\n"))
        # No access-log line reached the daemon's log.
        self.assertEqual([formatEvent(e) for e in events if "HTTP/1.1" in formatEvent(e)], [])


class ReadinessDuringDrainTests(IntegrationCase):
    """The real daemon: the metrics endpoint outlives the TLS ports at shutdown."""

    def test_readyz_answers_draining(self) -> None:
        """During the drain /readyz answers 503 draining and /healthz 200; no refusal.

        The metrics service stops after the TLS service (it is added before it), so a
        readiness probe sees why the daemon is not ready instead of a refused port.
        """
        self.assert_draining_answered()

    def test_readyz_answers_draining_with_workers(self) -> None:
        """--workers 2: the supervisor's metrics say draining while its workers drain."""
        self.assert_draining_answered("--workers", "2")

    def assert_draining_answered(self, *args: str) -> None:
        """Start with ``args``, hold the drain with a non-reader, probe during it."""
        daemon = start_daemon(
            self,
            Path(self.mktemp()),
            server_args(
                shared_pki(),
                "--metrics",
                "tcp:0:interface=127.0.0.1",
                "--drain-timeout",
                "60",
                *args,
            ),
        )
        if "--workers" in args:
            wait_workers_ready(daemon)
        port = daemon.wait_for_event(lambda e: e.get("event") == "metrics_listening")["port"]
        status, body = http_get(port, "/readyz")
        self.assertEqual(status, 200)
        # One process says "ready"; a pool "ready: 2/2 workers serving".
        self.assertTrue(body.startswith(b"ready"), body)
        stubborn = self.tls_client(daemon)
        batch = b"".join(b"unread reply %06d %s\n" % (i, b"." * 60) for i in range(500))
        self.assertEqual(flood(stubborn, batch, 0.5).ended_by, "duration")
        since = daemon.mark()
        daemon.terminate()
        daemon.wait_for_event(lambda e: e.get("event") == "drain_started", since=since)
        # The TLS port closes: at once in one process; with workers, once the
        # supervisor and every worker have let go of the shared socket.
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", daemon.port), timeout=IO_TIMEOUT).close()
            except OSError:
                break
            self.assertLess(time.monotonic(), deadline, "the TLS port stayed open")
            time.sleep(0.05)
        self.assertEqual(
            http_get(port, "/readyz"), (503, b"draining: the daemon is shutting down\n")
        )
        self.assertEqual(http_get(port, "/healthz")[0], 200)
        self.assertIsNone(daemon.process.poll(), "the drain is still under way")
        daemon.process.send_signal(signal.SIGTERM)  # no need to wait out the drain
        daemon.wait()


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` from 127.0.0.1:``port``: status and body, errors included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=IO_TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
