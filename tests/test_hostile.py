"""Hostile clients against the real daemon, over 127.0.0.1.

Each test plays one kind of client a public TLS port meets: silent, half a
ClientHello, idle, dripping, plaintext, garbage, never reading, one huge line,
abrupt closes, connection bursts, unlisted certificates, and a client caught in a
reload or a shutdown.  The daemons run with short deadlines so that each deadline
can be watched firing.

Everything is bounded: each socket operation has a timeout, each wait a deadline.
Measured numbers (deadlines' real firing times, RSS growth, burst counts) go to
``hostile-figures.json`` in trial's directory and to the test log
(:class:`tests.hostile_clients.Figures`).
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial.unittest import SkipTest

from secure_echo.tools import certgen
from tests.daemon import Daemon, shared_daemon, start_daemon
from tests.hostile_clients import (
    MIB,
    Burst,
    Figures,
    RSSSamples,
    client_hello,
    event_time,
    flood,
    peer_certificate_der,
    raise_nofile_limit,
    read_slowly,
    reset,
    wait_closed,
    wait_closed_records,
)
from tests.test_integration import (
    IO_TIMEOUT,
    IntegrationCase,
    TLSClient,
    client_context,
    peer_of,
    raw_connect,
    recv_all,
    server_args,
    shared_pki,
)

if TYPE_CHECKING:
    from tests.daemon import Event

#: Deadlines of the shared hostile daemon (seconds).
HANDSHAKE_TIMEOUT: Final = 1.0
IDLE_TIMEOUT: Final = 1.0
WRITE_STALL_TIMEOUT: Final = 2.0
#: How late a deadline may fire on a busy 2-core machine (seconds).
SLACK: Final = 2.0
#: Growth of the daemon's RSS a hostile client may cause.
RSS_BOUND: Final = 32 * MIB
#: Repetitions of each close case.
CLOSE_REPEATS: Final = 30
#: Connections in a burst, and the file descriptors the test process needs for it.
BURST: Final = 2000
BURST_FDS: Final = 4200
#: The burst daemons' handshake timeout: long enough for a sample to shake hands.
BURST_HANDSHAKE_TIMEOUT: Final = 2.0
#: The flood: how long it lasts, and the flood daemon's write-stall timeout.  The
#: stall timeout outlasts the flood, so the flooding connection lives to its end.
FLOOD_SECONDS: Final = 8.0
FLOOD_STALL_TIMEOUT: Final = 10.0
#: The drain daemons' --drain-timeout.
DRAIN_TIMEOUT: Final = 3.0
LINE_TOO_LONG_65536: Final = b"-ERR line-too-long line exceeds 65536 bytes\n"


def hostile_daemon() -> Daemon:
    """The shared daemon with short handshake, idle and write-stall timeouts."""
    pki = shared_pki()
    return shared_daemon(
        "hostile",
        lambda _: server_args(
            pki,
            "--handshake-timeout",
            f"{HANDSHAKE_TIMEOUT:g}",
            "--idle-timeout",
            f"{IDLE_TIMEOUT:g}",
            "--write-stall-timeout",
            f"{WRITE_STALL_TIMEOUT:g}",
        ),
    )


def numbered_lines(prefix: bytes, count: int, width: int = 0) -> bytes:
    """``count`` distinct LF-terminated lines, each padded with ``width`` bytes."""
    pad = b"." * width
    return b"".join(b"%s %06d %s\n" % (prefix, i, pad) for i in range(count))


class HostileCase(IntegrationCase):
    """Helpers shared by the hostile tests."""

    @property
    def figures(self) -> Figures:
        """Where measured numbers go (trial's working directory)."""
        return Figures(Path("hostile-figures.json").absolute())

    def daemon_in(self, *args: str) -> Daemon:
        """A daemon for this test only, with the shared test certificate and ``args``."""
        return start_daemon(self, Path(self.mktemp()), server_args(shared_pki(), *args))

    def assert_no_tracebacks(self, daemon: Daemon, since: int = 0) -> None:
        """The daemon logged no failure (no record carries a traceback) and still runs."""
        broken = [e for e in daemon.events()[since:] if "traceback" in e]
        self.assertEqual(broken, [], daemon.describe())
        self.assertIsNone(daemon.process.poll(), daemon.describe())

    def assert_echo_works(self, daemon: Daemon, line: bytes = b"still alive\n") -> None:
        """A fresh client gets ``line`` echoed and an orderly close."""
        since = daemon.mark()
        client = self.tls_client(daemon)
        client.write(line)
        client.send_close_notify()
        self.assertEqual(client.read_to_end(), line)
        self.assert_closed_as(daemon, since, client.peer, "eof")

    def wait_peer_event(
        self, daemon: Daemon, name: str, peer: str, since: int, timeout: float = IO_TIMEOUT
    ) -> Event:
        """The first ``name`` event of ``peer`` after ``since``."""
        return daemon.wait_for_event(
            lambda e: e.get("event") == name and e.get("peer") == peer,
            since=since,
            timeout=timeout,
        )


class DeadlineTests(HostileCase):
    """Clients that stall: each deadline fires on time and is logged."""

    def test_silent_connection(self) -> None:
        """A TCP client that sends nothing is dropped after the handshake timeout."""
        daemon = hostile_daemon()
        since = daemon.mark()
        with raw_connect(daemon.port) as sock:
            peer = peer_of(sock)
            outcome, elapsed, data = wait_closed(sock, HANDSHAKE_TIMEOUT + SLACK + 2)
        self.assertEqual(data, b"")
        self.assertIn(outcome, {"eof", "reset"})
        self.assertGreater(elapsed, HANDSHAKE_TIMEOUT - 0.1)
        self.assertLess(elapsed, HANDSHAKE_TIMEOUT + SLACK)
        event = self.assert_closed_as(daemon, since, peer, "handshake_timeout")
        self.assertEqual(event["tls_error"], f"no handshake within {HANDSHAKE_TIMEOUT:g} s")
        self.figures.record(
            "silent_connection",
            {"configured_s": HANDSHAKE_TIMEOUT, "measured_s": round(elapsed, 3), "how": outcome},
        )

    def test_half_client_hello(self) -> None:
        """Half of a real ClientHello, then silence: dropped at the handshake timeout."""
        daemon = hostile_daemon()
        since = daemon.mark()
        hello = client_hello(client_context(shared_pki().ca_cert))
        with raw_connect(daemon.port) as sock:
            peer = peer_of(sock)
            sock.sendall(hello[: len(hello) // 2])
            outcome, elapsed, data = wait_closed(sock, HANDSHAKE_TIMEOUT + SLACK + 2)
        self.assertEqual(data, b"", "the server answered half a ClientHello")
        self.assertIn(outcome, {"eof", "reset"})
        self.assertGreater(elapsed, HANDSHAKE_TIMEOUT - 0.1)
        self.assertLess(elapsed, HANDSHAKE_TIMEOUT + SLACK)
        self.assert_closed_as(daemon, since, peer, "handshake_timeout")
        self.figures.record(
            "half_client_hello",
            {
                "hello_bytes": len(hello),
                "sent_bytes": len(hello) // 2,
                "measured_s": round(elapsed, 3),
                "how": outcome,
            },
        )

    def test_idle_after_handshake(self) -> None:
        """A client silent after one echo is closed (close_notify) after the idle timeout."""
        daemon = hostile_daemon()
        since = daemon.mark()
        client = self.tls_client(daemon)
        client.write(b"then silence\n")
        self.assertEqual(client.read_until(13), b"then silence\n")
        started = time.monotonic()
        client.read_to_end(timeout=IDLE_TIMEOUT + SLACK + 2)
        elapsed = time.monotonic() - started
        self.assertTrue(client.close_notify, "an idle close should be orderly")
        self.assertGreater(elapsed, IDLE_TIMEOUT - 0.1)
        self.assertLess(elapsed, IDLE_TIMEOUT + SLACK)
        self.assert_closed_as(daemon, since, client.peer, "idle_timeout")
        self.figures.record(
            "idle_timeout", {"configured_s": IDLE_TIMEOUT, "measured_s": round(elapsed, 3)}
        )

    def test_slow_drip_keeps_connection_alive(self) -> None:
        """A line dripped one byte per 0.2 s outlives the idle timeout and is echoed.

        The idle timeout measures the time since the client's last byte, not since
        its last complete line, so a drip is not idle.
        """
        daemon = hostile_daemon()
        since = daemon.mark()
        client = self.tls_client(daemon)
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        line = b"drip, drip, drip\n"
        started = time.monotonic()
        for byte in line:
            client.write(bytes([byte]))
            client.flush()
            time.sleep(0.2)
        self.assertEqual(client.read_until(len(line)), line)
        dripped = time.monotonic() - started
        self.assertGreater(dripped, 2 * IDLE_TIMEOUT)
        client.send_close_notify()
        self.assertEqual(client.read_to_end(), line)
        event = self.assert_closed_as(daemon, since, client.peer, "eof")
        self.assertEqual(event["lines_in"], 1)
        self.figures.record("slow_drip", {"bytes": len(line), "dripped_s": round(dripped, 3)})


class GarbageTests(HostileCase):
    """Clients that send what is not TLS, before or after the handshake."""

    def test_plaintext_http_request(self) -> None:
        """``GET / HTTP/1.0`` gets an HTTP 400 whose body is the hint, then the close."""
        daemon = hostile_daemon()
        since = daemon.mark()
        with raw_connect(daemon.port) as sock:
            peer = peer_of(sock)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = recv_all(sock)
        head, _, body = reply.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 400 "), reply)
        self.assertTrue(body.startswith(b"-ERR tls-required "), reply)
        self.assertEqual(body.count(b"\n"), 1, reply)
        self.assert_closed_as(daemon, since, peer, "plaintext_client")

    def assert_garbage_refused(self, garbage: bytes) -> tuple[str, str]:
        """Send ``garbage`` raw after a handshake and an echo; expect ``tls_error``.

        Returns the reason the daemon logged and what the client saw.
        """
        daemon = hostile_daemon()
        since = daemon.mark()
        client = self.tls_client(daemon)
        client.write(b"ok\n")
        self.assertEqual(client.read_until(3), b"ok\n")
        client.sock.sendall(garbage)
        try:
            client.read_to_end()
        except ssl.SSLError as error:
            seen = f"alert: {error.reason or error}"
        else:
            seen = "close_notify" if client.close_notify else "eof"
        failed = self.wait_peer_event(daemon, "tls_error", client.peer, since)
        self.assertTrue(failed["reason"], failed)
        event = self.assert_closed_as(daemon, since, client.peer, "tls_error")
        self.assertEqual(event["tls_error"], failed["reason"])
        self.assert_no_tracebacks(daemon, since)
        return failed["reason"], seen

    def test_forged_record_after_handshake(self) -> None:
        """An application-data record with random contents is a ``tls_error``."""
        reason, seen = self.assert_garbage_refused(b"\x17\x03\x03\x00\x40" + os.urandom(64))
        self.figures.record("forged_record", {"reason": reason, "client_saw": seen})

    def test_plain_bytes_after_handshake(self) -> None:
        """Plain text on the TCP stream after the handshake is a ``tls_error``."""
        reason, seen = self.assert_garbage_refused(b"this is not a TLS record\r\n" * 4)
        self.figures.record("plain_bytes_after_handshake", {"reason": reason, "client_saw": seen})


class MemoryTests(HostileCase):
    """Clients that try to make the daemon buffer without bound."""

    def test_never_reading_flood(self) -> None:
        """A client that floods lines and never reads cannot grow the daemon.

        For FLOOD_SECONDS a client pipelines ~64 KiB batches as fast as it can and
        never reads.  Meanwhile a second client keeps getting its echoes, and the
        daemon's RSS grows less than RSS_BOUND.  After the flood the non-reader is
        dropped as a slow reader once its output made no progress for the
        write-stall timeout.
        """
        daemon = self.daemon_in("--write-stall-timeout", f"{FLOOD_STALL_TIMEOUT:g}")
        since = daemon.mark()
        prober = self.tls_client(daemon)
        prober.write(b"warm up\n")
        self.assertEqual(prober.read_until(8), b"warm up\n")
        rss = RSSSamples(daemon.process.pid)
        rss.start()
        flooder = self.tls_client(daemon)
        latencies: list[float] = []

        def probe() -> None:
            rss.sample()
            line = b"probe %d\n" % len(latencies)
            expected = len(prober.received) + len(line)
            started = time.monotonic()
            prober.write(line)
            received = prober.read_until(expected, timeout=5)
            latencies.append(time.monotonic() - started)
            self.assertTrue(received.endswith(line), received[-100:])

        batch = numbered_lines(b"flood", 600, 100)
        result = flood(flooder, batch, FLOOD_SECONDS, on_tick=probe)
        rss.sample()
        self.assertEqual(result.ended_by, "duration", "the flooder was dropped during the flood")
        self.assertGreaterEqual(len(latencies), int(FLOOD_SECONDS / 0.5) - 2)
        self.assertLess(rss.peak_growth, RSS_BOUND)

        dropped = self.wait_peer_event(
            daemon, "slow_reader", flooder.peer, since, timeout=FLOOD_STALL_TIMEOUT + SLACK + 5
        )
        # The stall began after the flood started and, since the daemon stopped
        # reading then, no later than the client's last progress.
        dropped_at = event_time(dropped)
        self.assertGreater(dropped_at - result.started_wall, FLOOD_STALL_TIMEOUT - 0.05)
        to_slow_reader = dropped_at - result.last_progress_wall
        self.assertLess(to_slow_reader, FLOOD_STALL_TIMEOUT + SLACK)
        event = self.assert_closed_as(daemon, since, flooder.peer, "slow_reader")
        rss.sample()
        # The prober is still served once the flooder is gone.
        prober.write(b"after\n")
        prober.send_close_notify()
        self.assertTrue(prober.read_to_end().endswith(b"after\n"))
        self.assert_closed_as(daemon, since, prober.peer, "eof")
        self.assert_no_tracebacks(daemon, since)
        self.figures.record(
            "never_reading_flood",
            {
                "flood_s": round(result.duration, 3),
                "client_bytes_sent": result.bytes_sent,
                "server_lines_in": event["lines_in"],
                "server_bytes_out": event["bytes_out"],
                "rss_baseline_mib": round(rss.baseline / MIB, 2),
                "rss_peak_growth_mib": round(rss.peak_growth / MIB, 2),
                "rss_growth_after_drop_mib": round(rss.final_growth / MIB, 2),
                "probe_count": len(latencies),
                "probe_latency_max_ms": round(max(latencies) * 1000, 1),
                "write_stall_timeout_s": FLOOD_STALL_TIMEOUT,
                "last_progress_to_slow_reader_s": round(to_slow_reader, 3),
                "flood_start_to_slow_reader_s": round(dropped_at - result.started_wall, 3),
                "unsent_at_drop": dropped.get("unsent"),
            },
        )

    def test_ten_mib_line_in_pipeline(self) -> None:
        """``a``, a 10 MiB line, ``b``: replies ``a``, ``-ERR line-too-long``, ``b``.

        The daemon's RSS grows less than RSS_BOUND while the line streams in.
        """
        daemon = self.daemon_in()
        since = daemon.mark()
        client = self.tls_client(daemon)
        rss = RSSSamples(daemon.process.pid)
        rss.start()
        started = time.monotonic()
        client.write(b"a\n")
        chunk = b"x" * MIB
        for _ in range(10):
            client.write(chunk)
            client.flush(timeout=30)
            rss.sample()
        client.write(b"\nb\n")
        client.send_close_notify()
        replies = client.read_to_end(timeout=30)
        elapsed = time.monotonic() - started
        rss.sample()
        self.assertEqual(replies, b"a\n" + LINE_TOO_LONG_65536 + b"b\n")
        self.assertLess(rss.peak_growth, RSS_BOUND)
        event = self.assert_closed_as(daemon, since, client.peer, "eof")
        self.assertEqual(event["lines_in"], 3)
        self.assertEqual(event["overlong_lines"], 1)
        self.assertEqual(event["bytes_in"], 10 * MIB + 5)
        self.figures.record(
            "ten_mib_line",
            {
                "seconds": round(elapsed, 3),
                "rss_peak_growth_mib": round(rss.peak_growth / MIB, 2),
            },
        )


class AbruptCloseTests(HostileCase):
    """Lines followed at once by the end of the connection, many times over."""

    def run_close_case(self, name: str, finish: str) -> dict[str, Event]:
        """Open CLOSE_REPEATS clients; each sends lines, then ends as ``finish`` says.

        ``finish`` is ``close_notify`` (lines and close_notify in one segment),
        ``fin`` (a bare TCP FIN) or ``reset`` (an RST).  Every echo must come back
        for the first two.  Returns the ``connection_closed`` records by peer.
        """
        daemon = hostile_daemon()
        since = daemon.mark()
        peers: list[str] = []
        mismatches: list[int] = []
        for attempt in range(CLOSE_REPEATS):
            client = self.tls_client(daemon)
            peers.append(client.peer)
            data = numbered_lines(b"%s %d" % (name.encode(), attempt), 40, 20)
            client.write(data)
            if finish == "reset":
                client.flush()
                reset(client.sock)
                continue
            if finish == "close_notify":
                client.send_close_notify()
                client.send_in_one_segment()
            else:
                client.shutdown_write()
            if client.read_to_end() != data:
                mismatches.append(attempt)
            client.close()
        records = wait_closed_records(daemon, peers, since=since, timeout=IO_TIMEOUT)
        self.assertEqual(len(records), CLOSE_REPEATS, daemon.describe())
        self.assertEqual(mismatches, [], "attempts that lost echoes")
        self.assert_no_tracebacks(daemon, since)
        reasons = sorted({e["close_reason"] for e in records.values()})
        self.figures.record(f"close_{name}", {"repeats": CLOSE_REPEATS, "reasons": reasons})
        return records

    def test_lines_and_close_notify_in_one_segment(self) -> None:
        """Lines + close_notify in one TCP segment: every line echoed, every time."""
        records = self.run_close_case("close-notify", "close_notify")
        self.assertEqual({e["close_reason"] for e in records.values()}, {"eof"})
        self.assertEqual({e["lines_out"] for e in records.values()}, {40})

    def test_lines_and_bare_fin(self) -> None:
        """Lines + a TCP FIN without close_notify: every line echoed, every time."""
        records = self.run_close_case("fin", "fin")
        self.assertEqual({e["close_reason"] for e in records.values()}, {"client_closed"})
        self.assertEqual({e["lines_out"] for e in records.values()}, {40})

    def test_lines_then_reset(self) -> None:
        """Lines then an RST: the daemon survives and logs each connection's end."""
        records = self.run_close_case("reset", "reset")
        self.assertEqual({e["close_reason"] for e in records.values()}, {"reset"})
        self.assert_echo_works(hostile_daemon())


class BurstTests(HostileCase):
    """Many connections at once: each is accepted or refused, none left hanging."""

    def setUp(self) -> None:
        limit = raise_nofile_limit()
        if limit < BURST_FDS:
            raise SkipTest(
                f"RLIMIT_NOFILE hard limit is {limit}; a {BURST}-connection burst needs "
                f"{BURST_FDS} (raise it with ulimit -n)"
            )

    def burst(self, daemon: Daemon) -> Burst:
        """Open BURST connections to ``daemon`` at once; closed at cleanup."""
        burst = Burst(daemon.port, BURST)
        self.addCleanup(burst.close)
        burst.open(timeout=IO_TIMEOUT)
        self.assertEqual(burst.in_state("pending"), [], "connects that never completed")
        return burst

    def test_burst_all_accepted(self) -> None:
        """2000 connects at once: all accepted, a sample shakes hands, the rest time out.

        Every silent connection is reset within the handshake timeout plus slack of
        its connect; none is left hanging.  The daemon logs one ``connection_closed``
        per connection.
        """
        daemon = self.daemon_in("--handshake-timeout", f"{BURST_HANDSHAKE_TIMEOUT:g}")
        since = daemon.mark()
        burst = self.burst(daemon)
        context = client_context(shared_pki().ca_cert)
        sampled: list[str] = []
        for connection in burst.in_state("open")[-10:]:
            sock = burst.take(connection)
            sock.settimeout(IO_TIMEOUT)
            with context.wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(b"sampled\n")
                self.assertEqual(recv_all_until(tls, 8), b"sampled\n")
            sampled.append(connection.peer)
        burst.watch(timeout=BURST_HANDSHAKE_TIMEOUT + SLACK + 5)
        self.assertEqual(burst.in_state("open"), [], "connections left hanging")
        self.assertEqual(burst.in_state("data"), [])
        ended = burst.in_state("eof", "reset")
        lifetimes = [c.lifetime for c in ended]
        self.assertLess(max(lifetimes), BURST_HANDSHAKE_TIMEOUT + SLACK + 3)
        # A timer starts at accept, after the burst started.
        first_end = min(c.ended_at for c in ended) - burst.started
        self.assertGreater(first_end, BURST_HANDSHAKE_TIMEOUT - 0.05)

        accepted = [c.peer for c in burst.connections if c.peer]
        records = wait_closed_records(daemon, accepted, since=since, timeout=20)
        self.assertEqual(len(records), len(accepted), "connections the daemon never logged")
        timed_out = [p for p, e in records.items() if e["close_reason"] == "handshake_timeout"]
        self.assertEqual(len(timed_out), len(accepted) - len(sampled))
        self.assertEqual(burst.in_state("refused"), [])
        self.assertEqual(daemon.find_events(lambda e: "refused" in e["event"], since), [])
        self.assert_no_tracebacks(daemon, since)
        self.figures.record(
            "burst_all_accepted",
            {
                "connects": BURST,
                "opened_in_s": round(burst.opened_in, 3),
                "accepted": len(records),
                "sampled_handshakes": len(sampled),
                "reset": len(burst.in_state("reset")),
                "eof": len(burst.in_state("eof")),
                "connect_refused": len(burst.in_state("refused")),
                "handshake_timeout_s": BURST_HANDSHAKE_TIMEOUT,
                "lifetime_min_s": round(min(lifetimes), 3),
                "lifetime_max_s": round(max(lifetimes), 3),
            },
        )

    def test_burst_over_max_connections(self) -> None:
        """With --max-connections 100 a burst gets 100 accepted, the rest refused at once.

        Refused connections see an immediate EOF; the log holds one
        ``connection_refused`` and an aggregated ``connections_refused``, not one
        record per refusal.
        """
        daemon = self.daemon_in(
            "--handshake-timeout", f"{BURST_HANDSHAKE_TIMEOUT:g}", "--max-connections", "100"
        )
        since = daemon.mark()
        burst = self.burst(daemon)
        burst.watch(timeout=BURST_HANDSHAKE_TIMEOUT + SLACK + 5)
        self.assertEqual(burst.in_state("open"), [], "connections left hanging")
        self.assertEqual(burst.in_state("data"), [])
        refused = burst.in_state("eof")
        accepted = burst.in_state("reset")
        self.assertEqual(len(refused) + len(accepted), BURST)
        # Slots free up only when the first accepted connections time out; a burst
        # refused before then leaves exactly 100 accepted.
        if max(c.ended_at for c in refused) < min(c.ended_at for c in accepted):
            self.assertEqual(len(accepted), 100)
        else:
            self.assertGreaterEqual(len(accepted), 100)
        refused_after = max(c.lifetime for c in refused)
        self.assertLess(refused_after, 1.0)
        first_end = min(c.ended_at for c in accepted) - burst.started
        self.assertGreater(first_end, BURST_HANDSHAKE_TIMEOUT - 0.05)

        summary = daemon.wait_for_event(
            lambda e: e.get("event") == "connections_refused", since=since, timeout=15
        )
        first = daemon.find_events(lambda e: e.get("event") == "connection_refused", since)
        self.assertEqual(len(first), 1, first)
        self.assertEqual(first[0]["reason"], "limit_total")
        self.assertEqual(summary["counts"], {"limit_total": len(refused) - 1})
        self.assertEqual(summary["total"], len(refused) - 1)
        records = wait_closed_records(
            daemon, [c.peer for c in accepted], since=since, timeout=IO_TIMEOUT
        )
        self.assertEqual(
            {e["close_reason"] for e in records.values()}, {"handshake_timeout"}, records
        )
        refusal_records = daemon.find_events(lambda e: "refused" in e["event"], since)
        self.assertEqual(len(refusal_records), 2, refusal_records)
        self.assert_no_tracebacks(daemon, since)
        self.figures.record(
            "burst_max_connections_100",
            {
                "connects": BURST,
                "accepted": len(accepted),
                "refused": len(refused),
                "refused_eof_max_s": round(refused_after, 3),
                "refusal_log_records": len(refusal_records),
                "summary_top_peers": summary.get("top_peers"),
            },
        )

    def test_third_connection_from_one_ip(self) -> None:
        """With --max-connections-per-ip 2 a third client from 127.0.0.1 is refused.

        The two open connections keep working, another loopback address is still
        accepted, and a slot freed by a close is usable again.
        """
        daemon = self.daemon_in("--max-connections-per-ip", "2")
        since = daemon.mark()
        first = self.tls_client(daemon)
        second = self.tls_client(daemon)
        with raw_connect(daemon.port) as third:
            outcome, elapsed, data = wait_closed(third, IO_TIMEOUT)
            peer = peer_of(third)
        self.assertEqual((outcome, data), ("eof", b""))
        self.assertLess(elapsed, 1.0)
        refused = daemon.wait_for_event(
            lambda e: e.get("event") == "connection_refused", since=since
        )
        self.assertEqual(refused["reason"], "limit_per_ip")
        self.assertEqual(refused["peer"], peer)
        self.assertEqual(refused["peer_key"], "127.0.0.1")
        for client in (first, second):
            client.write(b"still served\n")
            self.assertEqual(client.read_until(13), b"still served\n")

        context = client_context(shared_pki().ca_cert)
        other = socket.create_connection(
            ("127.0.0.1", daemon.port), timeout=IO_TIMEOUT, source_address=("127.0.0.2", 0)
        )
        with context.wrap_socket(other, server_hostname="localhost") as tls:
            tls.sendall(b"other address\n")
            self.assertEqual(recv_all_until(tls, 14), b"other address\n")

        first.send_close_notify()
        first.read_to_end()
        self.assert_closed_as(daemon, since, first.peer, "eof")
        self.assert_echo_works(daemon, b"slot freed\n")
        second.send_close_notify()
        second.read_to_end()
        self.assert_closed_as(daemon, since, second.peer, "eof")
        self.figures.record("per_ip_refusal", {"eof_after_s": round(elapsed, 3)})


def recv_all_until(tls: ssl.SSLSocket, size: int) -> bytes:
    """Read a blocking TLS socket until ``size`` bytes or the end of the stream."""
    data = bytearray()
    while len(data) < size:
        chunk = tls.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


_allow_certs: dict[str, tuple[Path, Path]] | None = None


def allow_certs() -> dict[str, tuple[Path, Path]]:
    """Client certificates for the allow-list tests, by role: (cert, key) paths."""
    global _allow_certs  # noqa: PLW0603 - made once per test process
    if _allow_certs is None:
        pki = shared_pki()
        directory = Path("allow-certs").absolute()
        directory.mkdir(parents=True, exist_ok=True)
        ten_days_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        other_ca = certgen.make_ca("allow-list stranger CA", days=2)
        issued = {
            "listed-cn": certgen.issue_client(pki.ca, "allowed-client", days=2),
            "spiffe": certgen.issue_client(
                pki.ca, "workload", uris=["spiffe://example.org/web"], days=2
            ),
            "unlisted": certgen.issue_client(
                pki.ca, "intruder", uris=["spiffe://example.org/db"], days=2
            ),
            # Valid from ten days ago until five days ago.
            "expired": certgen.issue_client(pki.ca, "allowed-client", days=5, now=ten_days_ago),
            "wrong-ca": certgen.issue_client(other_ca, "allowed-client", days=2),
            "server-eku": certgen.issue_client(
                pki.ca, "allowed-client", usage=ExtendedKeyUsageOID.SERVER_AUTH, days=2
            ),
        }
        _allow_certs = {}
        for role, cert in issued.items():
            paths = (directory / f"{role}.pem", directory / f"{role}-key.pem")
            certgen.write_pair(cert, *paths)
            _allow_certs[role] = paths
    return _allow_certs


def allow_daemon() -> Daemon:
    """A shared daemon requiring client certificates, narrowed by allow-lists."""
    pki = shared_pki()
    return shared_daemon(
        "hostile-allow",
        lambda _: server_args(
            pki,
            "--client-ca",
            str(pki.ca_cert),
            "--allow-cn",
            "allowed-client",
            "--allow-uri",
            "spiffe://example.org/web",
        ),
    )


class AllowListTests(HostileCase):
    """mTLS allow-lists: listed certificates pass, everything else is refused."""

    def connect_as(self, role: str) -> TLSClient:
        """A TLS client (not yet handshaken) presenting the ``role`` certificate."""
        context = client_context(shared_pki().ca_cert, cert=allow_certs()[role])
        client = TLSClient(allow_daemon().port, context)
        self.addCleanup(client.close)
        return client

    def assert_allowed(self, role: str, subject: str) -> None:
        """The ``role`` client gets its echo; the record names its certificate."""
        daemon = allow_daemon()
        since = daemon.mark()
        client = self.connect_as(role)
        client.handshake()
        client.write(b"let me in\n")
        client.send_close_notify()
        self.assertEqual(client.read_to_end(), b"let me in\n")
        event = self.assert_closed_as(daemon, since, client.peer, "eof")
        self.assertEqual(event["client_cert_subject"], subject)

    def assert_refused_as(self, role: str, reason_part: str) -> str:
        """The ``role`` client is refused with an alert; the log says ``reason_part``."""
        daemon = allow_daemon()
        since = daemon.mark()
        client = self.connect_as(role)
        try:
            client.handshake()
            client.write(b"let me in\n")
            client.flush()
            data = client.read_to_end()
        except (ssl.SSLError, ConnectionError) as error:
            seen = f"{type(error).__name__}: {error}"
        else:
            self.fail(f"refused client saw no TLS error, got {data!r}")
        failed = self.wait_peer_event(daemon, "handshake_failed", client.peer, since)
        self.assertIn(reason_part, failed["reason"])
        self.assert_closed_as(daemon, since, client.peer, "handshake_failed")
        self.figures.record(
            f"allow_list_refused_{role}", {"reason": failed["reason"], "client_saw": seen}
        )
        return seen

    def test_listed_common_name(self) -> None:
        """A certificate whose CN is on --allow-cn is served."""
        self.assert_allowed("listed-cn", "CN=allowed-client")

    def test_listed_spiffe_uri(self) -> None:
        """A certificate whose URI SAN is on --allow-uri is served."""
        self.assert_allowed("spiffe", "CN=workload")

    def test_unlisted_certificate(self) -> None:
        """A valid certificate on no list is refused: 'not on the allow-list'."""
        self.assert_refused_as("unlisted", "not on the allow-list")

    def test_expired_certificate(self) -> None:
        """An expired certificate with a listed CN is refused as expired."""
        self.assert_refused_as("expired", "expired")

    def test_wrong_ca(self) -> None:
        """A listed CN from another CA is refused."""
        self.assert_refused_as("wrong-ca", "unable to get local issuer certificate")

    def test_server_auth_only_certificate(self) -> None:
        """A listed CN whose EKU allows only serverAuth is refused for its purpose."""
        self.assert_refused_as("server-eku", "purpose")


class ReloadTests(HostileCase):
    """Certificates replaced under a running daemon."""

    def reload_setup(self, *args: str) -> tuple[Daemon, Path, Path, ssl.SSLContext]:
        """A daemon serving cert A from files it may reload; a client trusting A and B."""
        pki = shared_pki()
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        cert, key = directory / "server.pem", directory / "server-key.pem"
        cert.write_bytes(pki.server_cert.read_bytes())
        certgen.write_private(key, pki.server_key.read_bytes())
        self.ca_b = certgen.make_ca("reload CA B", days=2)
        bundle = directory / "trust.pem"
        bundle.write_bytes(pki.ca_cert.read_bytes() + self.ca_b.cert_pem())
        daemon = start_daemon(
            self, directory / "daemon", ["--cert", str(cert), "--key", str(key), *args]
        )
        return daemon, cert, key, client_context(bundle)

    @staticmethod
    def der_of(path: Path) -> bytes:
        """The DER form of the PEM certificate in ``path``."""
        return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)

    def test_sighup_reload(self) -> None:
        """SIGHUP swaps in cert B for new connections; a bad key then keeps B.

        A connection opened before the reload keeps echoing.
        """
        daemon, cert, key, context = self.reload_setup()
        cert_a = self.der_of(cert)
        since = daemon.mark()
        old = self.tls_client(daemon, context)
        self.assertEqual(peer_certificate_der(old), cert_a)
        old.write(b"before\n")
        self.assertEqual(old.read_until(7), b"before\n")

        server_b = certgen.issue_server(self.ca_b, ("localhost", "127.0.0.1"), days=2)
        certgen.write_pair(server_b, cert, key)
        cert_b = server_b.certificate.public_bytes(Encoding.DER)
        mark = daemon.mark()
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGHUP)
        reloaded = daemon.wait_for_event(lambda e: e.get("event") == "tls_reloaded", since=mark)
        reload_s = time.monotonic() - started
        self.assertEqual(reloaded["trigger"], "SIGHUP")
        new = self.tls_client(daemon, context)
        self.assertEqual(peer_certificate_der(new), cert_b)
        new.write(b"new\n")
        self.assertEqual(new.read_until(4), b"new\n")
        old.write(b"after\n")
        self.assertEqual(old.read_until(13), b"before\nafter\n")

        certgen.write_private(key, shared_pki().client_key.read_bytes())
        mark = daemon.mark()
        daemon.process.send_signal(signal.SIGHUP)
        failed = daemon.wait_for_event(lambda e: e.get("event") == "tls_reload_failed", since=mark)
        self.assertIn("does not match", failed["error"])
        latest = self.tls_client(daemon, context)
        self.assertEqual(peer_certificate_der(latest), cert_b)
        for client in (old, new, latest):
            client.send_close_notify()
            client.read_to_end()
            self.assert_closed_as(daemon, since, client.peer, "eof")
        self.assert_no_tracebacks(daemon, since)
        self.figures.record("sighup_reload", {"signal_to_tls_reloaded_s": round(reload_s, 3)})

    def test_reload_interval(self) -> None:
        """With --reload-interval 0.5 rewritten files are picked up without a signal."""
        daemon, cert, key, context = self.reload_setup("--reload-interval", "0.5")
        since = daemon.mark()
        server_b = certgen.issue_server(self.ca_b, ("localhost",), days=2)
        started = time.monotonic()
        certgen.write_pair(server_b, cert, key)
        reloaded = daemon.wait_for_event(lambda e: e.get("event") == "tls_reloaded", since=since)
        reload_s = time.monotonic() - started
        self.assertEqual(reloaded["trigger"], "file-change")
        client = self.tls_client(daemon, context)
        self.assertEqual(
            peer_certificate_der(client), server_b.certificate.public_bytes(Encoding.DER)
        )
        client.write(b"watched\n")
        client.send_close_notify()
        self.assertEqual(client.read_to_end(), b"watched\n")
        self.assert_closed_as(daemon, since, client.peer, "eof")
        # Key and certificate are two files: a poll between the writes may fail once.
        failures = daemon.find_events(lambda e: e.get("event") == "tls_reload_failed", since)
        self.assert_no_tracebacks(daemon, since)
        self.figures.record(
            "reload_interval",
            {"write_to_tls_reloaded_s": round(reload_s, 3), "transient_failures": len(failures)},
        )


class DrainTests(HostileCase):
    """SIGTERM while clients have replies in flight."""

    def pipeline_without_reading(self, client: TLSClient, seconds: float) -> bytes:
        """Pipeline numbered lines for ``seconds`` without reading; return one batch.

        What was sent is a prefix of the batch repeated.
        """
        batch = numbered_lines(b"drain", 500, 60)
        result = flood(client, batch, seconds)
        self.assertEqual(result.ended_by, "duration")
        self.assertGreater(result.bytes_sent, 0)
        return batch

    def test_sigterm_finishes_replies(self) -> None:
        """SIGTERM: replies still in flight are delivered, then close_notify.

        The client pipelined 2000 lines and has not read a reply when the signal
        comes; the daemon has read every line.  The client then gets all 2000
        replies and close_notify.  The daemon exits well within the drain timeout
        and logs server_shutdown, drain_started and drain_finished.
        """
        daemon = self.daemon_in("--drain-timeout", f"{DRAIN_TIMEOUT:g}")
        since = daemon.mark()
        client = self.tls_client(daemon)
        data = numbered_lines(b"in flight", 2000, 60)
        client.write(data)
        client.flush()
        time.sleep(0.3)  # the daemon reads every line; the replies wait unread
        started = time.monotonic()
        daemon.terminate()
        time.sleep(0.3)  # the drain runs while the client still is not reading
        received = client.read_to_end(timeout=DRAIN_TIMEOUT + SLACK + 5)
        client.close()  # as a client does once the server closed
        code = daemon.wait(timeout=DRAIN_TIMEOUT + SLACK + 5)
        exited = time.monotonic() - started
        self.assertIn(code, {0, -signal.SIGTERM})
        event = self.assert_closed_as(daemon, since, client.peer, "server_shutdown")
        self.assertEqual(event["lines_in"], 2000, "premise: the daemon read every line")
        self.assertEqual(received, data)
        self.assertTrue(client.close_notify, "no close_notify after the replies")
        self.assertEqual(event["lines_out"], 2000)
        self.assertLess(exited, DRAIN_TIMEOUT)
        drain = {e["event"]: e for e in daemon.events()[since:] if e["event"].startswith("drain")}
        self.assertEqual(sorted(drain), ["drain_finished", "drain_started"])
        self.assertEqual(drain["drain_started"]["connections"], 1)
        drained_in = event_time(drain["drain_finished"]) - event_time(drain["drain_started"])
        self.figures.record(
            "sigterm_finishes_replies",
            {"drain_s": round(drained_in, 3), "signal_to_exit_s": round(exited, 3)},
        )

    def test_sigterm_aborts_non_reader(self) -> None:
        """SIGTERM: a client that never reads its large output is aborted at the drain timeout.

        A well-behaved client meanwhile gets its echo and close_notify at once.
        """
        daemon = self.daemon_in("--drain-timeout", f"{DRAIN_TIMEOUT:g}")
        since = daemon.mark()
        polite = self.tls_client(daemon)
        polite.write(b"polite\n")
        self.assertEqual(polite.read_until(7), b"polite\n")
        stubborn = self.tls_client(daemon)
        self.pipeline_without_reading(stubborn, 0.5)
        started = time.monotonic()
        daemon.terminate()
        self.assertEqual(polite.read_to_end(timeout=DRAIN_TIMEOUT + SLACK), b"polite\n")
        self.assertTrue(polite.close_notify)
        polite_closed = time.monotonic() - started
        polite.close()
        code = daemon.wait(timeout=DRAIN_TIMEOUT + SLACK + 5)
        exited = time.monotonic() - started
        self.assertIn(code, {0, -signal.SIGTERM})
        self.assertGreater(exited, DRAIN_TIMEOUT - 0.2)
        self.assertLess(exited, DRAIN_TIMEOUT + SLACK)
        self.assertLess(polite_closed, 1.0)
        timeout = daemon.wait_for_event(lambda e: e.get("event") == "drain_timeout", since=since)
        self.assertEqual(timeout["remaining"], 1)
        aborted = self.assert_closed_as(daemon, since, stubborn.peer, "drain_timeout")
        self.assertGreater(aborted["unsent_bytes"], 0)
        clean = self.assert_closed_as(daemon, since, polite.peer, "server_shutdown")
        self.assertEqual(clean["unsent_bytes"], 0)
        names = [e["event"] for e in daemon.events()[since:]]
        self.assertIn("drain_started", names)
        self.assertIn("drain_finished", names)
        self.figures.record(
            "sigterm_aborts_non_reader",
            {
                "drain_timeout_s": DRAIN_TIMEOUT,
                "exit_s": round(exited, 3),
                "polite_closed_s": round(polite_closed, 3),
            },
        )


class OverPipelinedCloseTests(HostileCase):
    """A server-initiated close while the client's input is unread.

    The client pipelined more than the daemon read (the daemon stopped reading
    because the client did not read its replies), and the daemon then closes: at
    SIGTERM or at --max-connection-age.  Every line it read must still be answered,
    then close_notify, for a client that reads (slowly) after the close began.

    ``close()`` on a socket with unread input would make the kernel send an RST
    and discard every reply still in the send buffer, close_notify included; the
    transport's lingering close (FIN after the replies, input read and dropped,
    the socket closed once the client has acknowledged everything) prevents it.
    """

    def over_pipeline(self, client: TLSClient) -> bytes:
        """Pipeline for 0.5 s without reading: more than the daemon will read."""
        batch = numbered_lines(b"over", 500, 60)
        result = flood(client, batch, 0.5)
        self.assertEqual(result.ended_by, "duration")
        return batch

    def assert_every_read_line_answered(
        self, daemon: Daemon, since: int, client: TLSClient, reason: str, batch: bytes
    ) -> None:
        """A slow reader gets one reply per line the daemon read, in order, then close_notify."""
        received = read_slowly(client, timeout=15)
        client.close()  # as a client does once the server closed
        event = self.assert_closed_as(daemon, since, client.peer, reason)
        self.assertEqual(event["lines_in"], event["lines_out"])
        replies = received.count(b"\n")
        self.figures.record(
            f"unread_input_close_{reason}",
            {"replies_written": event["lines_out"], "replies_received": replies},
        )
        self.assertEqual(
            replies,
            event["lines_out"],
            f"{event['lines_out']} replies written, {replies} received",
        )
        self.assertTrue(received.endswith(b"\n"), received[-100:])
        copies = math.ceil(len(received) / len(batch))
        self.assertTrue(received == (batch * copies)[: len(received)], "replies out of order")
        self.assertTrue(client.close_notify, "a reset instead of close_notify")

    def test_sigterm_with_unread_input(self) -> None:
        """SIGTERM while the client's input is unread: every line read is still answered."""
        daemon = self.daemon_in("--drain-timeout", f"{DRAIN_TIMEOUT:g}")
        since = daemon.mark()
        client = self.tls_client(daemon)
        batch = self.over_pipeline(client)
        daemon.terminate()
        time.sleep(0.3)  # the drain starts while the client does not read
        self.assert_every_read_line_answered(daemon, since, client, "server_shutdown", batch)

    def test_max_connection_age_with_unread_input(self) -> None:
        """At --max-connection-age with the client's input unread: every line read is answered."""
        daemon = self.daemon_in("--max-connection-age", "1")
        since = daemon.mark()
        client = self.tls_client(daemon)
        batch = self.over_pipeline(client)
        time.sleep(1.0)  # the connection reaches its age while the client does not read
        self.assert_every_read_line_answered(daemon, since, client, "max_connection_age", batch)
