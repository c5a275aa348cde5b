"""Real TLS peers against the real daemon: ncat, socat and secure-echo-client.

Each pipes lines, a final one without a terminator included, through the peer and
expects them back byte for byte.  Tools that are not installed are skipped, saying
so (``.ci/run`` installs them).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Final

from twisted.trial.unittest import SynchronousTestCase

from tests.daemon import child_env
from tests.test_integration import default_daemon, shared_pki

PAYLOAD: Final = b"first\nsecond\r\n\x00\xff binary \xfe\n\nlast line without newline"
TIMEOUT: Final = 20.0


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
