"""Three secure-echo instances behind haproxy, restarted one at a time under load.

haproxy runs ``contrib/haproxy/haproxy.cfg`` as shipped (its addresses come from the
environment): TCP mode, ``send-proxy-v2`` with CRC32C, ``/readyz`` health checks on
each instance's metrics port, redispatch on a failed connect.  The instances run with
``--proxy-protocol required --proxy-trusted 127.0.0.1``; the second is a pool of two
workers.

Six clients echo through haproxy the whole time, one line at a time, each line
numbered, and each connection first asks ``INFO`` (``--info-line``) how the daemon
sees it.  Meanwhile each instance in turn gets SIGTERM, exits after its drain, is
started again on the same ports, and the test waits until haproxy reports it UP.

What must hold: every line sent is echoed, once, in order (a line the server never
answered because it closed cleanly first is sent again on a new connection; nothing
else is); every connection that was open ends with a clean close (TLS close_notify)
or with its last line answered; each daemon names each client by the client's own
address, in the info reply and in its ``connection_closed`` records.

Skipped when ``haproxy`` is not installed.  Every process is stopped at cleanup.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.daemon import Daemon, DaemonError
from tests.test_haproxy import free_port, listening
from tests.test_integration import client_context, server_args, shared_pki
from tests.test_metrics import http_get

#: The configuration under test.
CONFIG: Final = Path(__file__).resolve().parent.parent / "contrib" / "haproxy" / "haproxy.cfg"
#: Seconds any wait may take.
WAIT: Final = 30.0
#: Clients echoing through haproxy.
CLIENTS: Final = 6
#: A client closes and opens a new connection after this many lines.
LINES_PER_CONNECTION: Final = 40


@dataclass
class ClientStats:
    """What one client saw."""

    sent: int = 0
    echoed: int = 0
    connections: int = 0
    #: Connections the server closed cleanly (close_notify) while the client was on it.
    server_closes: int = 0
    #: Lines sent again after a clean close that came before their echo.
    resent: int = 0
    #: Connections that failed before the handshake completed (retried; no line sent).
    connect_retries: int = 0
    #: Connections that broke (reset, EOF without close_notify) with a line unanswered.
    broken_with_line_pending: int = 0
    #: Echoes that were not the line expected next (reordered, corrupted or repeated).
    wrong: list[str] = field(default_factory=list)
    #: Info replies whose ``peer`` was not the client's own address.
    wrong_peer: list[str] = field(default_factory=list)
    #: The client's own addresses (``127.0.0.1:port``), one per TCP connection.
    addresses: set[str] = field(default_factory=set)


class EchoClient:
    """One client echoing numbered lines through ``port`` until told to stop."""

    def __init__(self, number: int, port: int, context: ssl.SSLContext) -> None:
        self.number = number
        self.port = port
        self.context = context
        self.stats = ClientStats()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Start echoing."""
        self._thread.start()

    def finish(self) -> None:
        """Stop after the current line is answered; wait for that."""
        self.stop.set()
        self._thread.join(WAIT)

    def _run(self) -> None:
        try:
            self._echo()
        except BaseException as error:  # reported by the test
            self.error = error

    def _echo(self) -> None:
        pending: bytes | None = None
        deadline = time.monotonic() + 10 * WAIT
        while (pending is not None or not self.stop.is_set()) and time.monotonic() < deadline:
            tls = self._connect()
            if tls is None:
                continue
            with tls:
                pending = self._serve(tls, pending)

    def _connect(self) -> ssl.SSLSocket | None:
        """A TLS connection through haproxy that answered its info line, or None."""
        stats = self.stats
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        except OSError:
            stats.connect_retries += 1
            time.sleep(0.05)
            return None
        # Every connection counts, also one that ends before its info reply: the
        # daemon records those too.
        address = "{}:{}".format(*raw.getsockname()[:2])
        stats.addresses.add(address)
        try:
            tls = self.context.wrap_socket(
                raw, server_hostname="localhost", suppress_ragged_eofs=False
            )
            tls.sendall(b"INFO\n")
            reply = _read_line(tls)
        except (OSError, ssl.SSLError):
            raw.close()
            stats.connect_retries += 1
            time.sleep(0.05)
            return None
        if reply is None:  # closed cleanly before the info reply: a draining server
            tls.close()
            stats.connect_retries += 1
            return None
        stats.connections += 1
        peer = json.loads(reply).get("peer")
        if peer != address:
            stats.wrong_peer.append(f"{address} seen as {peer}")
        return tls

    def _serve(self, tls: ssl.SSLSocket, pending: bytes | None) -> bytes | None:
        """Echo on ``tls`` until it closes or enough lines went; the line still owed."""
        stats = self.stats
        for _ in range(LINES_PER_CONNECTION):
            if pending is None:
                if self.stop.is_set():
                    return None
                pending = b"client %d line %06d" % (self.number, stats.sent)
                stats.sent += 1
            try:
                tls.sendall(pending + b"\n")
                echo = _read_line(tls)
            except (OSError, ssl.SSLError):
                stats.broken_with_line_pending += 1
                return pending
            if echo is None:  # a clean close before the echo: the server never read it
                stats.server_closes += 1
                stats.resent += 1
                return pending
            if echo != pending:
                stats.wrong.append(f"{echo!r} instead of {pending!r}")
            stats.echoed += 1
            pending = None
            time.sleep(0.005)
        return pending


def _read_line(tls: ssl.SSLSocket) -> bytes | None:
    """One line without its newline; None at a clean close (close_notify) before it."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = tls.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data[:-1]


@dataclass
class Instance:
    """One secure-echo instance: its fixed ports and its daemons so far."""

    name: str
    port: int
    metrics_port: int
    extra: tuple[str, ...] = ()
    daemons: list[Daemon] = field(default_factory=list)

    def start(self, root: Path) -> Daemon:
        """Start a new generation on the instance's ports; wait until /readyz says 200."""
        args = server_args(
            shared_pki(),
            "--metrics",
            f"tcp:{self.metrics_port}:interface=127.0.0.1",
            "--proxy-protocol",
            "required",
            "--proxy-trusted",
            "127.0.0.1",
            "--info-line",
            "INFO",
            "--drain-timeout",
            "5",
            *self.extra,
        )
        directory = root / f"{self.name}-{len(self.daemons) + 1}"
        daemon = Daemon.start(directory, args, listen=f"tcp:{self.port}:interface=127.0.0.1")
        self.daemons.append(daemon)
        deadline = time.monotonic() + WAIT
        while http_get(self.metrics_port, "/readyz")[0] != 200:
            if time.monotonic() > deadline:
                msg = f"{self.name} never became ready\n{daemon.describe()}"
                raise AssertionError(msg)
            time.sleep(0.05)
        return daemon

    @property
    def daemon(self) -> Daemon:
        """The current generation."""
        return self.daemons[-1]


class Balancer:
    """``haproxy -f contrib/haproxy/haproxy.cfg -db`` with the instances' addresses."""

    def __init__(self, directory: Path, instances: list[Instance]) -> None:
        self.port = free_port()
        self.stats_socket = directory / "stats.sock"
        env = dict(os.environ)
        env.update(
            SE_FRONTEND=f"127.0.0.1:{self.port}",
            SE_HAPROXY_STATS=str(self.stats_socket),
        )
        for number, instance in enumerate(instances, 1):
            env[f"SE_ECHO{number}"] = f"127.0.0.1:{instance.port}"
            env[f"SE_ECHO{number}_METRICS_PORT"] = str(instance.metrics_port)
        self.output_path = directory / "haproxy.log"
        self._output: IO[bytes] = self.output_path.open("wb")
        self.process = subprocess.Popen(
            ["haproxy", "-f", str(CONFIG), "-db"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )

    def wait_listening(self) -> None:
        """Wait until haproxy listens."""
        deadline = time.monotonic() + WAIT
        while not listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                msg = f"haproxy did not start:\n{self.output()}"
                raise AssertionError(msg)
            time.sleep(0.02)

    def states(self) -> dict[str, str]:
        """Server name to haproxy's status of it (``UP``, ``DOWN``, ...)."""
        return {name: row["status"] for name, row in self.servers().items()}

    def wait_sessions(self, server: str) -> None:
        """Wait until haproxy holds at least one client's connection to ``server``."""
        started = time.monotonic()
        while int(self.servers()[server]["scur"] or 0) < 1:
            if time.monotonic() - started > WAIT:
                msg = f"no connection to {server}: {self.servers()[server]}"
                raise AssertionError(msg)
            time.sleep(0.01)

    def servers(self) -> dict[str, dict[str, str]]:
        """Server name to its row of haproxy's ``show stat``."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {
            row["svname"]: row
            for row in rows
            if row.get("pxname") == "secure_echo" and row["svname"] != "BACKEND"
        }

    def wait_state(self, server: str, state: str) -> float:
        """Wait until haproxy says ``server`` is ``state``; the seconds it took."""
        started = time.monotonic()
        while not self.states().get(server, "").startswith(state):
            if time.monotonic() - started > WAIT:
                msg = f"{server} not {state}: {self.states()}\n{self.output()[-3000:]}"
                raise AssertionError(msg)
            time.sleep(0.05)
        return time.monotonic() - started

    def output(self) -> str:
        """What haproxy logged."""
        return self.output_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop haproxy and close its log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._output.close()


class RollingRestartTests(SynchronousTestCase):
    """A rolling restart behind haproxy loses nothing."""

    def setUp(self) -> None:
        if shutil.which("haproxy") is None:
            raise SkipTest("haproxy is not installed")
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir(parents=True)
        # A UNIX socket path must stay short; trial's directories can be deep.
        self.short = Path(tempfile.mkdtemp(prefix="se-roll-"))
        self.addCleanup(shutil.rmtree, self.short, ignore_errors=True)

    def stop_all(self, instances: list[Instance]) -> None:
        """Stop every daemon still running."""
        for instance in instances:
            for daemon in instance.daemons:
                if daemon.process.poll() is None:
                    with contextlib.suppress(DaemonError):
                        daemon.stop()

    def test_rolling_restart(self) -> None:
        """SIGTERM, restart and wait for UP, one instance at a time: no line lost."""
        instances = [
            Instance("echo1", free_port(), free_port()),
            Instance("echo2", free_port(), free_port(), ("--workers", "2")),
            Instance("echo3", free_port(), free_port()),
        ]
        self.addCleanup(self.stop_all, instances)
        for instance in instances:
            instance.start(self.root)
        balancer = Balancer(self.short, instances)
        self.addCleanup(balancer.stop)
        balancer.wait_listening()
        for instance in instances:
            balancer.wait_state(instance.name, "UP")
        context = client_context(shared_pki().ca_cert)
        clients = [EchoClient(n, balancer.port, context) for n in range(CLIENTS)]
        for client in clients:
            client.start()
        time.sleep(1.5)
        timings = []
        for instance in instances:
            old = instance.daemon
            before = sum(c.stats.echoed for c in clients)
            # A client's connection is open there, so the stop has one to drain
            # (it may still end by itself first; see the check of the records).
            balancer.wait_sessions(instance.name)
            stopped_at = time.monotonic()
            old.terminate()
            code = old.wait(timeout=WAIT)
            self.assertIn(code, {0, -signal.SIGTERM}, old.describe())
            drained = time.monotonic() - stopped_at
            balancer.wait_state(instance.name, "DOWN")
            instance.start(self.root)
            up = balancer.wait_state(instance.name, "UP")
            timings.append((instance.name, round(drained, 2), round(up, 2)))
            time.sleep(1.0)
            # Traffic went on meanwhile.
            self.assertGreater(sum(c.stats.echoed for c in clients), before)
        for client in clients:
            client.finish()
        for client in clients:
            self.assertIsNone(client.error, client.error)
        totals = {
            key: sum(getattr(c.stats, key) for c in clients)
            for key in (
                "sent",
                "echoed",
                "connections",
                "server_closes",
                "resent",
                "connect_retries",
                "broken_with_line_pending",
            )
        }
        lost = totals["sent"] - totals["echoed"]
        summary = f"rolling restart: {totals}, lost: {lost}; (name, drain s, UP after s) {timings}"
        print("\n" + summary, file=sys.stderr)
        self.assertEqual(lost, 0, summary)
        self.assertEqual(totals["broken_with_line_pending"], 0, summary)
        self.assertEqual([w for c in clients for w in c.stats.wrong], [], summary)
        self.assertEqual([w for c in clients for w in c.stats.wrong_peer], [], summary)
        self.assertGreater(totals["server_closes"], 0, summary)
        self.assertGreater(totals["sent"], 1000, summary)
        self.check_records(instances, {a for c in clients for a in c.stats.addresses})

    def check_records(self, instances: list[Instance], addresses: set[str]) -> None:
        """Each instance's own records name the real clients; stopping drained them."""
        for instance in instances:
            for daemon in instance.daemons:
                closed = daemon.find_events(lambda e: e.get("event") == "connection_closed")
                self.assertTrue(closed, f"{daemon.directory} served nobody")
                peers = {e["peer"] for e in closed}
                self.assertEqual(peers - addresses, set(), daemon.directory)
                rejected = daemon.find_events(lambda e: e.get("event") == "proxy_rejected")
                self.assertEqual(rejected, [], daemon.directory)
            # The first generation was stopped: each connection open when it began
            # to drain ended as the drain closed it (server_shutdown), unless its
            # client closed it first; a drain that found none has no such record.
            first = instance.daemons[0]
            drains = first.find_events(lambda e: e.get("event") == "drain_started")
            self.assertTrue(drains, first.directory)
            closed = first.find_events(lambda e: e.get("event") == "connection_closed")
            reasons = {e["close_reason"] for e in closed}
            if any(e["connections"] for e in drains):
                self.assertIn("server_shutdown", reasons, first.directory)

    def test_example_environment(self) -> None:
        """The example environment file sets every variable the configuration uses."""
        example: dict[str, str] = {}
        for line in CONFIG.with_name("secure-echo.env").read_text().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.partition("=")
                example[name] = value
        text = "\n".join(
            line for line in CONFIG.read_text().splitlines() if not line.lstrip().startswith("#")
        )
        used = {part.split("}")[0] for part in text.split("${")[1:]}
        self.assertEqual(used, set(example))
        example["SE_HAPROXY_STATS"] = str(self.short / "stats.sock")
        check = subprocess.run(
            ["haproxy", "-c", "-f", str(CONFIG)],
            env={**os.environ, **example},
            capture_output=True,
            text=True,
            check=False,
            timeout=WAIT,
        )
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
