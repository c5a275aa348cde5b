"""The service tree of a ``--workers N`` supervisor: what :mod:`secure_echo.tap` runs for N > 1.

The counterpart of :func:`secure_echo.daemon.maker.make_service`: the same log
file, metrics page, signals and systemd notifier, with the
:class:`~secure_echo.pool.supervisor.WorkerSupervisor` in place of the TLS service
and the listening service.  ``/healthz`` and ``/readyz`` answer from the workers'
reported state (:class:`~secure_echo.pool.health.PoolState`), and the connections
gauge sums the workers' heartbeats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import globalLogPublisher

from secure_echo.daemon import maker
from secure_echo.daemon.logs import log_sinks
from secure_echo.daemon.metrics import Metrics, metrics_site
from secure_echo.daemon.restart import RestartCheck
from secure_echo.daemon.sdnotify import Notifier, NotifyService, watchdog_interval
from secure_echo.daemon.services import MetricsService
from secure_echo.daemon.signals import SignalService
from secure_echo.pool.reload import RestartWatch
from secure_echo.pool.supervisor import WorkerSupervisor, kill_workers, worker_values
from secure_echo.pool.tlsfiles import read_tls_files

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort

    from secure_echo.daemon import options as config
    from secure_echo.daemon.load import Config


def _first_tcp_port(ports: list[IListeningPort]) -> int | None:
    for port in ports:
        number = getattr(port.getHost(), "port", None)
        if isinstance(number, int):
            return number
    return None


def make_supervisor(
    options: config.Options, cfg: Config, reactor: Any
) -> maker.OrderedMultiService:
    """The services of a ``--workers N`` supervisor (``maker.make_service`` for N > 1).

    Children in start order (stopped in reverse): the log file, the metrics page, the
    supervisor, the restart watch, the signals, systemd's notifier.  So at shutdown
    ``STOPPING=1`` goes first, then the workers drain while the log and metrics still
    take their records.  The TLS files are read here, while twistd may still be root
    (:mod:`secure_echo.pool.tlsfiles`).
    """
    top = maker.OrderedMultiService()  # type: ignore[no-untyped-call]
    sinks = log_sinks(cfg.log_file, cfg.log_max_bytes, cfg.log_keep, cfg.log_stdout, reactor)
    top.log_observer = sinks.stdout
    if sinks.file is not None:
        sinks.file.setServiceParent(top)  # type: ignore[no-untyped-call]
    notifier = Notifier.from_environment()

    def listening(ports: list[IListeningPort]) -> None:
        if cfg.log_stdout != "json":  # keep JSON output pure; dev_certificate says it
            maker.print_dev_banner(cfg, _first_tcp_port(ports))

    supervisor = WorkerSupervisor(
        reactor,
        cfg.workers,
        worker_values(options),
        listens=cfg.listens,
        config_file=cfg.config_file,
        command_line=cfg.command_line,
        drain_timeout=cfg.drain_timeout,
        watchdog=cfg.worker_watchdog,
        certificate=(cfg.tls.subject, cfg.tls.not_after.isoformat()),
        notifier=notifier,
        connection_publisher=sinks.connections,
        on_listening=listening,
        tls_files=read_tls_files(cfg.tls_settings),
    )
    if cfg.metrics is not None:
        metrics = Metrics(active_connections=supervisor.state.connections)
        for publisher in (globalLogPublisher, *sinks.also):
            publisher.addObserver(metrics.observer)
        MetricsService(
            reactor, cfg.metrics, metrics_site(metrics, supervisor.state, reactor)
        ).setServiceParent(top)  # type: ignore[no-untyped-call]
    supervisor.setServiceParent(top)  # type: ignore[no-untyped-call]
    RestartWatch(RestartCheck(cfg), reactor).setServiceParent(top)  # type: ignore[no-untyped-call]
    # After the supervisor, so stopped first: a second signal from then on forces.
    SignalService(
        reactor, cut=lambda: kill_workers(supervisor), ignore_usr1=sinks.file is None
    ).setServiceParent(top)  # type: ignore[no-untyped-call]
    if notifier is not None:
        # Last added, first stopped: STOPPING=1 goes out as the drain starts.
        NotifyService(notifier, reactor, watchdog_interval()).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
