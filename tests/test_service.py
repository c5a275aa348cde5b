"""Tests for :mod:`secure_echo.daemon.services`: listening for real, or stopping start-up."""

from __future__ import annotations

import errno
import io
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from secure_echo.daemon.services import ListeningService, MetricsService, describe_listen_failure
from secure_echo.daemon.settings import validate_listen


def _port_is_free(port: int) -> bool:
    """Whether a plain socket can bind 127.0.0.1:``port`` right now."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class ListeningServiceTests(TestCase):
    """The service on the real reactor, with real sockets on the loopback interface."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.factory = Factory.forProtocol(Protocol)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        # Listen failures go to the original stderr, which twistd leaves alone.
        self.patch(sys, "__stderr__", self.stderr)

    def service(self, *descriptions: str) -> ListeningService:
        listens = tuple(validate_listen(d) for d in descriptions)
        return ListeningService(reactor, listens, self.factory)

    def listening_events(self) -> list[dict[str, object]]:
        return [dict(e) for e in self.events if e.get("event") == "listening"]

    def wait_until_free(self, port: int) -> Deferred[None]:
        """Fire once ``port`` can be bound again (closing a port takes a reactor turn)."""

        async def poll() -> None:
            for _ in range(100):
                if _port_is_free(port):
                    return
                await task.deferLater(reactor, 0.01, lambda: None)
            self.fail(f"port {port} is still in use")

        return Deferred.fromCoroutine(poll())

    def test_listens_and_logs_real_port(self) -> None:
        """Port 0 listens on a real port and logs ``listening`` with that port."""
        service = self.service("tcp:0:interface=127.0.0.1")
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        service.startService()
        self.assertEqual(len(service.ports), 1)
        port = service.ports[0].getHost().port  # type: ignore[attr-defined]
        self.assertNotEqual(port, 0)
        self.assertFalse(_port_is_free(port))
        [event] = self.listening_events()
        self.assertEqual(event["port"], port)
        self.assertEqual(event["host"], "127.0.0.1")
        self.assertEqual(event["address"], f"127.0.0.1:{port}")
        self.assertEqual(event["endpoint"], "tcp:0:interface=127.0.0.1:backlog=4096")
        self.assertEqual(self.stderr.getvalue(), "")

    def test_listens_on_every_endpoint(self) -> None:
        """Every --listen endpoint listens and gets its own ``listening`` event."""
        service = self.service("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1")
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        ports = [p.getHost().port for p in service.ports]  # type: ignore[attr-defined]
        self.assertEqual(len(set(ports)), 2)
        self.assertEqual([e["port"] for e in self.listening_events()], ports)

    def test_unix_socket(self) -> None:
        """A UNIX socket endpoint listens and logs its path."""
        directory = Path(tempfile.mkdtemp(prefix="se-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        path = directory / "echo.sock"
        service = self.service(f"unix:{path}")
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        self.assertTrue(path.is_socket())
        [event] = self.listening_events()
        self.assertEqual(event["address"], f"unix:{path}")

    def test_busy_port_exits(self) -> Deferred[None]:
        """A busy port: exit status 1, one stderr line, and earlier ports are closed."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        service = self.service("tcp:0:interface=127.0.0.1", f"tcp:{busy_port}:interface=127.0.0.1")
        error = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertEqual(error.code, 1)
        output = self.stderr.getvalue()
        self.assertEqual(output.count("\n"), 1, output)
        self.assertIn(f"--listen tcp:{busy_port}:interface=127.0.0.1", output)
        self.assertIn("already in use", output)
        self.assertEqual(service.ports, [])
        [opened] = self.listening_events()
        first = opened["port"]
        assert isinstance(first, int)
        return self.wait_until_free(first)

    def test_unavailable_address_exits(self) -> None:
        """An interface address this host does not have: exit 1 naming the problem."""
        service = self.service("tcp:0:interface=192.0.2.1")
        error = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertEqual(error.code, 1)
        self.assertIn("no such local address", self.stderr.getvalue())
        self.assertEqual(self.listening_events(), [])

    def test_stop_service_stops_listening(self) -> Deferred[None]:
        """After stopService's Deferred fires the port is free again."""
        service = self.service("tcp:0:interface=127.0.0.1")
        service.privilegedStartService()
        service.startService()
        port = service.ports[0].getHost().port  # type: ignore[attr-defined]
        stopped = service.stopService()
        self.assertEqual(service.ports, [])
        self.assertFalse(service.running)

        def check(_: object) -> None:
            self.assertTrue(_port_is_free(port))

        return stopped.addCallback(check)


def _failure(error: BaseException) -> Failure:
    return Failure(error)


class DescribeListenFailureTests(SynchronousTestCase):
    """The one-line messages for failed listens."""

    def cannot_listen(self, code: int, text: str) -> Failure:
        return _failure(CannotListenError("127.0.0.1", 443, OSError(code, text)))

    def test_in_use(self) -> None:
        """EADDRINUSE says the address is in use and what to do."""
        message = describe_listen_failure("tcp:443", self.cannot_listen(errno.EADDRINUSE, "x"))
        self.assertTrue(message.startswith("--listen tcp:443: address already in use; "))

    def test_permission(self) -> None:
        """EACCES explains privileged ports and the ways around them."""
        message = describe_listen_failure("tcp:443", self.cannot_listen(errno.EACCES, "x"))
        self.assertTrue(message.startswith("--listen tcp:443: permission denied; "))
        self.assertIn("CAP_NET_BIND_SERVICE", message)
        self.assertIn("--uid", message)

    def test_no_such_address(self) -> None:
        """EADDRNOTAVAIL asks for an address this host has."""
        message = describe_listen_failure(
            "tcp:443:interface=10.9.9.9", self.cannot_listen(errno.EADDRNOTAVAIL, "x")
        )
        self.assertTrue(
            message.startswith("--listen tcp:443:interface=10.9.9.9: no such local address; ")
        )

    def test_other_os_error(self) -> None:
        """Any other OS error is reported with its text."""
        message = describe_listen_failure(
            "tcp:443", self.cannot_listen(errno.EMFILE, "Too many open files")
        )
        self.assertEqual(
            message,
            "--listen tcp:443: cannot listen (Too many open files); check the endpoint string",
        )

    def test_bare_os_error(self) -> None:
        """A plain OSError (not wrapped in CannotListenError) is recognised too."""
        message = describe_listen_failure("unix:/x", _failure(OSError(errno.EACCES, "denied")))
        self.assertIn("permission denied", message)

    def test_other_exception(self) -> None:
        """A non-OS error is reported by its text, or its type when it has none."""
        self.assertIn("(weird)", describe_listen_failure("tcp:1", _failure(ValueError("weird"))))
        self.assertIn("(ValueError)", describe_listen_failure("tcp:1", _failure(ValueError())))

    def test_one_line(self) -> None:
        """Every message is one line."""
        for code in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL, errno.EMFILE):
            self.assertNotIn("\n", describe_listen_failure("tcp:1", self.cannot_listen(code, "x")))


class MetricsServiceTests(TestCase):
    """The --metrics listener: a real port, and a busy one stops start-up."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.patch(sys, "__stderr__", self.stderr)

    async def test_listens_and_stops(self) -> None:
        """It listens on the endpoint, logs metrics_listening with the port, and stops."""
        service = MetricsService(
            reactor, "tcp:0:interface=127.0.0.1", Factory.forProtocol(Protocol)
        )
        service.privilegedStartService()
        service.startService()
        (event,) = [e for e in self.events if e.get("event") == "metrics_listening"]
        assert service.port is not None
        self.assertEqual(event["port"], service.port.getHost().port)  # type: ignore[attr-defined]
        await service.stopService()
        self.assertIsNone(service.port)

    def test_busy_port_exits(self) -> None:
        """A port in use stops start-up with one line naming --metrics."""
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        service = MetricsService(
            reactor, f"tcp:{port}:interface=127.0.0.1", Factory.forProtocol(Protocol)
        )
        with self.assertRaises(SystemExit):
            service.privilegedStartService()
        output = self.stderr.getvalue()
        self.assertEqual(output.count("\n"), 1, output)
        self.assertIn("--metrics", output)
        self.assertIn("already in use", output)
