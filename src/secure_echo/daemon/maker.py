"""The single-process daemon's service tree: what ``twistd secure-echo`` runs.

:func:`make_service` only builds services (it starts nothing); the reactor is
passed in.  A worker of ``--workers N`` runs the same tree (:mod:`secure_echo.pool.worker`)
with two differences it passes in: a :class:`ListenStrategy` that adopts the sockets
its supervisor bound instead of binding the ``--listen`` endpoints, and its worker
number, which prefixes its connection ids and is named in the info reply.
:mod:`secure_echo.tap` chooses between the single process and the pool.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO, cast

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.python.components import Componentized
from typing_extensions import override

from secure_echo.daemon.certificates import describe, describe_test, test_names
from secure_echo.daemon.logs import log_sinks
from secure_echo.daemon.metrics import Metrics, metrics_site
from secure_echo.daemon.options import reload_tls_settings
from secure_echo.daemon.reload import ReloadService, TLSReloader
from secure_echo.daemon.restart import RestartCheck
from secure_echo.daemon.sdnotify import Notifier, NotifyService, watchdog_interval
from secure_echo.daemon.services import ListeningService, MetricsService
from secure_echo.daemon.signals import SignalService
from secure_echo.edge.addresses import format_address
from secure_echo.edge.limits import (
    ConnectionLimiter,
    RefusalLog,
    default_max_connections,
    raise_fd_limit,
)
from secure_echo.edge.proxyreader import ProxySettings
from secure_echo.line.handler import EchoHandler
from secure_echo.line.protocol import LineFactory, LineSettings
from secure_echo.tls.factory import TLSServerFactory
from secure_echo.tools.devcerts import client_command

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from twisted.application.service import IService
    from twisted.internet.interfaces import IListeningPort

    from secure_echo.daemon.load import Config
    from secure_echo.tls.policy import ContextHolder


class ListenStrategy(Protocol):
    """How the tree gets its listening ports: a service that accepts with ``factory``.

    The service stands last but one in the tree (before systemd's notifier), so it
    is stopped before the TLS service drains.  ``on_listening`` is called with the
    ports once they listen, by a strategy that binds them (:func:`bind_listens`).
    """

    def __call__(
        self,
        factory: TLSServerFactory,
        on_listening: Callable[[list[IListeningPort]], object],
    ) -> IService:
        """The listening service of ``factory``."""
        ...


def bind_listens(cfg: Config, reactor: Any) -> ListenStrategy:
    """The single process's strategy: bind every ``--listen`` endpoint or stop start-up."""

    def bind(
        factory: TLSServerFactory, on_listening: Callable[[list[IListeningPort]], object]
    ) -> IService:
        return ListeningService(reactor, cfg.listens, factory, on_listening=on_listening)

    return bind


class TLSService(Service):
    """Owns the TLS context and the open connections; closes them at shutdown."""

    log = Logger()

    def __init__(
        self,
        cfg: Config,
        factory: TLSServerFactory,
        clock: Any,
        fd_limits: tuple[int, int] | None = None,
    ) -> None:
        self._config = cfg
        self._factory = factory
        self._clock = clock
        self._fd_limits = fd_limits

    @override
    def startService(self) -> None:
        super().startService()
        loaded = self._config.tls
        if self._config.dev_certs is not None:
            self.log.warn(
                "using a development certificate made for localhost; clients must trust "
                "{ca_cert}. Give --cert and --key for anything else",
                event="dev_certificate",
                ca_cert=str(self._config.dev_certs.ca_cert),
                cert=str(self._config.dev_certs.server_cert),
                created=self._config.dev_certs.created,
            )
        settings = loaded.settings
        self.log.info(
            "TLS context loaded ({profile}): {subject}, valid until {not_after}",
            event="tls_context_loaded",
            profile=str(settings.profile),
            # The default certificate, as before several could be served.
            subject=loaded.subject,
            not_after=loaded.not_after.isoformat(),
            cert=str(settings.cert),
            client_ca=str(settings.client_ca) if settings.client_ca else None,
            client_auth=str(settings.client_auth),
            allow_list=settings.allow.active,
            certificates=describe(loaded),
            test_certificates=test_names(loaded),
            crls=[str(crl) for crl in settings.crls],
            alpn=[name.decode("utf-8", "backslashreplace") for name in settings.alpn],
            strict_sni=settings.strict_sni,
        )
        if loaded.test:
            self.log.warn(
                "serving test certificates, unchecked, for the server names {names}; "
                "other clients get {subject}",
                event="test_certificates",
                names=test_names(loaded),
                directory=str(settings.test_certs),
                certificates=describe_test(loaded),
                subject=loaded.subject,
            )
        limiter = self._factory.limiter
        self.log.info(
            "limits: {max_connections} connections, {max_per_ip} per IP; "
            "file descriptors {fd_soft}/{fd_hard}",
            event="limits",
            max_connections=limiter.max_total if limiter else None,
            max_per_ip=limiter.max_per_ip if limiter else None,
            fd_soft=self._fd_limits[0] if self._fd_limits else None,
            fd_hard=self._fd_limits[1] if self._fd_limits else None,
            handshake_timeout=self._factory.handshake_timeout,
            idle_timeout=self._factory.idle_timeout,
            write_stall_timeout=self._factory.write_stall_timeout,
            max_connection_age=self._factory.max_connection_age,
        )

    @override
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self._factory.drain(self._config.drain_timeout)


def print_dev_banner(cfg: Config, port: int | None = None, stream: TextIO | None = None) -> None:
    """Tell a first-time user where the CA is and how to connect.

    ``port`` is the bound port (so ``tcp:0`` prints the real one); without it the
    port is read from the first ``--listen``.  The banner goes to the original
    stdout, which twistd has not redirected into its log.
    """
    dev = cfg.dev_certs
    if dev is None:
        return
    if port is None:
        port = 8443
        parts = cfg.listens[0].description.split(":")
        if cfg.listens[0].kind in {"tcp", "tcp6"} and len(parts) > 1 and parts[1].isdigit():
            port = int(parts[1])
    commands = client_command(dev.ca_cert, "127.0.0.1", port)
    # Installed in a virtualenv that is not on PATH: name the client by its path.
    script = Path(sys.executable).with_name("secure-echo-client")
    if shutil.which("secure-echo-client") is None and script.exists():
        commands = commands.replace("secure-echo-client", shlex.quote(str(script)), 1)
    out = stream or sys.__stdout__ or sys.stdout
    out.write(
        "secure-echo: using a development certificate for localhost "
        f"({'created' if dev.created else 'reused'}).\n"
        f"secure-echo: CA certificate: {dev.ca_cert}\n"
        "secure-echo: connect with:\n"
        f"{commands}\n"
    )
    out.flush()


def _first_tcp_port(ports: list[IListeningPort]) -> int | None:
    for port in ports:
        number = getattr(port.getHost(), "port", None)
        if isinstance(number, int):
            return number
    return None


class OrderedMultiService(MultiService):
    """A MultiService that stops its children one at a time, last added first.

    ``MultiService`` stops every child at once; the log service must outlive the
    services whose shutdown it records (every ``connection_closed`` of a drain).

    ``log_observer``, if set, becomes the twistd application's log observer: twistd
    reads it from the application when it starts logging, after ``makeService``.
    """

    log_observer: ILogObserver | None = None

    @override
    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    @override
    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)
        children = list(self)
        children.reverse()

        async def stop_each() -> None:
            for child in children:
                await defer.maybeDeferred(child.stopService)

        return defer.Deferred.fromCoroutine(stop_each())


def conn_id_prefix(worker: int | None, start: int = 1) -> str:
    """What a process's connection ids start with: nothing alone, else its worker slot.

    A restarted worker counts its connections from 1 again, so its ids also name
    which process of the slot it is: ``2-17``, then ``2.2-1`` after a restart.
    """
    if worker is None:
        return ""
    return f"{worker}-" if start == 1 else f"{worker}.{start}-"


def build_factory(
    cfg: Config, reactor: Any, worker: int | None = None, start: int = 1
) -> tuple[TLSServerFactory, tuple[int, int]]:
    """The TLS server factory of the daemon, and the file-descriptor limits it used.

    Raises the soft file-descriptor limit to the hard one first, so the default
    connection limit is what the process may really hold.  ``worker``: the number
    of a pool's worker, which makes its connection ids ``<worker>-<n>`` (for the
    slot's first process; ``<worker>.<start>-<n>`` for a restarted one) and adds
    ``worker`` to the info reply.
    """
    fd_limits = raise_fd_limit()
    limiter = ConnectionLimiter(
        cfg.max_connections or default_max_connections(fd_limits[0]),
        cfg.max_connections_per_ip,
    )
    settings = LineSettings(
        max_line_length=cfg.max_line_length,
        max_pending=cfg.max_pending,
        handler_timeout=cfg.handler_timeout,
        info_line=cfg.info_line,
        info_fields=None if worker is None else {"worker": worker},
    )
    factory = TLSServerFactory(
        cfg.contexts,
        LineFactory(EchoHandler(), settings, reactor),
        reactor,
        handshake_timeout=cfg.handshake_timeout,
        idle_timeout=cfg.idle_timeout,
        write_stall_timeout=cfg.write_stall_timeout,
        max_connection_age=cfg.max_connection_age,
        limiter=limiter,
        refusals=RefusalLog(reactor),
        proxy=proxy_settings(cfg),
        read_client_hello=cfg.client_hello,
        conn_id_prefix=conn_id_prefix(worker, start),
    )
    return factory, fd_limits


def make_service(
    cfg: Config,
    reactor: Any,
    *,
    listen: ListenStrategy | None = None,
    worker: int | None = None,
    start: int = 1,
) -> MultiService:
    """Build the single-process daemon's services from loaded settings.

    ``listen`` makes the listening service (default: :func:`bind_listens`).
    ``worker``: the tree of worker ``worker`` of ``--workers N``.  Its supervisor owns
    the forced stop on a second signal (:mod:`secure_echo.daemon.signals`) and names
    the settings a reload does not apply (:mod:`secure_echo.daemon.restart`).
    """
    supervised = worker is not None
    top = OrderedMultiService()
    sinks = log_sinks(cfg.log_file, cfg.log_max_bytes, cfg.log_keep, cfg.log_stdout, reactor)
    top.log_observer = sinks.stdout
    if sinks.file is not None:
        sinks.file.setServiceParent(top)
    contexts = cfg.contexts
    factory, fd_limits = build_factory(cfg, reactor, worker, start)
    if sinks.connections is not None:
        factory.connection_log = Logger(factory.log.namespace, factory, sinks.connections)
    if cfg.metrics is not None:
        # Added before TLSService so it stops after the drain: /readyz answers
        # "draining" while connections finish, instead of refusing connections.
        metrics_service(cfg.metrics, factory, reactor, sinks.also).setServiceParent(top)
    TLSService(cfg, factory, reactor, fd_limits).setServiceParent(top)
    # After TLSService, so stopped before it: the drain begins once this stopped.
    SignalService(
        reactor,
        cut=lambda: {"connections": len(factory.connections)},
        forced_stop=not supervised,
        ignore_usr1=sinks.file is None,
    ).setServiceParent(top)
    reloader = TLSReloader(
        contexts,
        # Re-reads --config (if any) so the certificates, keys, client CA, CRLs,
        # test certificates and allow-lists change together; command-line values
        # still win.
        lambda: reload_tls_settings(cfg),
        reactor,
        expiry_warning_days=cfg.expiry_warning_days,
        # A worker's settings are not the ones that started: its supervisor checks.
        restart_check=None if supervised else RestartCheck(cfg).check,
    )
    ReloadService(
        reloader, reactor, cfg.reload_interval, extra_files=(cfg.config_file,)
    ).setServiceParent(top)
    notifier = Notifier.from_environment()

    def listening(ports: list[IListeningPort]) -> None:
        if cfg.log_stdout != "json":  # keep JSON output pure; dev_certificate says it
            print_dev_banner(cfg, _first_tcp_port(ports))
        if notifier is not None:
            # READY=1 once every port listens with a loaded context; the reactor
            # runs from here on, so systemd's start timeout covers all of it.
            reactor.callWhenRunning(notifier.ready, service_status(contexts, ports))

    strategy = listen if listen is not None else bind_listens(cfg, reactor)
    strategy(factory, listening).setServiceParent(top)
    if notifier is not None:
        reloader.before.append(notifier.reloading)
        reloader.after.append(
            lambda ok: notifier.ready(
                service_status(contexts)
                if ok
                else "reload failed, still serving: " + service_status(contexts)
            )
        )
        # Last added, first stopped: STOPPING=1 goes out as the drain starts.
        NotifyService(notifier, reactor, watchdog_interval()).setServiceParent(top)
    return top


def metrics_service(
    endpoint: str, factory: TLSServerFactory, reactor: Any, also: Sequence[LogPublisher] = ()
) -> MetricsService:
    """The ``--metrics`` HTTP service, fed by the daemon's log events.

    ``also`` are further publishers it reads (the connection records').
    """
    metrics = Metrics(active_connections=lambda: len(factory.connections))
    for publisher in (globalLogPublisher, *also):
        publisher.addObserver(metrics.observer)
    return MetricsService(reactor, endpoint, metrics_site(metrics, metrics.state, reactor))


def proxy_settings(cfg: Config) -> ProxySettings | None:
    """The PROXY protocol settings the factory reads headers with, if it is on."""
    if cfg.proxy_protocol == "off":
        return None
    return ProxySettings(
        mode=cast("Any", cfg.proxy_protocol), trusted=cfg.proxy_trusted, timeout=cfg.proxy_timeout
    )


def service_status(contexts: ContextHolder, ports: list[IListeningPort] | None = None) -> str:
    """The one-line STATUS= text systemd shows."""
    loaded = contexts.loaded
    where = ""
    if ports:
        where = "listening on " + ", ".join(format_address(p.getHost()) for p in ports) + "; "
    return f"{where}certificate {loaded.subject} valid until {loaded.not_after:%Y-%m-%d}"
