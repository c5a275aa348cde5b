"""Tests for :mod:`secure_echo.daemon.sdnotify`, against real ``AF_UNIX`` datagram listeners."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import FailTest, SynchronousTestCase

from secure_echo.daemon.sdnotify import (
    Notifier,
    NotifyService,
    monotonic_usec,
    socket_address,
    watchdog_interval,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.trial.unittest import TestCase

#: Seconds a blocking wait for a datagram may take.
RECEIVE_TIMEOUT: Final = 10.0


class NotifyListener:
    """What systemd does with ``NOTIFY_SOCKET``: a bound ``AF_UNIX`` datagram socket.

    ``abstract=False`` binds ``notify.sock`` in a fresh directory under the system
    temporary directory (trial's own directories can be too deep for the 108-byte
    ``sun_path``); ``abstract=True`` binds a unique name in the abstract namespace.
    :attr:`value` is what ``NOTIFY_SOCKET`` would hold.
    """

    def __init__(self, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.directory: Path | None = None
        if abstract:
            name = f"secure-echo-test-{os.getpid()}-{id(self)}-{time.monotonic_ns()}"
            self.sock.bind(b"\0" + name.encode())
            self.value = "@" + name
        else:
            self.directory = Path(tempfile.mkdtemp(prefix="se-notify-"))
            self.path = self.directory / "notify.sock"
            self.sock.bind(str(self.path))
            self.value = str(self.path)
        #: Every datagram received so far, in order.
        self.messages: list[bytes] = []

    def close(self) -> None:
        """Close the socket and remove its directory (idempotent)."""
        self.sock.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def drain(self) -> list[bytes]:
        """Receive every datagram already queued (without waiting); return the new ones."""
        new: list[bytes] = []
        # Non-blocking: with a timeout set, recv would first wait that long.
        self.sock.setblocking(False)
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            new.append(data)
        self.messages += new
        return new

    def wait_for(
        self,
        predicate: Callable[[list[bytes]], bool],
        timeout: float = RECEIVE_TIMEOUT,
    ) -> list[bytes]:
        """Receive until ``predicate(self.messages)``; all messages so far.

        Fails the test (``FailTest``) with what arrived if ``timeout`` s pass first.
        """
        deadline = time.monotonic() + timeout
        self.drain()
        while not predicate(self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                msg = f"no matching notification within {timeout} s; got {self.messages!r}"
                raise FailTest(msg)
            self.sock.settimeout(left)
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(65536))
        return self.messages


def assignments(message: bytes) -> list[str]:
    """The ``NAME=value`` lines of one datagram."""
    return message.decode("utf-8").split("\n")


def index_of(messages: list[bytes], assignment: str, start: int = 0) -> int:
    """The index of the first message at or after ``start`` holding ``assignment``, or -1."""
    for index in range(start, len(messages)):
        if assignment in assignments(messages[index]):
            return index
    return -1


class ListenerCase(SynchronousTestCase):
    """A test with notify listeners that are closed at cleanup."""

    def listener(self, *, abstract: bool = False) -> NotifyListener:
        """A new listener, closed at cleanup."""
        listener = NotifyListener(abstract=abstract)
        self.addCleanup(listener.close)
        return listener

    def notifier(self, listener: NotifyListener) -> Notifier:
        """A notifier for ``listener`` from the environment, closed at cleanup."""
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": listener.value})
        assert notifier is not None
        self.addCleanup(notifier.close)
        return notifier

    def log_events(self) -> EventLoggingObserver:
        """Capture log events emitted during the test."""
        # createWithCleanup only needs addCleanup, which SynchronousTestCase has.
        return EventLoggingObserver.createWithCleanup(cast("TestCase", self), globalLogPublisher)


class FromEnvironmentTests(ListenerCase):
    """Which ``NOTIFY_SOCKET`` values give a notifier."""

    def test_unset_gives_none(self) -> None:
        """Without ``NOTIFY_SOCKET`` (or with it empty) there is no notifier: nothing is sent."""
        self.assertIsNone(Notifier.from_environment({}))
        self.assertIsNone(Notifier.from_environment({"NOTIFY_SOCKET": ""}))

    def test_default_is_os_environ(self) -> None:
        """``from_environment()`` reads ``os.environ``."""
        listener = self.listener()
        self.patch(os, "environ", {"NOTIFY_SOCKET": listener.value})
        notifier = Notifier.from_environment()
        assert notifier is not None
        self.addCleanup(notifier.close)
        self.assertEqual(notifier.address, os.fsencode(listener.value))
        self.patch(os, "environ", {})
        self.assertIsNone(Notifier.from_environment())

    def test_addresses(self) -> None:
        """A path is used as is, ``@name`` is the abstract ``\\0name``; others are refused."""
        self.assertEqual(socket_address("/run/systemd/notify"), b"/run/systemd/notify")
        self.assertEqual(socket_address("@abstract/name"), b"\0abstract/name")
        self.assertIsNone(socket_address("@"))
        self.assertIsNone(socket_address("relative/notify"))
        self.assertIsNone(socket_address("vsock:2:1234"))

    def test_unsupported_value_is_logged(self) -> None:
        """An unusable ``NOTIFY_SOCKET`` gives no notifier and one warning saying which."""
        events = self.log_events()
        self.assertIsNone(Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}))
        (event,) = events
        self.assertEqual(event["event"], "sd_notify_unsupported")
        self.assertEqual(event["notify_socket"], "vsock:2:1234")


class SendTests(ListenerCase):
    """Messages reach the socket verbatim, one datagram each."""

    def test_verbatim_to_path(self) -> None:
        """Each call is one datagram of its assignments joined by newlines, nothing more."""
        listener = self.listener()
        notifier = self.notifier(listener)
        self.assertTrue(notifier.send("READY=1", "STATUS=listening on 127.0.0.1:8443"))
        self.assertTrue(notifier.send("X_CUSTOM=a b=c"))
        self.assertTrue(notifier.notify(STATUS="hello", ERRNO=0))
        self.assertEqual(
            listener.drain(),
            [
                b"READY=1\nSTATUS=listening on 127.0.0.1:8443",
                b"X_CUSTOM=a b=c",
                b"STATUS=hello\nERRNO=0",
            ],
        )
        self.assertEqual((notifier.sent, notifier.dropped), (3, 0))

    def test_verbatim_to_abstract_socket(self) -> None:
        """``@name`` reaches a listener bound in the abstract namespace."""
        listener = self.listener(abstract=True)
        notifier = self.notifier(listener)
        self.assertTrue(notifier.ready("up"))
        self.assertEqual(listener.drain(), [b"READY=1\nSTATUS=up"])

    def test_helpers(self) -> None:
        """The helpers send the assignments systemd documents for each state."""
        listener = self.listener()
        notifier = Notifier(
            os.fsencode(listener.value), listener.value, clock_usec=lambda: 1234567
        )
        self.addCleanup(notifier.close)
        notifier.ready()
        notifier.ready("serving")
        notifier.reloading()
        notifier.reloading("reloading the certificate")
        notifier.status("2 connections")
        notifier.watchdog()
        notifier.stopping()
        notifier.stopping("draining")
        self.assertEqual(
            listener.drain(),
            [
                b"READY=1",
                b"READY=1\nSTATUS=serving",
                b"RELOADING=1\nMONOTONIC_USEC=1234567",
                b"RELOADING=1\nMONOTONIC_USEC=1234567\nSTATUS=reloading the certificate",
                b"STATUS=2 connections",
                b"WATCHDOG=1",
                b"STOPPING=1",
                b"STOPPING=1\nSTATUS=draining",
            ],
        )

    def test_monotonic_usec_is_clock_monotonic(self) -> None:
        """``MONOTONIC_USEC=`` is ``CLOCK_MONOTONIC`` in microseconds, as systemd compares it."""
        listener = self.listener()
        notifier = self.notifier(listener)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        (message,) = listener.drain()
        reloading, stamp = assignments(message)
        self.assertEqual(reloading, "RELOADING=1")
        name, _, value = stamp.partition("=")
        self.assertEqual(name, "MONOTONIC_USEC")
        self.assertTrue(before <= int(value) <= after, (before, value, after))
        self.assertTrue(before <= monotonic_usec())

    def test_status_stays_on_one_line(self) -> None:
        """A multi-line status is folded: its lines cannot pose as other assignments."""
        listener = self.listener()
        notifier = self.notifier(listener)
        notifier.status("reload failed:\nREADY=1\r\nbad key")
        notifier.ready("a\nb")
        self.assertEqual(
            listener.drain(),
            [b"STATUS=reload failed: READY=1 bad key", b"READY=1\nSTATUS=a b"],
        )

    def test_same_status_sent_once(self) -> None:
        """A status systemd already has is not sent again; a changed one is."""
        listener = self.listener()
        notifier = self.notifier(listener)
        self.assertTrue(notifier.ready("1/2 workers serving"))
        self.assertTrue(notifier.status("1/2 workers serving"))
        self.assertTrue(notifier.status("2/2 workers serving"))
        self.assertTrue(notifier.status("2/2 workers serving"))
        self.assertTrue(notifier.status("1/2 workers serving"))
        self.assertEqual(
            listener.drain(),
            [
                b"READY=1\nSTATUS=1/2 workers serving",
                b"STATUS=2/2 workers serving",
                b"STATUS=1/2 workers serving",
            ],
        )

    def test_malformed_assignment_is_refused(self) -> None:
        """``send`` refuses an assignment without ``=`` or with a newline, and sends nothing."""
        listener = self.listener()
        notifier = self.notifier(listener)
        self.assertRaises(ValueError, notifier.send, "READY")
        self.assertRaises(ValueError, notifier.send, "STATUS=ok", "STATUS=a\nREADY=1")
        self.assertFalse(notifier.send())
        self.assertEqual(listener.drain(), [])

    def test_socket_reopened_after_close(self) -> None:
        """``close`` releases the socket; the next message opens a new one."""
        listener = self.listener()
        notifier = self.notifier(listener)
        notifier.status("one")
        notifier.close()
        notifier.close()
        notifier.status("two")
        self.assertEqual(listener.drain(), [b"STATUS=one", b"STATUS=two"])


class FailureTests(ListenerCase):
    """No failure to notify ever reaches the caller, and the log hears of it once."""

    def test_socket_gone(self) -> None:
        """With the socket path removed, sends return False, never raise, and log once."""
        listener = self.listener()
        notifier = self.notifier(listener)
        events = self.log_events()
        listener.close()
        self.assertFalse(notifier.ready("up"))
        self.assertFalse(notifier.watchdog())
        self.assertFalse(notifier.stopping())
        self.assertEqual((notifier.sent, notifier.dropped), (0, 3))
        (event,) = events
        self.assertEqual(event["event"], "sd_notify_failed")
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(event["notify_socket"], listener.value)
        self.assertEqual(event["errno"], "ENOENT")
        self.assertEqual(event["names"], ["READY", "STATUS"])

    def test_abstract_socket_gone(self) -> None:
        """An abstract name nobody listens on is refused; the caller never sees it."""
        listener = self.listener(abstract=True)
        notifier = self.notifier(listener)
        events = self.log_events()
        listener.close()
        self.assertFalse(notifier.watchdog())
        self.assertFalse(notifier.watchdog())
        (event,) = events
        self.assertEqual(event["event"], "sd_notify_failed")
        self.assertEqual(event["errno"], "ECONNREFUSED")

    def test_queue_full_drops_quietly(self) -> None:
        """A listener that never reads fills up; sends then fail at once, unlogged."""
        listener = self.listener()
        notifier = self.notifier(listener)
        events = self.log_events()
        started = time.monotonic()
        results = [notifier.watchdog() for _ in range(5000)]
        self.assertLess(time.monotonic() - started, RECEIVE_TIMEOUT)
        self.assertIn(False, results)
        self.assertIn(True, results)
        self.assertEqual(notifier.sent + notifier.dropped, 5000)
        self.assertEqual(list(events), [])
        # Once systemd reads again, messages get through.
        listener.drain()
        self.assertTrue(notifier.ready())

    def test_socket_cannot_be_made(self) -> None:
        """Even creating the socket failing (no descriptors left) is only logged."""
        listener = self.listener()
        notifier = self.notifier(listener)
        events = self.log_events()

        def no_socket(*_args: object, **_kwargs: object) -> socket.socket:
            raise OSError(24, "Too many open files")

        self.patch(socket, "socket", no_socket)
        self.assertFalse(notifier.status("x"))
        (event,) = events
        self.assertEqual(event["errno"], "EMFILE")


class WatchdogIntervalTests(SynchronousTestCase):
    """How ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` set the ping interval."""

    def test_half_of_watchdog_usec(self) -> None:
        """Pings go out every half of ``WATCHDOG_USEC``, in seconds."""
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "500000"}), 0.25)
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}), 15.0)

    def test_own_pid(self) -> None:
        """``WATCHDOG_PID`` naming this process keeps the watchdog on."""
        environ = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
        self.assertEqual(watchdog_interval(environ), 1.0)

    def test_other_pid(self) -> None:
        """``WATCHDOG_PID`` naming another process (we are its child) turns pings off."""
        environ = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
        self.assertIsNone(watchdog_interval(environ))

    def test_unset_or_invalid(self) -> None:
        """No, zero, negative or non-numeric ``WATCHDOG_USEC`` means no watchdog."""
        for environ in (
            {},
            {"WATCHDOG_USEC": ""},
            {"WATCHDOG_USEC": "0"},
            {"WATCHDOG_USEC": "-5"},
            {"WATCHDOG_USEC": "soon"},
            {"WATCHDOG_PID": str(os.getpid())},
        ):
            self.assertIsNone(watchdog_interval(environ), environ)

    def test_default_is_os_environ(self) -> None:
        """``watchdog_interval()`` reads ``os.environ``."""
        self.patch(os, "environ", {"WATCHDOG_USEC": "1000000"})
        self.assertEqual(watchdog_interval(), 0.5)


class NotifyServiceTests(ListenerCase):
    """The watchdog loop runs on the injected clock while the service runs."""

    def service(
        self, listener: NotifyListener, interval: float | None
    ) -> tuple[NotifyService, Clock, Notifier]:
        clock = Clock()
        notifier = self.notifier(listener)
        return NotifyService(notifier, clock, interval), clock, notifier

    def test_pings_every_half_interval(self) -> None:
        """With ``WATCHDOG_USEC=500000`` a ping goes out at start and every 0.25 s."""
        listener = self.listener()
        service, clock, _ = self.service(listener, watchdog_interval({"WATCHDOG_USEC": "500000"}))
        events = self.log_events()
        service.startService()
        self.assertEqual(listener.drain(), [b"WATCHDOG=1"])
        clock.advance(0.2)
        self.assertEqual(listener.drain(), [])
        clock.advance(0.05)
        self.assertEqual(listener.drain(), [b"WATCHDOG=1"])
        for _ in range(4):
            clock.advance(0.25)
        self.assertEqual(listener.drain(), [b"WATCHDOG=1"] * 4)
        (event,) = events
        self.assertEqual(event["event"], "watchdog_enabled")
        self.assertEqual(event["interval"], 0.25)
        service.stopService()

    def test_stop_sends_stopping_and_ends_pings(self) -> None:
        """``stopService`` sends ``STOPPING=1``; no ping follows, no call stays scheduled."""
        listener = self.listener()
        service, clock, _ = self.service(listener, 0.25)
        service.startService()
        clock.advance(0.25)
        self.assertEqual(listener.drain(), [b"WATCHDOG=1", b"WATCHDOG=1"])
        service.stopService()
        self.assertFalse(service.running)
        self.assertEqual(listener.drain(), [b"STOPPING=1"])
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)
        self.assertEqual(listener.drain(), [])

    def test_without_watchdog(self) -> None:
        """No interval: no pings and no scheduled calls, but ``STOPPING=1`` at stop."""
        listener = self.listener()
        service, clock, _ = self.service(listener, None)
        service.startService()
        clock.advance(100)
        self.assertEqual(listener.drain(), [])
        self.assertEqual(clock.getDelayedCalls(), [])
        service.stopService()
        self.assertEqual(listener.drain(), [b"STOPPING=1"])

    def test_other_watchdog_pid_disables_pings(self) -> None:
        """``WATCHDOG_PID`` of another process: the service built from it never pings."""
        listener = self.listener()
        environ = {"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid() + 1)}
        service, clock, _ = self.service(listener, watchdog_interval(environ))
        service.startService()
        clock.advance(5)
        self.assertEqual(listener.drain(), [])
        service.stopService()

    def test_pings_survive_a_lost_socket(self) -> None:
        """Pings to a vanished socket fail quietly; the loop keeps running and can recover."""
        listener = self.listener()
        service, clock, notifier = self.service(listener, 0.25)
        service.startService()
        listener.close()
        clock.advance(0.25)
        clock.advance(0.25)
        self.assertEqual(notifier.dropped, 2)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        service.stopService()
        self.assertEqual(notifier.dropped, 3)  # STOPPING=1 was lost too; nothing raised
        self.assertEqual(clock.getDelayedCalls(), [])
