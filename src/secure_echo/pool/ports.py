"""Adopting the supervisor's listening sockets: a worker's listen strategy.

The single process binds its ``--listen`` endpoints
(:func:`secure_echo.daemon.maker.bind_listens`); a worker of a pool passes
:func:`adopt` to :func:`~secure_echo.daemon.maker.make_service` instead, so the same
tree accepts on the sockets its supervisor bound and handed down
(:class:`~secure_echo.pool.contract.SharedSocket`).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import Service
from twisted.internet import defer, error, tcp, unix
from typing_extensions import override

from secure_echo.tls.stream import use_stream_transport

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from twisted.application.service import IService
    from twisted.internet.interfaces import IListeningPort, IProtocolFactory
    from twisted.python.failure import Failure

    from secure_echo.daemon.maker import ListenStrategy
    from secure_echo.pool.contract import SharedSocket
    from secure_echo.tls.factory import TLSServerFactory


class _SharedUNIXPort(unix.Port):
    """A UNIX port on a socket the supervisor bound, listens on, and owns.

    Twisted's adopted UNIX port (``adoptStreamPort``) calls ``listen()`` again with its
    default backlog of 50, shrinking the one the supervisor set; ``chmod``\\ s the path
    to its default mode (which an unprivileged worker may not do, and which would undo
    ``mode=``); and on close shuts the socket down for every process and removes the
    path that the other workers, and this one's successor, still serve.  This one only
    reads: the supervisor removes the path when it stops.
    """

    # Closing our descriptor must not shut the shared socket down.
    _shouldShutdown = False

    @override
    def startListening(self) -> None:
        # unix.Port.startListening for an adopted socket, without listen() and chmod.
        port: Any = self  # Twisted's port attributes are untyped
        skt = port._preexistingSocket
        if skt is None:  # pragma: no cover - built only by adopt_port below
            raise error.CannotListenError(None, port.port, "no socket to adopt")
        port._preexistingSocket = None
        port.factory.doStart()
        port.connected = True
        port.socket = skt
        port.fileno = skt.fileno
        port.numberAccepts = 100
        port.startReading()

    @override
    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)  # not unix.Port's: it removes the path


def adopt_port(reactor: Any, shared: SharedSocket, factory: IProtocolFactory) -> IListeningPort:
    """Accept on ``shared`` with ``factory``; the caller then closes ``shared.fd``.

    The port holds its own duplicate of the descriptor.  A TCP port adopted this way
    never calls ``listen()`` or ``shutdown()`` (Twisted's own rule for adopted sockets).
    """
    # Twisted accepts in a loop until EAGAIN: on a blocking socket (systemd's default,
    # NonBlocking=no) the second accept would hang the worker.  The flag belongs to
    # the socket all processes share, where non-blocking is right for everyone.
    os.set_blocking(shared.fd, False)
    if shared.address_family == socket.AF_UNIX:
        unix_port: Any = _SharedUNIXPort._fromListeningDescriptor(  # type: ignore[no-untyped-call]
            reactor, shared.fd, factory
        )
        unix_port.startListening()
        return cast("IListeningPort", unix_port)
    port = reactor.adoptStreamPort(shared.fd, shared.address_family, factory)
    use_stream_transport(port)
    return cast("IListeningPort", port)


class SharedPortsService(Service):
    """Accept on the supervisor's sockets; stop accepting when stopped.

    Stands where ``ListeningService`` stands in the single-process tree (stopped
    before the drain begins).  ``factory`` is the tree's TLS factory, whose open
    connections the worker reports.
    """

    def __init__(
        self, reactor: Any, sockets: Sequence[SharedSocket], factory: TLSServerFactory
    ) -> None:
        self._reactor = reactor
        self._sockets = tuple(sockets)
        self.factory = factory
        self.ports: list[IListeningPort] = []

    @override
    def privilegedStartService(self) -> None:
        try:
            for shared in self._sockets:
                self.ports.append(adopt_port(self._reactor, shared, self.factory))
        except BaseException:
            for port in self.ports:
                port.stopListening()
            self.ports.clear()
            raise
        # Each port holds a duplicate: close the inherited descriptors, so that a
        # port that stops listening leaves no copy behind in this process.
        for shared in self._sockets:
            os.close(shared.fd)
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    @override
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        ports, self.ports = self.ports, []
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in ports]
        ).addCallback(lambda _: None)


def adopt(
    reactor: Any, sockets: Sequence[SharedSocket], built: list[SharedPortsService]
) -> ListenStrategy:
    """The listen strategy of a worker: adopt ``sockets``; the service goes in ``built``."""

    def listen(
        factory: TLSServerFactory,
        on_listening: Callable[[list[IListeningPort]], object],  # noqa: ARG001 - nothing binds
    ) -> IService:
        service = SharedPortsService(reactor, sockets, factory)
        built.append(service)
        return service

    return listen
