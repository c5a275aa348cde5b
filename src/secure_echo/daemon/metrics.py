"""Prometheus metrics and health endpoints, derived from the structured log.

The hot path pays nothing for metrics: the daemon already logs one
``connection_closed`` event per connection (docs/logging.md), and
:class:`Metrics` is a ``twisted.logger`` observer that turns those events into
``prometheus_client`` metrics in a private :class:`~prometheus_client.CollectorRegistry`.
Only the active-connection gauge is read live, from a callable, at scrape time.

Intended use (the daemon's ``--metrics ENDPOINT``), in ``makeService``::

    metrics = Metrics(active_connections=lambda: len(factory.connections))
    globalLogPublisher.addObserver(metrics.observer)  # before any service starts
    site = metrics_site(metrics, metrics.state, reactor)
    strports.service(options["metrics"], site).setServiceParent(top)
    # and when the daemon stops: globalLogPublisher.removeObserver(metrics.observer)

The observer must be added before the services start: ``listening`` and
``tls_context_loaded`` are logged once, at start, and readiness depends on them.
``listening`` must come from the echo listeners only, never from the metrics
port.  The metrics endpoint speaks plain HTTP without authentication: bind it to
loopback or a private interface (``tcp:9400:interface=127.0.0.1``).

Metrics (all counters count from the process start):

``secure_echo_connections_active``
    Open connections (gauge; the callable, read at scrape time).
``secure_echo_connections_total{close_reason}``
    Closed connections by ``close_reason`` (docs/logging.md's values; anything
    else is ``other``).  Refused connections are not here.
``secure_echo_tls_connections_total{tls_version,cipher}``
    Closed connections whose handshake completed, by protocol and cipher suite
    (bounded by the server's cipher policy; a version other than TLSv1.2/1.3 is
    ``other``).
``secure_echo_handshake_duration_seconds``
    Accept to handshake completion (histogram, 0.5 ms to 5 s buckets).
``secure_echo_handshake_failures_total{reason}``
    Connections that never completed a handshake, one count each, by
    :data:`HANDSHAKE_FAILURE_REASONS` (see :func:`handshake_failure_reason`).
``secure_echo_connections_refused_total{reason}``
    Connections closed at accept by a limit: ``limit_total``, ``limit_per_ip``,
    ``draining`` (else ``other``).
``secure_echo_bytes_received_total`` / ``secure_echo_bytes_sent_total``
    Application bytes (plaintext, not TLS records).
``secure_echo_lines_received_total`` / ``secure_echo_lines_sent_total``
    Lines received (overlong ones included) and replies sent (errors included).
``secure_echo_client_hello_versions_total{version}``
``secure_echo_client_hello_key_shares_total{group}``
    What clients offered: each TLS version in a ClientHello's supported_versions
    (else its legacy version), and each key-share group it sent, counted at close
    (names as in docs/logging.md's ``client_hello``; others are ``other``).  No
    per-client labels: JA4 and the rest are in the log, not the metrics.
``secure_echo_proxy_rejected_total{reason}``
    PROXY headers refused, by ``proxy_rejected``'s reason (``proxy_malformed``,
    ``proxy_missing``, ``proxy_timeout``, ``proxy_untrusted``; else ``other``).
``secure_echo_slow_readers_total``
    Clients dropped because they stopped reading (``slow_reader`` events; this
    includes a close that could not flush, whose ``close_reason`` stays as it was).
``secure_echo_tls_reloads_total{outcome}``
    TLS reloads, ``success`` or ``failure``.
``secure_echo_certificate_not_after_seconds``
    The server certificate in use expires at this Unix time (NaN until the first
    ``tls_context_loaded``).
``secure_echo_build_info{version,twisted,pyopenssl,openssl,python}``
    Always 1; the labels name the versions in use.
``process_*``
    prometheus_client's process collector (CPU, memory, open and maximum file
    descriptors), unless ``process_metrics=False``.

Timing: a connection's bytes, lines, close reason and handshake failure are
counted when it closes (from ``connection_closed``), so a long-lived connection
shows up at its end.  Refusals beyond the first of each reason in a 10 s window
arrive with the window's ``connections_refused`` summary, up to 10 s late.

Handshake failures are counted from ``connection_closed`` rather than
``handshake_failed``: every connection that ends without a handshake has
exactly one ``connection_closed`` (``close_reason`` ``handshake_failed``,
``handshake_timeout`` or ``plaintext_client``, reason in ``tls_error``), while
``handshake_failed`` is not logged for a timeout, a plaintext client or a client
that leaves before sending anything.  Counting both would count twice.

State rules (:class:`MetricsState`, changed only by :class:`Metrics`'s observer):
``listening`` becomes true at the first ``listening`` event, ``draining`` at
``drain_started``; neither goes back.  ``not_after`` follows the certificate in
use (``tls_context_loaded``, ``tls_reloaded``, and ``tls_reload_failed``, whose
``not_after`` is that of the certificate kept).  ``/healthz`` is 200 while
listening; ``/readyz`` is 200 while listening, not draining and before
``not_after`` by the injected clock; otherwise each answers 503 with a one-line
reason.

The observer never raises on a malformed event: a missing or ill-typed field
counts as zero or ``other``, so no event can add a label value outside the sets
above.
"""

from __future__ import annotations

import datetime
import math
import platform
from typing import TYPE_CHECKING, Final, Protocol

import OpenSSL
import twisted
from OpenSSL import SSL
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from twisted.logger import ILogObserver
from twisted.web.http import OK, SERVICE_UNAVAILABLE
from twisted.web.resource import Resource
from twisted.web.server import Site
from typing_extensions import override
from zope.interface import implementer

import secure_echo
from secure_echo.daemon.logs import iso_timestamp
from secure_echo.edge.limits import DRAINING, LIMIT_PER_IP, LIMIT_TOTAL
from secure_echo.tls.failures import HANDSHAKE_FAILURE_REASONS, OTHER, handshake_failure_reason
from secure_echo.tls.offered import RawJSON
from secure_echo.tls.record import CloseReason
from secure_echo.wire.proxy import PROXY_MALFORMED, PROXY_MISSING, PROXY_TIMEOUT, PROXY_UNTRUSTED

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.interfaces import IReactorTime
    from twisted.logger import LogEvent
    from twisted.web.http import Request
    from twisted.web.iweb import IRequest

#: Handshake duration buckets, seconds: 0.5 ms (loopback, resumed) to 5 s.
HANDSHAKE_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

_CLOSE_REASONS: Final = frozenset(reason.value for reason in CloseReason)
_REFUSAL_REASONS: Final = (LIMIT_TOTAL, LIMIT_PER_IP, DRAINING)
#: The label values of the offer counters: the names clients really send (GREASE
#: and unknown values are "other", so no client can add a label).
_OFFERED_VERSIONS: Final = frozenset({"TLS 1.0", "TLS 1.1", "TLS 1.2", "TLS 1.3", "SSL 3.0"})
_OFFERED_GROUPS: Final = frozenset(
    {
        "x25519",
        "x448",
        "secp256r1",
        "secp384r1",
        "secp521r1",
        "X25519MLKEM768",
        "SecP256r1MLKEM768",
        "SecP384r1MLKEM1024",
        "X25519Kyber768Draft00",
        "MLKEM768",
        "MLKEM1024",
        "ffdhe2048",
        "ffdhe3072",
    }
)
_PROXY_REASONS: Final = (PROXY_MALFORMED, PROXY_MISSING, PROXY_TIMEOUT, PROXY_UNTRUSTED)
_TLS_VERSIONS: Final = frozenset({"TLSv1.2", "TLSv1.3"})
_CIPHER_MAX: Final = 64


def _count(value: object) -> int:
    """A non-negative integer field, else 0 (a bool, None or anything else)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def _seconds_from_ms(value: object) -> float | None:
    """A finite, non-negative millisecond field as seconds, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) / 1000.0
        if math.isfinite(seconds) and seconds >= 0.0:
            return seconds
    return None


def _label(value: object, known: frozenset[str] | tuple[str, ...]) -> str:
    """``value`` if it is one of ``known``, else :data:`OTHER`."""
    return value if isinstance(value, str) and value in known else OTHER


def _cipher_label(value: object) -> str:
    """An OpenSSL cipher name (``TLS_AES_128_GCM_SHA256``), else :data:`OTHER`."""
    if (
        isinstance(value, str)
        and 0 < len(value) <= _CIPHER_MAX
        and value.isascii()
        and all(char.isalnum() or char in "_-" for char in value)
    ):
        return value
    return OTHER


def build_versions() -> dict[str, str]:
    """The labels of ``secure_echo_build_info``."""
    return {
        "version": secure_echo.__version__,
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace"),
        "python": platform.python_version(),
    }


def _no_connections() -> int:
    return 0


class HealthCheck(Protocol):
    """What ``/healthz`` and ``/readyz`` ask: :class:`MetricsState` for one process.

    The supervisor of ``--workers N`` answers from its workers' reported state
    instead (:mod:`secure_echo.pool.health`).
    """

    def health(self) -> tuple[bool, str]:
        """``(alive, reason)``."""
        ...

    def readiness(self, now: float) -> tuple[bool, str]:
        """``(ready, reason)`` at Unix time ``now``."""
        ...


class _Children:
    """A labelled metric's children, looked up by their label values once each.

    prometheus_client's ``labels()`` checks its arguments and takes a lock on
    every call, about 2 µs; each connection's record increments five or more
    children.  The cache holds no more entries than the metric has children
    (one per distinct label values, which :func:`_label` keeps to closed sets).
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Counter) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Counter] = {}

    def __call__(self, *values: str) -> Counter:
        """The child for ``values``, in the metric's label order."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class MetricsState:
    """What ``/healthz`` and ``/readyz`` need; see the module's state rules."""

    def __init__(self) -> None:
        #: A ``listening`` event was seen: the echo port is bound.
        self.listening = False
        #: A ``drain_started`` event was seen: the daemon is shutting down.
        self.draining = False
        #: The server certificate in use expires at this Unix time (None: unknown).
        self.not_after: float | None = None

    def health(self) -> tuple[bool, str]:
        """``(alive, reason)``: alive once the daemon listens."""
        if not self.listening:
            return False, "not listening yet"
        return True, "ok"

    def readiness(self, now: float) -> tuple[bool, str]:
        """``(ready, reason)`` at Unix time ``now``."""
        if not self.listening:
            return False, "not listening yet"
        if self.draining:
            return False, "draining: the daemon is shutting down"
        if self.not_after is None:
            return False, "no server certificate loaded yet"
        if now >= self.not_after:
            expired = datetime.datetime.fromtimestamp(self.not_after, datetime.UTC)
            return False, f"the server certificate expired at {expired.isoformat()}"
        return True, "ready"


@implementer(ILogObserver)
class Metrics:
    """Prometheus metrics updated from log events; a ``twisted.logger`` observer.

    ``registry`` defaults to a new private registry.  ``active_connections`` is
    called at each scrape for ``secure_echo_connections_active``.  ``state`` is
    the :class:`MetricsState` the same events keep up to date.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        active_connections: Callable[[], int] = _no_connections,
        *,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.state = MetricsState()
        r = self.registry
        self._active = Gauge("secure_echo_connections_active", "Open connections.", registry=r)
        self._active.set_function(lambda: float(active_connections()))
        self._connections = Counter(
            "secure_echo_connections_total",
            "Closed connections, by why they ended.",
            ["close_reason"],
            registry=r,
        )
        self._tls_connections = Counter(
            "secure_echo_tls_connections_total",
            "Closed connections whose TLS handshake completed, by version and cipher.",
            ["tls_version", "cipher"],
            registry=r,
        )
        self._handshake_seconds = Histogram(
            "secure_echo_handshake_duration_seconds",
            "Time from accept to TLS handshake completion.",
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self._handshake_failures = Counter(
            "secure_echo_handshake_failures_total",
            "Connections that ended without a completed TLS handshake, by reason.",
            ["reason"],
            registry=r,
        )
        self._refused = Counter(
            "secure_echo_connections_refused_total",
            "Connections closed at accept by a limit, by reason.",
            ["reason"],
            registry=r,
        )
        self._bytes_in = Counter(
            "secure_echo_bytes_received_total",
            "Application bytes received from clients (counted at close).",
            registry=r,
        )
        self._bytes_out = Counter(
            "secure_echo_bytes_sent_total",
            "Application bytes sent to clients (counted at close).",
            registry=r,
        )
        self._lines_in = Counter(
            "secure_echo_lines_received_total",
            "Lines received, overlong ones included (counted at close).",
            registry=r,
        )
        self._lines_out = Counter(
            "secure_echo_lines_sent_total",
            "Replies sent, error replies included (counted at close).",
            registry=r,
        )
        self._offered_versions = Counter(
            "secure_echo_client_hello_versions_total",
            "TLS versions clients offered in their ClientHello, one count per version offered.",
            ["version"],
            registry=r,
        )
        self._offered_key_shares = Counter(
            "secure_echo_client_hello_key_shares_total",
            "Key-share groups clients sent in their ClientHello, one count per group.",
            ["group"],
            registry=r,
        )
        self._proxy_rejected = Counter(
            "secure_echo_proxy_rejected_total",
            "PROXY headers refused (and their connections closed), by reason.",
            ["reason"],
            registry=r,
        )
        self._slow_readers = Counter(
            "secure_echo_slow_readers_total",
            "Clients dropped because they stopped reading.",
            registry=r,
        )
        self._reloads = Counter(
            "secure_echo_tls_reloads_total",
            "TLS material reloads, by outcome.",
            ["outcome"],
            registry=r,
        )
        self._not_after = Gauge(
            "secure_echo_certificate_not_after_seconds",
            "Expiry of the server certificate in use, Unix time (NaN until loaded).",
            registry=r,
        )
        state = self.state
        self._not_after.set_function(
            lambda: state.not_after if state.not_after is not None else math.nan
        )
        Info("secure_echo_build", "Versions of secure-echo and its TLS stack.", registry=r).info(
            build_versions()
        )
        if process_metrics:
            ProcessCollector(registry=r)
        # The children each connection's record increments, cached (see _Children).
        self._closed = _Children(self._connections)
        self._tls_closed = _Children(self._tls_connections)
        self._failed = _Children(self._handshake_failures)
        self._offered_version = _Children(self._offered_versions)
        self._offered_key_share = _Children(self._offered_key_shares)
        # Every known label value is exported from the start, at 0, so rate() and
        # absent-series alerts work before the first event of each kind.
        for close_reason in CloseReason:
            self._connections.labels(close_reason=close_reason.value)
        for reason in HANDSHAKE_FAILURE_REASONS:
            self._handshake_failures.labels(reason=reason)
        for reason in _REFUSAL_REASONS:
            self._refused.labels(reason=reason)
        for reason in _PROXY_REASONS:
            self._proxy_rejected.labels(reason=reason)
        for outcome in ("success", "failure"):
            self._reloads.labels(outcome=outcome)
        self._handlers: dict[str, Callable[[LogEvent], None]] = {
            "connection_closed": self._connection_closed,
            "connection_refused": self._connection_refused,
            "connections_refused": self._connections_refused,
            "slow_reader": self._slow_reader,
            "proxy_rejected": self._proxy_rejected_event,
            "tls_context_loaded": self._certificate_loaded,
            "tls_reloaded": self._tls_reloaded,
            "tls_reload_failed": self._tls_reload_failed,
            "listening": self._listening,
            "drain_started": self._drain_started,
        }

    @property
    def observer(self) -> ILogObserver:
        """The observer to add to a log publisher (this object)."""
        return self

    def __call__(self, event: LogEvent) -> None:
        """Update the metrics from one log event; events we do not know are ignored."""
        name = event.get("event")
        if isinstance(name, str):
            handler = self._handlers.get(name)
            if handler is not None:
                handler(event)

    def _connection_closed(self, event: LogEvent) -> None:
        close_reason = _label(event.get("close_reason"), _CLOSE_REASONS)
        self._closed(close_reason).inc()
        self._bytes_in.inc(_count(event.get("bytes_in")))
        self._bytes_out.inc(_count(event.get("bytes_out")))
        self._lines_in.inc(_count(event.get("lines_in")))
        self._lines_out.inc(_count(event.get("lines_out")))
        seconds = _seconds_from_ms(event.get("handshake_ms"))
        if seconds is not None:
            self._handshake_seconds.observe(seconds)
        tls_version = event.get("tls_version")
        if tls_version is not None:
            self._tls_closed(
                _label(tls_version, _TLS_VERSIONS), _cipher_label(event.get("cipher"))
            ).inc()
        failure: str | None = None
        if close_reason == CloseReason.HANDSHAKE_FAILED:
            failure = handshake_failure_reason(event.get("tls_error"))
        elif close_reason == CloseReason.HANDSHAKE_TIMEOUT:
            failure = "timeout"
        elif close_reason == CloseReason.PLAINTEXT_CLIENT:
            failure = "plaintext"
        if failure is not None:
            self._failed(failure).inc()
        self._count_offer(event.get("client_hello"))

    def _count_offer(self, value: object) -> None:
        """Count the versions and key shares a connection's ClientHello offered."""
        if value is None:
            return
        if isinstance(value, RawJSON):
            versions: object = value.versions
            key_shares: object = value.key_shares
        elif isinstance(value, dict):
            versions = value.get("supported_versions") or [value.get("legacy_version")]
            key_shares = value.get("key_share_groups")
        else:
            return
        for version in versions if isinstance(versions, list | tuple) else ():
            self._offered_version(_label(version, _OFFERED_VERSIONS)).inc()
        for group in key_shares if isinstance(key_shares, list | tuple) else ():
            self._offered_key_share(_label(group, _OFFERED_GROUPS)).inc()

    def _connection_refused(self, event: LogEvent) -> None:
        # The first refusal of its reason in a window; the rest of the window comes
        # in connections_refused's counts, never here too.
        self._refused.labels(reason=_label(event.get("reason"), _REFUSAL_REASONS)).inc()

    def _connections_refused(self, event: LogEvent) -> None:
        counts = event.get("counts")
        if not isinstance(counts, dict):
            return
        for reason, count in counts.items():
            amount = _count(count)
            if amount:
                self._refused.labels(reason=_label(reason, _REFUSAL_REASONS)).inc(amount)

    def _proxy_rejected_event(self, event: LogEvent) -> None:
        # One event per rejection: the first of a window as a warning, the rest as
        # records (docs/logging.md); the window's summary repeats them, uncounted.
        self._proxy_rejected.labels(reason=_label(event.get("reason"), _PROXY_REASONS)).inc()

    def _slow_reader(self, event: LogEvent) -> None:  # noqa: ARG002 - the event is the count
        self._slow_readers.inc()

    def _certificate_loaded(self, event: LogEvent) -> None:
        not_after = iso_timestamp(event.get("not_after"))
        if not_after is not None:
            self.state.not_after = not_after

    def _tls_reloaded(self, event: LogEvent) -> None:
        self._reloads.labels(outcome="success").inc()
        self._certificate_loaded(event)

    def _tls_reload_failed(self, event: LogEvent) -> None:
        self._reloads.labels(outcome="failure").inc()
        # not_after is the certificate kept in use, which is still the one served.
        self._certificate_loaded(event)

    def _listening(self, event: LogEvent) -> None:  # noqa: ARG002 - the event is the fact
        self.state.listening = True

    def _drain_started(self, event: LogEvent) -> None:  # noqa: ARG002 - the event is the fact
        self.state.draining = True


_TEXT_PLAIN: Final = b"text/plain; charset=utf-8"


class _StatusPage(Resource):
    """A one-line plain-text status: 200 when the check passes, else 503."""

    def _check(self) -> tuple[bool, str]:
        raise NotImplementedError

    def render_GET(self, request: IRequest) -> bytes:
        """The check's reason, with 200 or 503."""
        ok, reason = self._check()
        request.setResponseCode(OK if ok else SERVICE_UNAVAILABLE)
        request.setHeader(b"content-type", _TEXT_PLAIN)
        request.setHeader(b"cache-control", b"no-store")
        return reason.encode("utf-8") + b"\n"

    def render_HEAD(self, request: IRequest) -> bytes:
        """GET's status and headers without the body.

        Defined so Twisted does not log "Using GET to fake a HEAD request" for every
        load-balancer probe.
        """
        body = self.render_GET(request)
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""


class _HealthPage(_StatusPage):
    def __init__(self, state: HealthCheck) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated
        self._state = state

    @override
    def _check(self) -> tuple[bool, str]:
        return self._state.health()


class _ReadyPage(_StatusPage):
    def __init__(self, state: HealthCheck, clock: IReactorTime) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated
        self._state = state
        self._clock = clock

    @override
    def _check(self) -> tuple[bool, str]:
        return self._state.readiness(self._clock.seconds())


class _MetricsPage(Resource):
    """The registry in the exposition format the scraper asks for.

    Rendered synchronously on the reactor thread: collecting a few dozen samples
    is cheaper than a thread hop.  ``prometheus_client.twisted.MetricsResource`` is
    not used because importing it imports (and so installs) the global reactor,
    and it renders in the reactor's thread pool.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource.__init__ is unannotated
        self._registry = registry

    def render_GET(self, request: IRequest) -> bytes:
        """The metrics; OpenMetrics if the Accept header asks for it."""
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(
            accept.decode("latin-1") if isinstance(accept, bytes) else ""
        )
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self._registry)


class _QuietSite(Site):
    """A Site that writes no access log and no start/stop messages.

    Without a ``logPath`` Twisted writes each request to the global log, which is
    the daemon's JSON log: a scrape every few seconds would drown it.
    """

    noisy = False
    displayTracebacks = False

    @override
    def log(self, request: Request) -> None:
        """Log nothing."""


def metrics_site(metrics: Metrics, state: HealthCheck, clock: IReactorTime) -> Site:
    """The HTTP site: ``/metrics``, ``/healthz``, ``/readyz``; 404 elsewhere.

    ``clock`` judges the certificate's expiry for ``/readyz`` and runs the
    site's HTTP timeouts (pass the reactor).
    """
    root = Resource()
    root.putChild(b"metrics", _MetricsPage(metrics.registry))
    root.putChild(b"healthz", _HealthPage(state))
    root.putChild(b"readyz", _ReadyPage(state, clock))
    # Site.__init__ is unannotated.
    return _QuietSite(root, logPath=None, timeout=60, reactor=clock)  # type: ignore[no-untyped-call]
