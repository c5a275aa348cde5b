"""Real TLS peers against the real daemon, and our client against the bench's lean server.

ncat, socat and secure-echo-client talk to the daemon; secure-echo-client also talks to
the lean Twisted server of the benchmark (``bench/peers/lean_twisted.py``).  Each pipes
lines, a final one without a terminator included, through the peer and expects them back
byte for byte.  Tools that are not installed are skipped, saying so (``.ci/run``
installs them).
"""

from __future__ import annotations

import selectors
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

from twisted.trial.unittest import SynchronousTestCase

from tests.daemon import child_env
from tests.test_integration import (
    client_context,
    default_daemon,
    echo_client,
    raw_connect,
    recv_all,
    shared_pki,
)

PAYLOAD: Final = b"first\nsecond\r\n\x00\xff binary \xfe\n\nlast line without newline"
TIMEOUT: Final = 20.0
#: The benchmark's comparison servers (bench/peers/), run from the source tree.
BENCH_PEERS: Final = Path(__file__).resolve().parent.parent / "bench" / "peers"


class PeerTests(SynchronousTestCase):
    """Peers people use get every line back exactly."""

    def run_peer(self, command: list[str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            command,
            input=PAYLOAD,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
            env=child_env(),
        )

    def require(self, tool: str) -> str:
        path = shutil.which(tool)
        if path is None:
            self.skipTest(f"{tool} is not installed")
        assert path is not None
        return path

    def test_ncat(self) -> None:
        """The ncat client (--ssl, verifying) gets every line back, the final one too."""
        ncat = self.require("ncat")
        daemon = default_daemon()
        pki = shared_pki()
        since = daemon.mark()
        result = self.run_peer(
            [
                ncat,
                "--ssl",
                "--ssl-trustfile",
                str(pki.ca_cert),
                "--ssl-verify",
                "localhost",
                str(daemon.port),
            ]
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, PAYLOAD)
        closed = daemon.wait_closed(since=since)
        # ncat ends with a bare FIN, not close_notify.
        self.assertIn(closed["close_reason"], {"client_closed", "eof"})

    def test_socat(self) -> None:
        """The socat OPENSSL address (verifying) gets every line back, the final one too."""
        socat = self.require("socat")
        daemon = default_daemon()
        pki = shared_pki()
        since = daemon.mark()
        result = self.run_peer(
            [socat, "-", f"OPENSSL:127.0.0.1:{daemon.port},cafile={pki.ca_cert},verify=1"]
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, PAYLOAD)
        daemon.wait_closed(since=since)

    def test_secure_echo_client(self) -> None:
        """secure-echo-client gets every line back and the server logs a clean eof."""
        daemon = default_daemon()
        pki = shared_pki()
        since = daemon.mark()
        result = self.run_peer(
            [
                sys.executable,
                "-m",
                "secure_echo.tools.client",
                f"127.0.0.1:{daemon.port}",
                "--ca",
                str(pki.ca_cert),
            ]
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, PAYLOAD)
        closed = daemon.wait_closed(since=since)
        self.assertEqual(closed["close_reason"], "eof")
        self.assertEqual(closed["lines_in"], 5)

    def test_check_probe(self) -> None:
        """secure-echo-client check prints one OK line with the TLS version."""
        daemon = default_daemon()
        pki = shared_pki()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "secure_echo.tools.client",
                "check",
                f"127.0.0.1:{daemon.port}",
                "--ca",
                str(pki.ca_cert),
            ],
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
            env=child_env(),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout.decode(), r"^OK [0-9.]+ ms TLSv1\.3 TLS_\w+\n$")


def bulk_payload() -> bytes:
    """About 4 MB of lines from empty to 20,000 bytes, every byte value but LF in them.

    Many lines span TLS records and socket reads, and many reads end inside a line.
    """
    alphabet = bytes(b for b in range(256) if b != 0x0A) * 80
    lines = [alphabet[(i * 7) % 256 : (i * 7) % 256 + (i * 7919) % 20000] for i in range(400)]
    return b"\n".join(lines) + b"\n" + alphabet[:999]


class LeanPeerTests(SynchronousTestCase):
    """The benchmark's lean Twisted server (bench/peers/lean_twisted.py) echoes exactly.

    Its figures count only if every echoed byte is right; the load generator checks
    that in each run, and these tests check it with this project's own client.
    """

    def start_lean(self) -> int:
        """Start the lean server on the shared test certificate; return its port."""
        pki = shared_pki()
        process = subprocess.Popen(
            [
                sys.executable,
                str(BENCH_PEERS / "lean_twisted.py"),
                str(pki.server_cert),
                str(pki.server_key),
                "--lifetime",
                "120",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        self.addCleanup(self.stop, process)
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            ready = selector.select(TIMEOUT)
        first = process.stdout.readline() if ready else b""
        if not first.strip().isdigit():
            process.kill()
            _, stderr = process.communicate(timeout=TIMEOUT)
            self.fail(f"lean_twisted.py did not print its port: {first!r} {stderr!r}")
        return int(first)

    @staticmethod
    def stop(process: subprocess.Popen[bytes]) -> None:
        """Stop the server (SIGTERM stops its reactor) and reap it."""
        process.terminate()
        try:
            process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()

    def echo(self, port: int, payload: bytes) -> bytes:
        """Pipe ``payload`` through secure-echo-client; return what came back."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "secure_echo.tools.client",
                f"127.0.0.1:{port}",
                "--ca",
                str(shared_pki().ca_cert),
                "--tls13-only",
            ],
            input=payload,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
            env=child_env(),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_lines_come_back(self) -> None:
        """Every line comes back byte for byte, the final one without LF too (at close)."""
        self.assertEqual(self.echo(self.start_lean(), PAYLOAD), PAYLOAD)

    def test_bulk_comes_back(self) -> None:
        """Megabytes of long lines, split anywhere by records and reads, come back exact."""
        payload = bulk_payload()
        echoed = self.echo(self.start_lean(), payload)
        self.assertEqual(len(echoed), len(payload))
        self.assertEqual(echoed, payload)

    def test_failed_handshake_closes_only_its_connection(self) -> None:
        """Plaintext and a broken TLS record get the connection closed, and only it.

        The server closes such a connection by itself (no FIN from the client needed);
        a connection made before the failures goes on echoing, and a new one is served.
        (OpenSSL's error queue is shared by every connection; its documentation wants
        it empty before each call whose status ``SSL_get_error`` is to judge.)
        """
        port = self.start_lean()
        client = echo_client(port, client_context(shared_pki().ca_cert))
        self.addCleanup(client.close)
        expected = b"before\n"
        client.write(b"before\n")
        self.assertEqual(client.read_until(len(expected)), expected)
        for garbage in (b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x05hello"):
            with raw_connect(port) as sock:
                sock.sendall(garbage)
                # The server closes (an alert at most, then EOF); a timeout raises.
                self.assertLess(len(recv_all(sock)), 100)
        for line in (b"after 1\n", b"after 2\n"):
            expected += line
            client.write(line)
            self.assertEqual(client.read_until(len(expected)), expected)
        self.assertEqual(self.echo(port, b"still here\n"), b"still here\n")
