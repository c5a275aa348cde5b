"""The real daemon under socket activation, telling a notify socket how it is doing.

``systemd-socket-activate`` stands in for systemd: it binds the port, names the
socket (``--fdname=secure-echo``) and, on the first connection attempt, execs the
daemon in its own process (same PID, so ``LISTEN_PID`` matches) with the listening
socket as fd 3.  Without ``--accept`` it does not accept that connection; the
daemon does, once it has adopted the socket.  The child gets only ``PATH``,
``HOME``, ``USER``, ``TERM``, the ``LISTEN_*`` variables and what ``-E`` sets, so
``PYTHONPATH`` and friends are passed with ``-E``.

A :class:`tests.test_sdnotify.NotifyListener` plays systemd's notify socket.  The
daemon is expected to send ``READY=1`` (with ``STATUS=``) once it listens with a
loaded TLS context, ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, ``RELOADING=1``
(with ``MONOTONIC_USEC=``) then ``READY=1`` around a SIGHUP reload, and
``STOPPING=1`` at SIGTERM.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Final

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.daemon import (
    POLL_INTERVAL,
    START_TIMEOUT,
    Daemon,
    DaemonError,
    child_env,
    twistd_command,
)
from tests.helpers import PKI, make_pki
from tests.test_integration import TLSClient, client_context
from tests.test_sdnotify import NotifyListener, assignments, index_of

#: The endpoint the daemon adopts the passed socket with (its FileDescriptorName).
SYSTEMD_LISTEN: Final = "systemd:domain=INET:name=secure-echo"
#: Environment variables of :func:`tests.daemon.child_env` the daemon needs.
PASSED_PREFIXES: Final = ("PYTHON", "COVERAGE", "LANG", "LC_")
#: Seconds to wait for a notification the daemon should send soon.
NOTIFY_TIMEOUT: Final = 10.0

_pki: PKI | None = None


def shared_pki() -> PKI:
    """Certificates for every daemon of this module (made on first use)."""
    global _pki  # noqa: PLW0603 - one lazily made PKI per test process
    if _pki is None:
        _pki = make_pki(Path("socket-activation-pki").absolute())
    return _pki


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def has(messages: list[bytes], assignment: str, count: int = 1) -> bool:
    """Whether at least ``count`` messages hold ``assignment``."""
    return sum(assignment in assignments(m) for m in messages) >= count


def wait_for_message(listener: NotifyListener, assignment: str, start: int = 0) -> int:
    """Wait for a message holding ``assignment`` at index ``start`` or later; its index."""
    listener.wait_for(lambda m: index_of(m, assignment, start) >= 0, NOTIFY_TIMEOUT)
    return index_of(listener.messages, assignment, start)


class SocketActivationCase(SynchronousTestCase):
    """Starts socket-activated daemons; each is stopped at cleanup."""

    def setUp(self) -> None:
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise SkipTest("systemd-socket-activate is not installed")
        self.activate = activate
        self.pki = shared_pki()
        self.listener = NotifyListener()
        self.addCleanup(self.listener.close)

    def start(self, *args: str, environment: dict[str, str] | None = None) -> Daemon:
        """``systemd-socket-activate ... twistd -n secure-echo --listen systemd:...``.

        Returns once the socket is bound (the daemon is not running yet: the first
        connection starts it).  ``environment`` adds variables for the daemon.
        """
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        log_path = directory / "log.jsonl"
        stdout_path = directory / "stdout.txt"
        stderr_path = directory / "stderr.txt"
        port = free_port()
        env = child_env()
        passed = {k: v for k, v in env.items() if k.startswith(PASSED_PREFIXES)}
        passed["NOTIFY_SOCKET"] = self.listener.value
        passed.update(environment or {})
        daemon_args = ("--listen", SYSTEMD_LISTEN, "--log-file", str(log_path), *args)
        command = [
            self.activate,
            f"--listen=127.0.0.1:{port}",
            "--fdname=secure-echo",
            *(f"--setenv={name}={value}" for name, value in sorted(passed.items())),
            *twistd_command(*daemon_args),
        ]
        stdout = stdout_path.open("wb")
        stderr = stderr_path.open("wb")
        process = subprocess.Popen(
            command,
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
        daemon = Daemon(
            process,
            directory,
            log_path,
            stdout_path,
            stderr_path,
            tuple(command),
            port=port,
            _files=[stdout, stderr],
        )
        self.addCleanup(self._stop, daemon)
        deadline = time.monotonic() + START_TIMEOUT
        while "Listening on" not in daemon.stderr():
            if process.poll() is not None or time.monotonic() > deadline:
                msg = f"systemd-socket-activate did not listen\n{daemon.describe()}"
                raise DaemonError(msg)
            time.sleep(POLL_INTERVAL)
        return daemon

    def start_default(self, environment: dict[str, str] | None = None) -> Daemon:
        """A daemon with the test server certificate."""
        pki = self.pki
        return self.start(
            "--cert", str(pki.server_cert), "--key", str(pki.server_key), environment=environment
        )

    @staticmethod
    def _stop(daemon: Daemon) -> None:
        with contextlib.suppress(DaemonError):
            daemon.stop()

    def connect(self, daemon: Daemon) -> TLSClient:
        """A handshaken TLS client; the first one starts the daemon, so it may wait."""
        client = TLSClient(daemon.port, client_context(self.pki.ca_cert))
        self.addCleanup(client.close)
        try:
            client.handshake(timeout=START_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as error:
            msg = f"no TLS handshake over the passed socket: {error!r}\n{daemon.describe()}"
            raise DaemonError(msg) from error
        return client

    def echo(self, daemon: Daemon, line: bytes = b"over the passed socket\n") -> None:
        """One client echoes ``line``, closes, and the daemon logs the close."""
        since = daemon.mark()
        client = self.connect(daemon)
        client.write(line)
        client.send_close_notify()
        self.assertEqual(client.read_to_end(), line)
        daemon.wait_closed(since=since, peer=client.peer)


class SocketActivationTests(SocketActivationCase):
    """Serving on the socket systemd passes."""

    def test_echo_over_passed_socket(self) -> None:
        """The first connection starts the daemon, which adopts the socket and echoes."""
        daemon = self.start_default()
        self.echo(daemon)
        listening = daemon.wait_for_event(lambda e: e.get("event") == "listening")
        self.assertEqual(listening["endpoint"], SYSTEMD_LISTEN)
        self.assertEqual((listening["host"], listening["port"]), ("127.0.0.1", daemon.port))
        # A second client is served by the same process.
        self.echo(daemon, b"again\n")
        self.assertIsNone(daemon.process.poll())

    def test_no_ready_without_certificate(self) -> None:
        """A daemon whose certificate cannot be read exits and never says ``READY=1``."""
        missing = Path(self.mktemp()).absolute() / "missing.pem"
        daemon = self.start("--cert", str(missing), "--key", str(self.pki.server_key))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", daemon.port)):
            pass
        self.assertNotEqual(daemon.wait(START_TIMEOUT), 0)
        self.listener.drain()
        self.assertFalse(has(self.listener.messages, "READY=1"), self.listener.messages)


class NotifyTests(SocketActivationCase):
    """What the daemon tells the notify socket."""

    def test_ready_once_listening(self) -> None:
        """``READY=1`` comes after the port is adopted and the TLS context is loaded."""
        daemon = self.start_default()
        self.connect(daemon)
        ready = wait_for_message(self.listener, "READY=1")
        # The log is flushed per record: whatever was logged before READY=1 is there.
        logged = {e.get("event") for e in daemon.events()}
        self.assertIn("listening", logged)
        self.assertIn("tls_context_loaded", logged)
        self.assertEqual(index_of(self.listener.messages, "READY=1", ready + 1), -1)
        self.assertFalse(has(self.listener.messages, "WATCHDOG=1"), self.listener.messages)

    def test_status_lines(self) -> None:
        """The daemon describes itself with a non-empty ``STATUS=`` line."""
        daemon = self.start_default()
        self.connect(daemon)

        def has_status(messages: list[bytes]) -> bool:
            return any(
                a.startswith("STATUS=") and len(a) > len("STATUS=")
                for m in messages
                for a in assignments(m)
            )

        self.listener.wait_for(has_status, NOTIFY_TIMEOUT)

    def test_watchdog_pings(self) -> None:
        """With ``WATCHDOG_USEC=500000`` ``WATCHDOG=1`` arrives about every 0.25 s."""
        daemon = self.start_default({"WATCHDOG_USEC": "500000"})
        self.connect(daemon)
        self.listener.wait_for(lambda m: has(m, "WATCHDOG=1"), NOTIFY_TIMEOUT)
        first = time.monotonic()
        seen = sum(has([m], "WATCHDOG=1") for m in self.listener.messages)
        self.listener.wait_for(lambda m: has(m, "WATCHDOG=1", seen + 4), NOTIFY_TIMEOUT)
        # Four more pings at 0.25 s intervals take about 1 s; not a burst.
        self.assertGreater(time.monotonic() - first, 0.5)
        self.echo(daemon)

    def test_watchdog_for_another_pid(self) -> None:
        """``WATCHDOG_PID`` of another process: the daemon sends no pings at all."""
        daemon = self.start_default({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"})
        self.connect(daemon)
        wait_for_message(self.listener, "READY=1")
        self.echo(daemon)
        self.listener.drain()
        self.assertFalse(has(self.listener.messages, "WATCHDOG=1"), self.listener.messages)

    def test_reload(self) -> None:
        """SIGHUP: ``RELOADING=1`` with ``MONOTONIC_USEC=`` now, then ``READY=1`` again."""
        daemon = self.start_default()
        self.echo(daemon)  # the reactor runs: the SIGHUP handler is installed
        self.listener.drain()
        start = len(self.listener.messages)
        since = daemon.mark()
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.process.send_signal(signal.SIGHUP)
        reloading = wait_for_message(self.listener, "RELOADING=1", start)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        stamps = [
            a.partition("=")[2]
            for a in assignments(self.listener.messages[reloading])
            if a.startswith("MONOTONIC_USEC=")
        ]
        self.assertEqual(len(stamps), 1, self.listener.messages[reloading])
        self.assertTrue(before <= int(stamps[0]) <= after, (before, stamps, after))
        wait_for_message(self.listener, "READY=1", reloading + 1)
        daemon.wait_for_event(lambda e: e.get("event") == "tls_reloaded", since=since)
        self.echo(daemon)

    def test_stopping(self) -> None:
        """SIGTERM: ``STOPPING=1``, then a clean exit; nothing claims readiness after it."""
        daemon = self.start_default({"WATCHDOG_USEC": "500000"})
        self.echo(daemon)
        daemon.terminate()
        stopping = wait_for_message(self.listener, "STOPPING=1")
        # twistd ends by re-raising the signal that stopped it; systemd counts a
        # SIGTERM death as a clean exit.
        self.assertIn(daemon.wait(), {0, -signal.SIGTERM}, daemon.describe())
        self.listener.drain()
        for later in ("READY=1", "RELOADING=1"):
            self.assertEqual(index_of(self.listener.messages, later, stopping + 1), -1)
