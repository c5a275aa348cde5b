"""Hostile clients for :mod:`tests.test_hostile`, and what they measure.

Everything here is blocking, single-threaded and bounded: every socket is
non-blocking behind a selector or has a timeout, every loop has a deadline.  Nothing
here needs a reactor.

* :func:`client_hello` makes a real ClientHello (Python's ``ssl`` over memory BIOs)
  so a test can send part of one.
* :func:`wait_closed` reads a plain socket until the server ends it and says how
  (``eof``, ``reset`` or ``timeout``) and when.
* :class:`Burst` opens many TCP connections at once and watches how each one ends.
* :func:`flood` writes pipelined lines on a TLS connection without ever reading.
* :func:`rss_bytes` reads a process's resident set size from ``/proc``.
* :class:`Figures` collects measured numbers into a JSON file and the test log.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import resource
import selectors
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from twisted.logger import Logger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from tests.daemon import Daemon, Event
    from tests.test_integration import TLSClient

MIB: Final = 1024 * 1024
#: Interval between two looks at a daemon's log when many records are awaited.
LOG_POLL_INTERVAL: Final = 0.1


# -- the test process ----------------------------------------------------------------


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
    return target


def rss_bytes(pid: int) -> int:
    """The resident set size (``VmRSS``) of process ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    msg = f"/proc/{pid}/status has no VmRSS line (a zombie?)"
    raise AssertionError(msg)


@dataclass
class RSSSamples:
    """RSS readings of one process: a baseline, then samples; reports the growth."""

    pid: int
    baseline: int = 0
    samples: list[int] = field(default_factory=list)

    def start(self) -> None:
        """Take the baseline."""
        self.baseline = rss_bytes(self.pid)

    def sample(self) -> int:
        """Take one sample and return it."""
        value = rss_bytes(self.pid)
        self.samples.append(value)
        return value

    @property
    def peak_growth(self) -> int:
        """Largest sample minus the baseline, in bytes."""
        return max(self.samples, default=self.baseline) - self.baseline

    @property
    def final_growth(self) -> int:
        """Last sample minus the baseline, in bytes."""
        return (self.samples[-1] if self.samples else self.baseline) - self.baseline


# -- plain sockets -------------------------------------------------------------------


def client_hello(context: ssl.SSLContext, server_hostname: str = "localhost") -> bytes:
    """The bytes of a real ClientHello that ``context`` would send first."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:16]
    return hello


def wait_closed(sock: socket.socket, timeout: float) -> tuple[str, float, bytes]:
    """Read ``sock`` until the server ends the connection, at most ``timeout`` s.

    Returns how it ended (``eof`` for a FIN, ``reset`` for an RST, ``timeout`` if
    still open), the seconds it took and every byte received.
    """
    chunks: list[bytes] = []
    started = time.monotonic()
    end = started + timeout
    outcome = "timeout"
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            outcome = "reset"
            break
        if not chunk:
            outcome = "eof"
            break
        chunks.append(chunk)
    return outcome, time.monotonic() - started, b"".join(chunks)


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN (SO_LINGER on, zero seconds)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def local_peer(sock: socket.socket) -> str:
    """How the daemon names the client of ``sock`` (``host:port``)."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


@dataclass
class Connection:
    """One socket of a :class:`Burst` and what became of it."""

    sock: socket.socket
    peer: str = ""
    #: ``pending`` (connecting), ``open``, ``refused`` (connect failed), ``eof``,
    #: ``reset``, ``data`` (the server sent something) or ``taken`` (a test took it).
    state: str = "pending"
    connected_at: float = 0.0
    ended_at: float = 0.0
    error: str = ""

    @property
    def lifetime(self) -> float:
        """Seconds from the completed connect to the server's close."""
        return self.ended_at - self.connected_at


class Burst:
    """``count`` TCP connects to ``host:port``, all at once, watched to their end.

    The sockets are non-blocking behind one selector; nothing is ever sent on them,
    so the daemon sees silent clients.  Call :meth:`close` (a cleanup) to close
    every socket still open.
    """

    def __init__(self, port: int, count: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.count = count
        self.connections: list[Connection] = []
        self._selector = selectors.DefaultSelector()
        #: Monotonic time the first connect started, and how long opening took.
        self.started = 0.0
        self.opened_in = 0.0

    def open(self, timeout: float) -> None:
        """Start every connect, then wait (at most ``timeout`` s) until each completed."""
        started = self.started = time.monotonic()
        selector = self._selector
        for _ in range(self.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            connection = Connection(sock)
            self.connections.append(connection)
            code = sock.connect_ex((self.host, self.port))
            if code == 0:
                self._connected(connection)
            elif code in {errno.EINPROGRESS, errno.EAGAIN}:
                selector.register(sock, selectors.EVENT_WRITE, connection)
            else:
                self._failed(connection, code)
        end = started + timeout
        while any(c.state == "pending" for c in self.connections):
            left = end - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(left):
                connection = key.data
                if connection.state != "pending":
                    continue
                selector.unregister(connection.sock)
                code = connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code == 0:
                    self._connected(connection)
                else:
                    self._failed(connection, code)
        self.opened_in = time.monotonic() - started

    def _connected(self, connection: Connection) -> None:
        connection.state = "open"
        connection.connected_at = time.monotonic()
        connection.peer = local_peer(connection.sock)
        self._selector.register(connection.sock, selectors.EVENT_READ, connection)

    def _failed(self, connection: Connection, code: int) -> None:
        connection.state = "refused"
        connection.error = errno.errorcode.get(code, str(code))
        connection.ended_at = time.monotonic()
        connection.sock.close()

    def take(self, connection: Connection) -> socket.socket:
        """Hand an open socket to the caller (it is no longer watched; caller closes it)."""
        assert connection.state == "open", connection
        self._selector.unregister(connection.sock)
        connection.state = "taken"
        connection.sock.setblocking(True)
        return connection.sock

    def watch(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until the server ended every open connection."""
        end = time.monotonic() + timeout
        selector = self._selector
        while self.in_state("open"):
            left = end - time.monotonic()
            if left <= 0:
                return
            for key, _ in selector.select(left):
                connection: Connection = key.data
                try:
                    chunk = connection.sock.recv(4096)
                except ConnectionResetError:
                    connection.state = "reset"
                except BlockingIOError:
                    continue
                else:
                    connection.state = "eof" if not chunk else "data"
                connection.ended_at = time.monotonic()
                selector.unregister(connection.sock)
                connection.sock.close()

    def in_state(self, *states: str) -> list[Connection]:
        """The connections now in one of ``states``."""
        return [c for c in self.connections if c.state in states]

    def close(self) -> None:
        """Close every socket (idempotent)."""
        for connection in self.connections:
            if connection.state in {"pending", "open"}:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(connection.sock)
            connection.sock.close()
        self._selector.close()


# -- TLS clients ---------------------------------------------------------------------


def encrypt(client: TLSClient, data: bytes) -> bytes:
    """Encrypt ``data`` on ``client``'s TLS session; return the records (not sent)."""
    client.write(data)
    # The records go out by the caller's own loop, not TLSClient.pump.
    return client._outgoing.read()


def read_slowly(
    client: TLSClient, timeout: float, *, chunk: int = 16384, pause: float = 0.005
) -> bytes:
    """Read ``client`` to the end of the stream, ``chunk`` bytes per ``pause`` s.

    A slow but steady reader: the server's replies back up in the socket buffers
    while it reads.  A reset counts as the end.  Returns all plaintext received.
    """
    sock = client.sock
    end = time.monotonic() + timeout
    while not client.eof and not client.close_notify:
        left = end - time.monotonic()
        if left <= 0:
            msg = f"still open after {timeout} s; received {len(client.received)} bytes"
            raise TimeoutError(msg)
        sock.settimeout(left)
        try:
            data = sock.recv(chunk)
        except ConnectionResetError:
            data = b""
        if data:
            client._incoming.write(data)
        else:
            client.eof = True
            client._incoming.write_eof()
        client._read_tls()
        time.sleep(pause)
    return bytes(client.received)


def peer_certificate_der(client: TLSClient) -> bytes:
    """The DER certificate the server presented to ``client``."""
    der = client.tls.getpeercert(binary_form=True)
    assert der is not None, "no peer certificate (the handshake did not finish?)"
    return der


@dataclass
class FloodResult:
    """What :func:`flood` did."""

    bytes_sent: int = 0
    #: Wall-clock time (``time.time()``) the flood started.
    started_wall: float = 0.0
    batches_encrypted: int = 0
    duration: float = 0.0
    #: Wall-clock time (``time.time()``) of the last send that made progress.
    last_progress_wall: float = 0.0
    #: Monotonic time of the same.
    last_progress: float = 0.0
    #: How the flood ended: ``duration`` or the error that stopped it.
    ended_by: str = "duration"


def flood(
    client: TLSClient,
    batch: bytes,
    duration: float,
    *,
    tick: float = 0.5,
    on_tick: Callable[[], object] | None = None,
    high_water: int = 256 * 1024,
) -> FloodResult:
    """Send ``batch`` again and again for ``duration`` s as fast as possible; never read.

    At most ``high_water`` bytes of ciphertext are kept ready to send.  Every
    ``tick`` s ``on_tick()`` runs (a probe, an RSS sample).  The flood stops early if
    the server drops the connection.
    """
    result = FloodResult()
    sock = client.sock
    sock.setblocking(False)
    pending = bytearray()
    result.started_wall = time.time()
    started = time.monotonic()
    end = started + duration
    next_tick = started + tick
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if on_tick is not None and now >= next_tick:
                on_tick()
                next_tick += tick
                continue
            if len(pending) < high_water:
                pending += encrypt(client, batch)
                result.batches_encrypted += 1
            try:
                sent = sock.send(pending)
            except BlockingIOError:
                selector.select(max(min(next_tick, end) - now, 0.001))
                continue
            except OSError as error:
                result.ended_by = f"{type(error).__name__}: {error}"
                break
            if sent:
                del pending[:sent]
                result.bytes_sent += sent
                result.last_progress = time.monotonic()
                result.last_progress_wall = time.time()
    result.duration = time.monotonic() - started
    return result


# -- the daemon's log ----------------------------------------------------------------


def event_time(event: Event) -> float:
    """The wall-clock time (seconds since the epoch) of a log record."""
    return datetime.datetime.fromisoformat(event["time"]).timestamp()


def wait_closed_records(
    daemon: Daemon, peers: Iterable[str], *, since: int = 0, timeout: float
) -> dict[str, Event]:
    """Wait until every peer in ``peers`` has its ``connection_closed`` record.

    Returns the records found by peer; the caller compares its length with what it
    expected (a timeout is not an error here, so a test can say what was missing).
    """
    wanted = set(peers)
    found: dict[str, Event] = {}
    end = time.monotonic() + timeout
    while True:
        for event in daemon.events()[since:]:
            if event.get("event") == "connection_closed" and event.get("peer") in wanted:
                found[event["peer"]] = event
        if len(found) == len(wanted) or time.monotonic() >= end:
            return found
        time.sleep(LOG_POLL_INTERVAL)


# -- figures -------------------------------------------------------------------------


class Figures:
    """Measured numbers of a test run: a JSON file in trial's directory and the test log."""

    log = Logger()

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, name: str, value: object) -> None:
        """Store ``value`` under ``name``; rewrite the JSON file; log it."""
        try:
            figures = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            figures = {}
        figures[name] = value
        self.path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        self.log.info(
            "hostile figure {name}: {value}", event="hostile_figure", name=name, value=value
        )
