"""Clients that ask for info replies and never read them, against the real daemon.

An ``--info-line`` reply is about 65 times as long as its line, so a client that
sends info lines without reading makes the server produce output far faster than
it sends.  docs/protocol.md ("Flow control") states the bound this test measures.
"""

from __future__ import annotations

import selectors
import time
from typing import TYPE_CHECKING, Final

from tests.hostile_clients import MIB, RSSSamples
from tests.test_hostile import HostileCase

if TYPE_CHECKING:
    from tests.test_integration import TLSClient

#: Clients, and what each sends.
CLIENTS: Final = 8
SENT_PER_CLIENT: Final = MIB
#: The info line of the daemon under test, as the clients send it.
INFO: Final = b"INFO"
#: Growth of the daemon's RSS all clients together may cause (docs/protocol.md).
RSS_BOUND: Final = 24 * MIB
#: How long the clients try to send; how long the daemon then gets to settle.
SEND_SECONDS: Final = 10.0
SETTLE_SECONDS: Final = 10.0
#: The daemon's write-stall timeout: longer than the test, so nobody is dropped.
STALL_TIMEOUT: Final = 60.0


def send_without_reading(clients: list[TLSClient], seconds: float, sample: object) -> list[int]:
    """Send every client's queued records, never reading; return the bytes each sent.

    Stops when all is sent or after ``seconds``; calls ``sample()`` every 0.1 s.
    """
    pending = [bytearray(client._outgoing.read()) for client in clients]
    sent = [0] * len(clients)
    end = time.monotonic() + seconds
    next_sample = 0.0
    with selectors.DefaultSelector() as selector:
        for index, client in enumerate(clients):
            client.sock.setblocking(False)
            selector.register(client.sock, selectors.EVENT_WRITE, index)
        while any(pending) and (now := time.monotonic()) < end:
            if now >= next_sample:
                sample()  # type: ignore[operator]
                next_sample = now + 0.1
            for key, _ in selector.select(0.1):
                index = key.data
                try:
                    count = clients[index].sock.send(pending[index])
                except BlockingIOError:
                    continue
                del pending[index][:count]
                sent[index] += count
                if not pending[index]:
                    selector.unregister(key.fileobj)
    return sent


class InfoFloodTests(HostileCase):
    """``--info-line`` replies count against the per-connection output bound."""

    def test_info_lines_without_reading(self) -> None:
        """Eight clients each send 1 MiB of info lines and never read.

        Together they may grow the daemon's RSS by RSS_BOUND at most (without a
        bound on the output per read they grew it by 64 MiB), and the daemon goes
        on serving a ninth client meanwhile.  The settling time is long enough
        for output that is made without regard to the send buffer to pass the
        bound.
        """
        daemon = self.daemon_in(
            "--info-line", INFO.decode(), "--write-stall-timeout", f"{STALL_TIMEOUT:g}"
        )
        clients = [self.tls_client(daemon) for _ in range(CLIENTS)]
        prober = self.tls_client(daemon)
        rss = RSSSamples(daemon.process.pid)
        rss.start()
        lines = INFO + b"\n"
        for client in clients:
            client.write(lines * (SENT_PER_CLIENT // len(lines)))
        sent = send_without_reading(clients, SEND_SECONDS, rss.sample)
        settle_end = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < settle_end:
            rss.sample()
            time.sleep(0.1)
        prober.write(b"still served\n")
        self.assertEqual(prober.read_until(13), b"still served\n")
        rss.sample()
        self.assertLessEqual(rss.peak_growth, RSS_BOUND)
        self.assert_no_tracebacks(daemon)
        self.figures.record(
            "info_flood",
            {
                "clients": CLIENTS,
                "client_bytes_sent": sent,
                "rss_baseline_mib": round(rss.baseline / MIB, 2),
                "rss_peak_growth_mib": round(rss.peak_growth / MIB, 2),
                "rss_bound_mib": RSS_BOUND // MIB,
            },
        )
