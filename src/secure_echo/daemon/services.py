"""The listening service: binds every ``--listen`` endpoint or stops start-up.

Twisted's ``StreamServerEndpointService`` only logs a failed listen and leaves a
daemon with no socket.  :class:`ListeningService` listens in
``privilegedStartService`` (before ``--uid``/``--gid`` drop privileges, so port 443
works), requires each listen to succeed synchronously, and on any failure closes
what it opened, prints one line (option, problem, fix) and exits non-zero.
"""

from __future__ import annotations

import errno
import sys
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from secure_echo.edge.addresses import format_address
from secure_echo.tls.stream import use_stream_transport

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.interfaces import IListeningPort, IProtocolFactory

    from secure_echo.daemon.settings import Listen


class ListenError(Exception):
    """An endpoint could not be listened on; ``str()`` is the one-line message."""


def describe_listen_failure(description: str, failure: Failure) -> str:
    """One line: which endpoint, what went wrong, what to do."""
    error = failure.value
    cause = getattr(error, "socketError", None) or error
    code = getattr(cause, "errno", None)
    if code == errno.EADDRINUSE:
        return (
            f"--listen {description}: address already in use; "
            "stop the other process or choose another port"
        )
    if code == errno.EACCES:
        return (
            f"--listen {description}: permission denied; use a port above 1023, "
            "start as root with --uid/--gid, or grant CAP_NET_BIND_SERVICE"
        )
    if code == errno.EADDRNOTAVAIL:
        return (
            f"--listen {description}: no such local address; "
            "give an interface address this host has (e.g. 127.0.0.1)"
        )
    text = getattr(cause, "strerror", None) or str(error) or type(error).__name__
    return f"--listen {description}: cannot listen ({text}); check the endpoint string"


class ListeningService(Service):
    """Listen on each endpoint with one factory; log ``listening`` for each port."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listens: tuple[Listen, ...],
        factory: IProtocolFactory,
        on_listening: Callable[[list[IListeningPort]], object] | None = None,
    ) -> None:
        self._reactor = reactor
        self._listens = listens
        self._factory = factory
        self._on_listening = on_listening
        self.ports: list[IListeningPort] = []

    @override
    def privilegedStartService(self) -> None:
        try:
            self.listen_all()
        except ListenError as error:
            # twistd has pointed sys.stderr at its log by now; the operator who
            # started us must see why we stop, so write to the original stream.
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"twistd secure-echo: {error}\n")
            stream.flush()
            raise SystemExit(1) from None
        if self._on_listening is not None:
            self._on_listening(list(self.ports))
        super().privilegedStartService()

    def listen_all(self) -> None:
        """Listen everywhere or nowhere; raise :class:`ListenError` on failure."""
        for listen in self._listens:
            endpoint = endpoints.serverFromString(self._reactor, listen.description)
            outcome: list[object] = []
            endpoint.listen(self._factory).addBoth(outcome.append)
            result = outcome[0] if outcome else None
            if not isinstance(result, Failure) and result is not None:
                port: IListeningPort = result  # type: ignore[assignment]
                use_stream_transport(port)
                self.ports.append(port)
                host = port.getHost()
                self.log.info(
                    "listening on {address} ({endpoint})",
                    event="listening",
                    endpoint=listen.description,
                    address=format_address(host),
                    host=getattr(host, "host", None),
                    port=getattr(host, "port", None),
                    path=getattr(host, "name", None),
                )
                continue
            self._close_ports()
            if isinstance(result, Failure):
                message = describe_listen_failure(listen.given or listen.description, result)
            else:  # pragma: no cover - every endpoint type we allow listens synchronously
                given = listen.given or listen.description
                message = f"--listen {given}: did not start listening at once"
            raise ListenError(message)

    def _close_ports(self) -> None:
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()

    @override
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in ports]
        ).addCallback(lambda _: None)


__all__ = [
    "CannotListenError",
    "ListenError",
    "ListeningService",
    "MetricsService",
    "describe_listen_failure",
]


class MetricsService(Service):
    """Serve the metrics site on ``--metrics``; a failed listen stops start-up too.

    It logs ``metrics_listening`` (not ``listening``, which names the TLS ports).
    """

    log = Logger()

    def __init__(self, reactor: Any, description: str, site: IProtocolFactory) -> None:
        self._reactor = reactor
        self._description = description
        self._site = site
        self.port: IListeningPort | None = None

    @override
    def privilegedStartService(self) -> None:
        endpoint = endpoints.serverFromString(self._reactor, self._description)
        outcome: list[object] = []
        endpoint.listen(self._site).addBoth(outcome.append)
        result = outcome[0] if outcome else None
        if isinstance(result, Failure) or result is None:
            message = (
                describe_listen_failure(self._description, result)
                if isinstance(result, Failure)
                else f"--listen {self._description}: did not start listening at once"
            ).replace("--listen", "--metrics", 1)
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"twistd secure-echo: {message}\n")
            stream.flush()
            raise SystemExit(1)
        self.port = cast("IListeningPort", result)
        host = self.port.getHost()
        self.log.info(
            "metrics on http://{address}/metrics",
            event="metrics_listening",
            endpoint=self._description,
            address=format_address(host),
            port=getattr(host, "port", None),
        )
        super().privilegedStartService()

    @override
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: None)
