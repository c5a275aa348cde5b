"""``secure-echo-client`` against the real daemon: ``--proxy-v2`` and ``info``.

The client runs as ``python -m secure_echo.tools.client`` with :func:`tests.daemon.child_env`,
the daemon as ``twistd -n secure-echo`` through :mod:`tests.daemon`.  Each kind of
daemon is shared by the tests of this module (:func:`tests.daemon.shared_daemon`);
a test finds its own records by a log position taken before the client runs and by
the peer the daemon logs, and waits for its connection's ``connection_closed`` (or
``proxy_rejected``) record before it ends.

Every client run and every wait is bounded; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Final

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from secure_echo.tools.client import EXIT_CONNECTION, EXIT_OK, EXIT_WRONG_REPLY
from tests.daemon import Daemon, Event, child_env, shared_daemon
from tests.test_integration import default_daemon, server_args, shared_pki

#: Seconds a client run may take; it normally takes well under one.
RUN_TIMEOUT: Final = 30.0
#: The daemons' --info-line.
INFO_LINE: Final = "secure-echo:info"
OK_LINE: Final = re.compile(r"\AOK \d+\.\d ms TLSv1\.3 TLS_[A-Z0-9_]+\n\Z")
LOOPBACK_PEER: Final = re.compile(r"\A127\.0\.0\.1:\d+\Z")
HEX64: Final = re.compile(r"\A[0-9a-f]{64}\Z")
#: ``/proc/net/tcp`` state of an established connection.
ESTABLISHED: Final = "01"


def proxy_daemon() -> Daemon:
    """A daemon that requires a PROXY header from 127.0.0.1 and answers the info line."""
    pki = shared_pki()
    return shared_daemon(
        "client-proxy",
        lambda _: server_args(
            pki,
            "--proxy-protocol",
            "required",
            "--proxy-trusted",
            "127.0.0.1/32",
            "--info-line",
            INFO_LINE,
        ),
    )


def info_daemon() -> Daemon:
    """A daemon that answers the info line; no PROXY protocol, no client certificates."""
    pki = shared_pki()
    return shared_daemon("client-info", lambda _: server_args(pki, "--info-line", INFO_LINE))


def mtls_info_daemon() -> Daemon:
    """A daemon that requires a client certificate from the test CA and answers info."""
    pki = shared_pki()
    return shared_daemon(
        "client-info-mtls",
        lambda _: server_args(pki, "--client-ca", str(pki.ca_cert), "--info-line", INFO_LINE),
    )


def client_command(*args: str) -> list[str]:
    """The command line of ``secure-echo-client ARGS`` run from this checkout."""
    return [sys.executable, "-m", "secure_echo.tools.client", *args]


def run_client(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the client to completion with no input; kill it after :data:`RUN_TIMEOUT`."""
    return subprocess.run(
        client_command(*args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        env=child_env(),
        check=False,
    )


def read_exactly(stream: IO[bytes], size: int, timeout: float = RUN_TIMEOUT) -> bytes:
    """Read ``size`` bytes from a pipe, failing after ``timeout`` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.PollSelector() as selector:
        selector.register(stream.fileno(), selectors.EVENT_READ)
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"only {data!r} within {timeout} s")
            chunk = os.read(stream.fileno(), size - len(data))
            if not chunk:
                raise AssertionError(f"end of stream after {data!r}")
            data += chunk
    return data


def tcp_sources(pid: int, server_port: int) -> list[str]:
    """The ``127.0.0.1:PORT`` sources of ``pid``'s connections to ``server_port``.

    Read from ``/proc`` (Linux): the process's socket inodes, then their entries in
    ``/proc/net/tcp``.  Raises :class:`SkipTest` where ``/proc`` cannot say.
    """
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError as exc:
        raise SkipTest(f"cannot read the client's sockets from /proc: {exc}") from None
    inodes = set()
    for fd in fds:
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    sources = []
    for line in table:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if (
            inode in inodes
            and state == ESTABLISHED
            and remote == f"0100007F:{server_port:04X}"
            and local.startswith("0100007F:")
        ):
            sources.append(f"127.0.0.1:{int(local.partition(':')[2], 16)}")
    return sources


class ClientDaemonCase(SynchronousTestCase):
    """Assertions shared by the tests below."""

    def assert_ok(self, result: subprocess.CompletedProcess[bytes]) -> str:
        """Assert exit 0 and nothing on stderr; return standard output as text."""
        self.assertEqual(
            (result.returncode, result.stderr), (EXIT_OK, b""), result.stdout.decode()
        )
        return result.stdout.decode()

    def assert_one_line_error(
        self, result: subprocess.CompletedProcess[bytes], status: int, text: str
    ) -> str:
        """Assert exit ``status``, no output, one stderr line containing ``text``."""
        self.assertEqual((result.returncode, result.stdout), (status, b""), result.stderr)
        line = result.stderr.decode()
        self.assertTrue(line.startswith("secure-echo-client: "), line)
        self.assertEqual(line.count("\n"), 1, line)
        self.assertTrue(line.endswith("\n"), line)
        self.assertIn(text, line)
        return line

    def assert_closed(self, daemon: Daemon, since: int, peer: str | None) -> Event:
        """Wait for the connection's ``connection_closed``; it ended with the client's close."""
        event = daemon.wait_closed(since=since, peer=peer)
        self.assertEqual(event["close_reason"], "eof", event)
        return event

    def assert_no_rejection(self, daemon: Daemon, since: int) -> None:
        """No PROXY header was rejected since ``since``."""
        rejected = daemon.find_events(lambda e: e.get("event") == "proxy_rejected", since)
        self.assertEqual(rejected, [])


class ProxyV2Tests(ClientDaemonCase):
    """``--proxy-v2`` against ``--proxy-protocol required --proxy-trusted 127.0.0.1/32``."""

    def ca(self) -> str:
        """The CA that issued the daemons' certificate."""
        return str(shared_pki().ca_cert)

    def test_check_with_header(self) -> None:
        """``check --proxy-v2`` prints OK; the daemon names the client's loopback source."""
        daemon = proxy_daemon()
        since = daemon.mark()
        result = run_client("check", f"127.0.0.1:{daemon.port}", "--ca", self.ca(), "--proxy-v2")
        self.assertRegex(self.assert_ok(result), OK_LINE)
        event = self.assert_closed(daemon, since, None)
        self.assertRegex(event["peer"], LOOPBACK_PEER)
        self.assertNotEqual(event["peer"], f"127.0.0.1:{daemon.port}")
        self.assertEqual(event["local"], f"127.0.0.1:{daemon.port}")
        self.assert_no_rejection(daemon, since)

    def test_logged_peer_is_the_client_socket(self) -> None:
        """The peer the daemon logs is the client's real TCP source, sent in the header.

        Echo mode keeps the connection open while standard input is, so the test can
        read the client's source port from ``/proc`` and find it in the daemon's log.
        """
        daemon = proxy_daemon()
        since = daemon.mark()
        process = subprocess.Popen(
            client_command(f"127.0.0.1:{daemon.port}", "--ca", self.ca(), "--proxy-v2"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        self.addCleanup(_reap, process)
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdin.write(b"through the header\n")
        process.stdin.flush()
        self.assertEqual(read_exactly(process.stdout, 19), b"through the header\n")
        sources = tcp_sources(process.pid, daemon.port)
        self.assertEqual(len(sources), 1, sources)
        process.stdin.close()
        self.assertEqual(process.wait(timeout=RUN_TIMEOUT), EXIT_OK)
        self.assertEqual(process.stderr.read(), b"")
        event = self.assert_closed(daemon, since, sources[0])
        self.assertEqual(event["lines_in"], 1)
        self.assert_no_rejection(daemon, since)

    def test_check_with_claimed_source(self) -> None:
        """With ``--proxy-source`` the daemon logs the claimed address.

        The header is trusted because the TCP source, 127.0.0.1, is in --proxy-trusted.
        """
        daemon = proxy_daemon()
        since = daemon.mark()
        result = run_client(
            "check",
            f"127.0.0.1:{daemon.port}",
            "--ca",
            self.ca(),
            "--proxy-v2",
            "--proxy-source",
            "192.0.2.7:4242",
        )
        self.assertRegex(self.assert_ok(result), OK_LINE)
        self.assert_closed(daemon, since, "192.0.2.7:4242")
        self.assert_no_rejection(daemon, since)

    def test_check_without_header_fails(self) -> None:
        """A plain ``check`` is rejected by the daemon (``proxy_missing``): exit 2."""
        daemon = proxy_daemon()
        since = daemon.mark()
        result = run_client("check", f"127.0.0.1:{daemon.port}", "--ca", self.ca())
        self.assert_one_line_error(
            result, EXIT_CONNECTION, f"TLS handshake with 127.0.0.1:{daemon.port} failed"
        )
        rejected = daemon.wait_for_event(lambda e: e.get("event") == "proxy_rejected", since=since)
        self.assertEqual(rejected["reason"], "proxy_missing", rejected)
        self.assertRegex(rejected["peer"], LOOPBACK_PEER)

    def test_info_shows_the_claimed_source(self) -> None:
        """``info --proxy-v2 --proxy-source`` shows the claimed address as the peer."""
        daemon = proxy_daemon()
        since = daemon.mark()
        result = run_client(
            "info",
            f"127.0.0.1:{daemon.port}",
            "--ca",
            self.ca(),
            "--info-line",
            INFO_LINE,
            "--proxy-v2",
            "--proxy-source",
            "192.0.2.7:4242",
        )
        facts = json.loads(self.assert_ok(result))
        self.assertEqual(facts["peer"], "192.0.2.7:4242")
        self.assertEqual(facts["local"], f"127.0.0.1:{daemon.port}")
        event = self.assert_closed(daemon, since, "192.0.2.7:4242")
        self.assertEqual(facts["conn_id"], event["conn_id"])


class InfoTests(ClientDaemonCase):
    """``info`` against daemons with and without ``--info-line``."""

    def test_pretty_json(self) -> None:
        """The JSON answer is printed indented; it is the connection the daemon logs."""
        daemon = info_daemon()
        pki = shared_pki()
        since = daemon.mark()
        result = run_client(
            "info",
            f"localhost:{daemon.port}",
            "--ca",
            str(pki.ca_cert),
            "--info-line",
            INFO_LINE,
        )
        out = self.assert_ok(result)
        self.assertTrue(out.startswith('{\n  "'), out)
        facts = json.loads(out)
        self.assertEqual(facts["tls_version"], "TLSv1.3")
        self.assertEqual(facts["sni"], "localhost")
        self.assertIs(facts["resumed"], False)
        self.assertIsNone(facts["client_cert_subject"])
        self.assertRegex(facts["peer"], LOOPBACK_PEER)
        self.assertEqual(facts["local"], f"127.0.0.1:{daemon.port}")
        event = self.assert_closed(daemon, since, facts["peer"])
        for key in ["conn_id", "peer", "local", "tls_version", "cipher", "group"]:
            self.assertEqual(facts[key], event[key], key)
        self.assertEqual((event["lines_in"], event["lines_out"]), (1, 1))

    def test_raw(self) -> None:
        """``--raw`` prints the daemon's JSON line as received: one line."""
        daemon = info_daemon()
        since = daemon.mark()
        result = run_client(
            "info",
            f"127.0.0.1:{daemon.port}",
            "--ca",
            str(shared_pki().ca_cert),
            "--info-line",
            INFO_LINE,
            "--raw",
        )
        out = self.assert_ok(result)
        self.assertEqual(out.count("\n"), 1, out)
        self.assertTrue(out.endswith("}\n"), out)
        facts = json.loads(out)
        self.assertEqual(facts["tls_version"], "TLSv1.3")
        self.assert_closed(daemon, since, facts["peer"])

    def test_client_certificate(self) -> None:
        """With mutual TLS the answer names the client certificate the client presented."""
        daemon = mtls_info_daemon()
        pki = shared_pki()
        since = daemon.mark()
        result = run_client(
            "info",
            f"127.0.0.1:{daemon.port}",
            "--ca",
            str(pki.ca_cert),
            "--cert",
            str(pki.client_cert),
            "--key",
            str(pki.client_key),
            "--info-line",
            INFO_LINE,
        )
        facts = json.loads(self.assert_ok(result))
        self.assertEqual(facts["client_cert_subject"], "CN=test client")
        self.assertRegex(facts["client_cert_sha256"], HEX64)
        self.assertTrue(facts["client_cert_not_after"])
        event = self.assert_closed(daemon, since, facts["peer"])
        self.assertEqual(event["client_cert_sha256"], facts["client_cert_sha256"])

    def test_daemon_without_info_line(self) -> None:
        """A daemon without --info-line echoes the line: exit 1 and one line saying so."""
        daemon = default_daemon()
        since = daemon.mark()
        result = run_client(
            "info",
            f"127.0.0.1:{daemon.port}",
            "--ca",
            str(shared_pki().ca_cert),
            "--info-line",
            INFO_LINE,
        )
        self.assert_one_line_error(result, EXIT_WRONG_REPLY, "")
        self.assertEqual(
            result.stderr,
            b"secure-echo-client: the server echoed the info line; "
            b"start it with --info-line secure-echo:info\n",
        )
        event = self.assert_closed(daemon, since, None)
        self.assertEqual((event["lines_in"], event["lines_out"]), (1, 1))

    def test_other_info_line(self) -> None:
        """A daemon with another --info-line echoes the default INFO: exit 1."""
        daemon = info_daemon()
        since = daemon.mark()
        result = run_client("info", f"127.0.0.1:{daemon.port}", "--ca", str(shared_pki().ca_cert))
        self.assert_one_line_error(
            result,
            EXIT_WRONG_REPLY,
            "the server echoed the info line; start it with --info-line INFO",
        )
        self.assert_closed(daemon, since, None)


class VerboseTests(ClientDaemonCase):
    """``-v`` against the daemon: the client's report agrees with the daemon's own view."""

    def test_report_agrees_with_the_daemon(self) -> None:
        """Version, cipher and group are those the daemon answers and logs; ALPN: none.

        The daemon has no ALPN protocols, so the client's offer selects nothing and the
        handshake still succeeds.
        """
        daemon = info_daemon()
        pki = shared_pki()
        since = daemon.mark()
        result = run_client(
            "info",
            f"localhost:{daemon.port}",
            "--ca",
            str(pki.ca_cert),
            "--info-line",
            INFO_LINE,
            "--alpn",
            "h2",
            "-v",
        )
        self.assertEqual(result.returncode, EXIT_OK, result.stderr)
        facts = json.loads(result.stdout)
        lines = result.stderr.decode().splitlines()
        self.assertTrue(all(line.startswith("* ") for line in lines), lines)
        self.assertEqual(lines[0], f"* connected to localhost:{daemon.port}")
        self.assertIn(f"*   TLS version: {facts['tls_version']}", lines)
        self.assertIn(f"*   cipher: {facts['cipher']}", lines)
        self.assertIn(f"*   group: {facts['group']}", lines)
        self.assertIn("*   ALPN: none (offered: h2)", lines)
        self.assertIn("*     [0] subject: CN=localhost", lines)
        self.assertIn("*         SANs: DNS:localhost, IP:127.0.0.1, IP:::1", lines)
        self.assertEqual(facts["sni"], "localhost")
        event = self.assert_closed(daemon, since, facts["peer"])
        self.assertEqual(event["group"], facts["group"])


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Kill ``process`` if it still runs, wait for it, close its pipes."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=RUN_TIMEOUT)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()
