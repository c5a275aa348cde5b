"""The installed daemon's records say what happened on the wire, no more.

Real sockets against ``twistd secure-echo``: resets with SO_LINGER 0, bare TCP
health checks, Java's TLS 1.3 close, sockets that never send a PROXY header.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import socket
import struct
import subprocess
import termios
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Final

from twisted.trial.unittest import SkipTest

from tests.daemon import Daemon, child_env, start_daemon
from tests.hostile_clients import reset
from tests.test_integration import (
    IntegrationCase,
    TLSClient,
    client_context,
    default_daemon,
    peer_of,
    raw_connect,
    server_args,
    shared_pki,
)

if TYPE_CHECKING:
    from collections.abc import Callable

#: Bounds every wait on the wire.
WAIT: Final = 10.0
#: How often a checked condition is looked at again.
POLL: Final = 0.02


def unread(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition()`` until true, at most :data:`WAIT` seconds."""
    end = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > end:
            msg = f"gave up waiting for {what}"
            raise AssertionError(msg)
        time.sleep(POLL)


def stable(value: Callable[[], int], samples: int = 5) -> bool:
    """Whether ``value()`` stays the same over ``samples`` polls."""
    first = value()
    for _ in range(samples):
        time.sleep(POLL)
        if value() != first:
            return False
    return True


class ResetTests(IntegrationCase):
    """A client that resets is recorded as reset, with what it never got."""

    def test_reset_with_replies_pending(self) -> None:
        """Lines and close_notify, replies never read, then an RST: reset, unsent_bytes > 0.

        The client sends more than the daemon's socket can hold of replies and
        never reads: the daemon holds the rest, and the reset destroys it.  The
        record says so, whether or not the daemon had read the close_notify yet.
        """
        daemon = default_daemon()
        since = daemon.mark()
        client = TLSClient(daemon.port, client_context(shared_pki().ca_cert))
        self.addCleanup(client.close)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.handshake()
        client.write((b"y" * 99 + b"\n") * 40_000)
        client.send_close_notify()
        client.send_in_one_segment()
        # The daemon answers until its socket is full; then it holds the rest.
        wait_until(lambda: unread(client.sock) > 0, "the first replies")
        wait_until(lambda: stable(lambda: unread(client.sock)), "the replies to stop")
        reset(client.sock)
        event = daemon.wait_closed(since=since, peer=client.peer)
        self.assertEqual(event["close_reason"], "reset", event)
        self.assertGreater(event["unsent_bytes"], 0, event)

    def test_reset_after_reading_everything_keeps_eof(self) -> None:
        """A client that read every reply and then resets instead of closing: eof.

        TLS lets a client close without waiting for the server's close_notify;
        every reply reached it, which the record says.
        """
        daemon = default_daemon()
        since = daemon.mark()
        client = self.tls_client(daemon)
        client.write(b"all of it\n")
        client.send_close_notify()
        self.assertEqual(client.read_until(10), b"all of it\n")
        client.pump(lambda: client.close_notify or client.eof, WAIT)
        self.assertTrue(client.close_notify)
        reset(client.sock)
        event = daemon.wait_closed(since=since, peer=client.peer)
        self.assertEqual(event["close_reason"], "eof", event)
        self.assertEqual(event["unsent_bytes"], 0, event)


class NoDataTests(IntegrationCase):
    """A TCP connection that never sends a byte is no_data, without a warning."""

    def assert_no_data(self, daemon: Daemon, since: int, peer: str) -> None:
        event = daemon.wait_closed(since=since, peer=peer)
        self.assertEqual(event["close_reason"], "no_data", event)
        self.assertIsNone(event["tls_error"], event)
        warned = daemon.find_events(
            lambda e: e.get("peer") == peer and e.get("level") == "warn", since=since
        )
        self.assertEqual(warned, [])

    def test_connect_and_close(self) -> None:
        """Connect, then FIN (a load balancer's TCP check)."""
        daemon = default_daemon()
        since = daemon.mark()
        sock = raw_connect(daemon.port)
        peer = peer_of(sock)
        sock.close()
        self.assert_no_data(daemon, since, peer)

    def test_connect_and_reset(self) -> None:
        """Connect, then RST."""
        daemon = default_daemon()
        since = daemon.mark()
        sock = raw_connect(daemon.port)
        peer = peer_of(sock)
        reset(sock)
        self.assert_no_data(daemon, since, peer)


JAVA_CLIENT: Final = """
import java.io.*;
import java.net.*;
import java.security.KeyStore;
import java.security.cert.*;
import javax.net.ssl.*;

public class EchoOnce {
    public static void main(String[] args) throws Exception {
        CertificateFactory factory = CertificateFactory.getInstance("X.509");
        KeyStore trust = KeyStore.getInstance(KeyStore.getDefaultType());
        trust.load(null, null);
        try (InputStream in = new FileInputStream(args[1])) {
            trust.setCertificateEntry("ca", factory.generateCertificate(in));
        }
        TrustManagerFactory tmf =
            TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        SSLContext context = SSLContext.getInstance("TLSv1.3");
        context.init(null, tmf.getTrustManagers(), null);
        try (SSLSocket socket = (SSLSocket) context.getSocketFactory()
                .createSocket("127.0.0.1", Integer.parseInt(args[0]))) {
            socket.setEnabledProtocols(new String[] {"TLSv1.3"});
            SSLParameters parameters = socket.getSSLParameters();
            parameters.setServerNames(java.util.List.of(new SNIHostName("localhost")));
            socket.setSSLParameters(parameters);
            socket.startHandshake();
            System.out.println("local " + socket.getLocalPort());
            OutputStream out = socket.getOutputStream();
            out.write("from java\\n".getBytes("US-ASCII"));
            out.flush();
            BufferedReader reader =
                new BufferedReader(new InputStreamReader(socket.getInputStream(), "US-ASCII"));
            System.out.println("echo " + reader.readLine());
        }
    }
}
"""


class JavaCloseTests(IntegrationCase):
    """Java's JSSE ends TLS 1.3 with user_canceled, then close_notify: that is eof."""

    def test_java_close_is_eof(self) -> None:
        """A JSSE client's echo and orderly close are recorded as eof, not tls_error."""
        java = shutil.which("java")
        if java is None:
            raise SkipTest("java is not installed (CI installs default-jre-headless)")
        directory = Path(self.mktemp())
        directory.mkdir()
        source = directory / "EchoOnce.java"
        source.write_text(JAVA_CLIENT)
        daemon = default_daemon()
        since = daemon.mark()
        result = subprocess.run(
            [java, str(source), str(daemon.port), str(shared_pki().ca_cert)],
            capture_output=True,
            timeout=60,
            check=False,
            env=child_env(),
        )
        output = result.stdout.decode()
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        self.assertIn("echo from java", output)
        port = int(output.split("local ", 1)[1].split()[0])
        event = daemon.wait_closed(since=since, peer=f"127.0.0.1:{port}")
        self.assertEqual(event["close_reason"], "eof", event)
        self.assertIsNone(event["tls_error"], event)
        self.assertEqual(event["lines_out"], 1)


class ProxyPhaseTests(IntegrationCase):
    """Sockets waiting for their PROXY header are counted, limited and drained."""

    def test_waiting_sockets_count_and_drain(self) -> None:
        """Two silent sockets from the balancer fill --max-connections 2; a drain ends them."""
        directory = Path(self.mktemp())
        daemon = start_daemon(
            self,
            directory,
            server_args(
                shared_pki(),
                "--proxy-protocol",
                "required",
                "--proxy-trusted",
                "127.0.0.1",
                "--max-connections",
                "2",
                "--proxy-timeout",
                "30",
                "--drain-timeout",
                "20",
                "--metrics",
                "tcp:0:interface=127.0.0.1",
            ),
        )
        since = daemon.mark()
        metrics = daemon.wait_for_event(lambda e: e.get("event") == "metrics_listening")
        silent = [raw_connect(daemon.port) for _ in range(2)]
        for sock in silent:
            self.addCleanup(sock.close)
        url = f"http://127.0.0.1:{metrics['port']}/metrics"

        def active() -> float:
            with urllib.request.urlopen(url, timeout=WAIT) as response:
                for line in response.read().decode().splitlines():
                    if line.startswith("secure_echo_connections_active "):
                        return float(line.split()[1])
            return -1.0

        wait_until(lambda: active() == 2.0, "two open connections")
        third = raw_connect(daemon.port)
        self.addCleanup(third.close)
        refused = daemon.wait_for_event(
            lambda e: e.get("event") == "connection_refused", since=since
        )
        self.assertEqual(refused["reason"], "limit_total")
        started = time.monotonic()
        daemon.terminate()
        for sock in silent:
            sock.settimeout(WAIT)
            # Dropped at once (an RST or a FIN): nothing of the client was read.
            with contextlib.suppress(ConnectionResetError):
                self.assertEqual(sock.recv(1), b"")
        code = daemon.wait(WAIT)
        self.assertIn(code, {0, -15})
        self.assertLess(time.monotonic() - started, 5.0, "the drain waited for the silent")
