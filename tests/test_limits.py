"""Tests for :mod:`secure_echo.edge.limits`: peer keys, connection counting, refusal logs, fds."""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING, Any

from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.edge import limits
from secure_echo.edge.limits import (
    DRAINING,
    FD_RESERVE,
    LIMIT_PER_IP,
    LIMIT_TOTAL,
    ConnectionLimiter,
    RefusalLog,
    default_max_connections,
    peer_key,
)

if TYPE_CHECKING:
    from twisted.logger import LogEvent


def _v4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 4433)


def _v6(host: str) -> IPv6Address:
    return IPv6Address("TCP", host, 4433)


class PeerKeyTests(SynchronousTestCase):
    """:func:`peer_key`."""

    def test_ipv4(self) -> None:
        """An IPv4 peer is keyed by its own address; the port does not matter."""
        self.assertEqual(peer_key(_v4("192.0.2.7")), "192.0.2.7")
        self.assertEqual(
            peer_key(IPv4Address("TCP", "192.0.2.7", 1)),
            peer_key(IPv4Address("TCP", "192.0.2.7", 2)),
        )
        self.assertNotEqual(peer_key(_v4("192.0.2.7")), peer_key(_v4("192.0.2.8")))

    def test_ipv6_same_64(self) -> None:
        """Two IPv6 addresses in one /64 share a key, which names that /64."""
        one = peer_key(_v6("2001:db8:1:2::1"))
        two = peer_key(_v6("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        self.assertEqual(one, two)
        self.assertEqual(one, "2001:db8:1:2::/64")

    def test_ipv6_other_64(self) -> None:
        """IPv6 addresses in neighbouring /64s have different keys."""
        self.assertNotEqual(peer_key(_v6("2001:db8:1:2::1")), peer_key(_v6("2001:db8:1:3::1")))

    def test_ipv6_spelling(self) -> None:
        """Different spellings of one IPv6 address give one key."""
        self.assertEqual(
            peer_key(_v6("2001:DB8:0001:0002:0:0:0:1")), peer_key(_v6("2001:db8:1:2::1"))
        )

    def test_scoped_link_local(self) -> None:
        """A scoped link-local address is keyed by its /64 without the zone."""
        self.assertEqual(peer_key(_v6("fe80::1%eth0")), "fe80::/64")
        self.assertEqual(peer_key(_v6("fe80::1%eth0")), peer_key(_v6("fe80::2%eth1")))

    def test_v4_mapped(self) -> None:
        """A v4-mapped IPv6 peer is keyed as the IPv4 address it maps, like a native one."""
        self.assertEqual(peer_key(_v6("::ffff:192.0.2.7")), "192.0.2.7")
        self.assertEqual(peer_key(_v6("::ffff:192.0.2.7")), peer_key(_v4("192.0.2.7")))
        self.assertNotEqual(peer_key(_v6("::ffff:192.0.2.7")), peer_key(_v6("::ffff:192.0.2.8")))

    def test_unparseable_ipv6(self) -> None:
        """An IPv6 host that does not parse is keyed by the host string itself."""
        self.assertEqual(peer_key(_v6("not-an-address")), "not-an-address")

    def test_unix(self) -> None:
        """All UNIX-socket peers, named or not, share the key ``unix``."""
        self.assertEqual(peer_key(UNIXAddress(None)), "unix")
        self.assertEqual(peer_key(UNIXAddress(b"/run/secure-echo.sock")), "unix")


class ConnectionLimiterTests(SynchronousTestCase):
    """:class:`ConnectionLimiter`."""

    def test_total_limit(self) -> None:
        """Past ``max_total`` open connections, any peer is refused with ``limit_total``."""
        limiter = ConnectionLimiter(max_total=2, max_per_ip=0)
        self.assertIsNone(limiter.acquire("a"))
        self.assertIsNone(limiter.acquire("b"))
        self.assertEqual(limiter.acquire("c"), LIMIT_TOTAL)
        self.assertEqual(limiter.total, 2)
        self.assertEqual(limiter.count("c"), 0)

    def test_per_ip_limit(self) -> None:
        """Past ``max_per_ip`` connections from one key it is refused with ``limit_per_ip``."""
        limiter = ConnectionLimiter(max_total=10, max_per_ip=2)
        self.assertIsNone(limiter.acquire("a"))
        self.assertIsNone(limiter.acquire("a"))
        self.assertEqual(limiter.acquire("a"), LIMIT_PER_IP)
        self.assertIsNone(limiter.acquire("b"))
        self.assertEqual(limiter.count("a"), 2)
        self.assertEqual(limiter.total, 3)

    def test_total_before_per_ip(self) -> None:
        """When both limits are reached, the refusal names the total limit."""
        limiter = ConnectionLimiter(max_total=1, max_per_ip=1)
        self.assertIsNone(limiter.acquire("a"))
        self.assertEqual(limiter.acquire("a"), LIMIT_TOTAL)

    def test_refusal_not_counted(self) -> None:
        """A refused connection is not counted, so no release is owed for it."""
        limiter = ConnectionLimiter(max_total=0, max_per_ip=1)
        limiter.acquire("a")
        for _ in range(5):
            self.assertEqual(limiter.acquire("a"), LIMIT_PER_IP)
        self.assertEqual(limiter.count("a"), 1)
        self.assertEqual(limiter.total, 1)

    def test_release_frees_slot(self) -> None:
        """Releasing a connection lets the next one in, for both limits."""
        limiter = ConnectionLimiter(max_total=1, max_per_ip=1)
        limiter.acquire("a")
        self.assertEqual(limiter.acquire("b"), LIMIT_TOTAL)
        limiter.release("a")
        self.assertEqual(limiter.total, 0)
        self.assertIsNone(limiter.acquire("b"))
        self.assertEqual(limiter.count("b"), 1)

        per_ip = ConnectionLimiter(max_total=0, max_per_ip=1)
        per_ip.acquire("a")
        self.assertEqual(per_ip.acquire("a"), LIMIT_PER_IP)
        per_ip.release("a")
        self.assertIsNone(per_ip.acquire("a"))

    def test_count(self) -> None:
        """``count`` gives the open connections per key, 0 for keys never or no longer seen."""
        limiter = ConnectionLimiter(max_total=0, max_per_ip=0)
        self.assertEqual(limiter.count("a"), 0)
        limiter.acquire("a")
        limiter.acquire("a")
        limiter.acquire("b")
        self.assertEqual(limiter.count("a"), 2)
        self.assertEqual(limiter.count("b"), 1)
        limiter.release("a")
        self.assertEqual(limiter.count("a"), 1)
        limiter.release("a")
        self.assertEqual(limiter.count("a"), 0)
        self.assertEqual(limiter.total, 1)

    def test_released_keys_forgotten(self) -> None:
        """A key whose last connection is released is not kept (many peers cannot leak)."""
        limiter = ConnectionLimiter(max_total=0, max_per_ip=0)
        for n in range(100):
            limiter.acquire(str(n))
            limiter.release(str(n))
        self.assertEqual(limiter._per_key, {})
        self.assertEqual(limiter.total, 0)

    def test_unlimited(self) -> None:
        """With both limits 0, any number of connections from one key is accepted."""
        limiter = ConnectionLimiter(max_total=0, max_per_ip=0)
        for _ in range(1000):
            self.assertIsNone(limiter.acquire("a"))
        self.assertEqual(limiter.count("a"), 1000)
        self.assertEqual(limiter.total, 1000)

    def test_unlimited_total_only(self) -> None:
        """A per-IP limit alone caps each key but not the total."""
        limiter = ConnectionLimiter(max_total=0, max_per_ip=1)
        for n in range(100):
            self.assertIsNone(limiter.acquire(str(n)))
        self.assertEqual(limiter.total, 100)

    def test_reason_tokens(self) -> None:
        """The reason tokens are the documented strings."""
        self.assertEqual(
            (LIMIT_TOTAL, LIMIT_PER_IP, DRAINING), ("limit_total", "limit_per_ip", "draining")
        )


class RekeyTests(SynchronousTestCase):
    """:meth:`ConnectionLimiter.rekey`: a balancer's socket moves to its client."""

    def test_moves_the_count(self) -> None:
        """The connection leaves the old key and joins the new; the total stays."""
        limiter = ConnectionLimiter(0, 2)
        self.assertIsNone(limiter.acquire("balancer", per_ip=False))
        self.assertIsNone(limiter.rekey("balancer", "client"))
        self.assertEqual((limiter.count("balancer"), limiter.count("client")), (0, 1))
        self.assertEqual(limiter.total, 1)

    def test_same_key_changes_nothing(self) -> None:
        """Rekeying to the same key is no move (and no refusal, even at the limit)."""
        limiter = ConnectionLimiter(0, 1)
        limiter.acquire("a")
        self.assertIsNone(limiter.rekey("a", "a"))
        self.assertEqual((limiter.count("a"), limiter.total), (1, 1))

    def test_refused_at_the_clients_limit(self) -> None:
        """A client already at its per-IP limit is refused; the socket stays counted as before."""
        limiter = ConnectionLimiter(0, 1)
        limiter.acquire("client")
        limiter.acquire("balancer", per_ip=False)
        self.assertEqual(limiter.rekey("balancer", "client"), LIMIT_PER_IP)
        self.assertEqual((limiter.count("balancer"), limiter.count("client")), (1, 1))
        self.assertEqual(limiter.total, 2)

    def test_without_per_ip_limit(self) -> None:
        """With no per-IP limit any move is allowed."""
        limiter = ConnectionLimiter(0, 0)
        for _ in range(3):
            limiter.acquire("client")
        limiter.acquire("balancer")
        self.assertIsNone(limiter.rekey("balancer", "client"))
        self.assertEqual(limiter.count("client"), 4)
        # Every socket is still counted once toward --max-connections.
        self.assertEqual(limiter.total, 4)

    def test_not_per_ip_counts_but_never_refuses(self) -> None:
        """acquire(per_ip=False) counts under the key even past its limit."""
        limiter = ConnectionLimiter(0, 1)
        for _ in range(3):
            self.assertIsNone(limiter.acquire("balancer", per_ip=False))
        self.assertEqual(limiter.count("balancer"), 3)
        self.assertEqual(limiter.acquire("balancer"), LIMIT_PER_IP)


class RefusalLogTests(SynchronousTestCase):
    """:class:`RefusalLog`: one event at once per reason, then one summary per window."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.refusals = RefusalLog(self.clock, window=10.0, top=2)
        self.addCleanup(self.refusals.stop)
        self.observer = EventLoggingObserver()
        globalLogPublisher.addObserver(self.observer)
        self.addCleanup(globalLogPublisher.removeObserver, self.observer)

    def _events(self, name: str) -> list[LogEvent]:
        return [event for event in self.observer if event.get("event") == name]

    def _refuse(self, reason: str, peer: str = "192.0.2.1", times: int = 1) -> None:
        for _ in range(times):
            self.refusals.refused_connection(reason, f"{peer}:4433", peer)

    def _summary(self) -> dict[str, Any]:
        summaries = self._events("connections_refused")
        self.assertEqual(len(summaries), 1)
        return summaries[0]

    def test_defaults(self) -> None:
        """By default a window is 10 s and the summary names the 5 busiest peers."""
        refusals = RefusalLog(self.clock)
        self.addCleanup(refusals.stop)
        for number in range(8):
            for _ in range(number + 2):
                refusals.refused_connection(LIMIT_TOTAL, "p:1", f"198.51.100.{number}")
        self.clock.advance(9.99)
        self.assertEqual(self._events("connections_refused"), [])
        self.clock.advance(0.01)
        summary = self._summary()
        self.assertEqual(len(summary["top_peers"]), 5)
        self.assertEqual(summary["window"], 10.0)

    def test_messages(self) -> None:
        """The text log's words for a refusal and a summary."""
        self._refuse(LIMIT_TOTAL, times=3)
        self.clock.advance(10)
        [first] = self._events("connection_refused")
        self.assertEqual(formatEvent(first), "refused connection from 192.0.2.1:4433: limit_total")
        self.assertEqual(
            formatEvent(self._summary()),
            "refused 2 more connections in 10 s: {'limit_total': 2}",
        )

    def test_first_refusal_logged_at_once(self) -> None:
        """The first refusal logs ``connection_refused`` with its reason and peer, unprompted."""
        self.refusals.refused_connection(LIMIT_TOTAL, "192.0.2.1:5000", "192.0.2.1")
        [event] = self._events("connection_refused")
        self.assertEqual(event["reason"], LIMIT_TOTAL)
        self.assertEqual(event["close_reason"], LIMIT_TOTAL)
        self.assertEqual(event["peer"], "192.0.2.1:5000")
        self.assertEqual(event["peer_key"], "192.0.2.1")
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(self._events("connections_refused"), [])

    def test_repeats_not_logged_at_once(self) -> None:
        """Further refusals of the same reason within the window log nothing at once."""
        self._refuse(LIMIT_TOTAL, times=50)
        self.assertEqual(len(self._events("connection_refused")), 1)
        self.assertEqual(self._events("connections_refused"), [])
        self.assertEqual(self.refusals.refused[LIMIT_TOTAL], 50)

    def test_first_of_each_reason(self) -> None:
        """The first refusal of each reason is logged at once, even in one window."""
        self._refuse(LIMIT_TOTAL, times=3)
        self._refuse(LIMIT_PER_IP, times=3)
        self._refuse(DRAINING)
        reasons = [event["reason"] for event in self._events("connection_refused")]
        self.assertEqual(reasons, [LIMIT_TOTAL, LIMIT_PER_IP, DRAINING])

    def test_summary_after_window(self) -> None:
        """At the window's end one ``connections_refused`` counts the unlogged refusals."""
        self._refuse(LIMIT_TOTAL, times=4)
        self._refuse(LIMIT_PER_IP, times=3)
        self.clock.advance(9.9)
        self.assertEqual(self._events("connections_refused"), [])
        self.clock.advance(0.1)
        summary = self._summary()
        self.assertEqual(summary["counts"], {LIMIT_TOTAL: 3, LIMIT_PER_IP: 2})
        self.assertEqual(summary["total"], 5)
        self.assertEqual(summary["window"], 10.0)
        self.assertEqual(summary["log_level"].name, "warn")

    def test_top_peers(self) -> None:
        """The summary names the busiest peers by key, at most ``top`` of them."""
        self._refuse(LIMIT_PER_IP, peer="198.51.100.1")
        self._refuse(LIMIT_PER_IP, peer="198.51.100.1", times=5)
        self._refuse(LIMIT_PER_IP, peer="198.51.100.2", times=3)
        self._refuse(LIMIT_PER_IP, peer="198.51.100.3", times=1)
        self.clock.advance(10)
        self.assertEqual(self._summary()["top_peers"], {"198.51.100.1": 5, "198.51.100.2": 3})

    def test_no_summary_without_suppressed(self) -> None:
        """A window whose only refusal was already logged ends without a summary."""
        self._refuse(LIMIT_TOTAL)
        self.clock.advance(10)
        self.assertEqual(self._events("connections_refused"), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_quiet_window_resets(self) -> None:
        """After a window with no further refusals, the next refusal logs at once again."""
        self._refuse(LIMIT_TOTAL)
        self.clock.advance(10)
        self.clock.advance(5)
        self._refuse(LIMIT_TOTAL)
        self.assertEqual(len(self._events("connection_refused")), 2)

    def test_summaries_continue(self) -> None:
        """While refusals continue, each window ends in a summary and none logs at once."""
        self._refuse(LIMIT_TOTAL, times=2)
        for window in range(1, 4):
            self.clock.advance(5)
            self._refuse(LIMIT_TOTAL, peer=f"192.0.2.{window + 10}", times=window)
            self.clock.advance(5)
        self.assertEqual(len(self._events("connection_refused")), 1)
        summaries = self._events("connections_refused")
        self.assertEqual(
            [summary["counts"] for summary in summaries],
            [{LIMIT_TOTAL: 2}, {LIMIT_TOTAL: 2}, {LIMIT_TOTAL: 3}],
        )
        # Each window's peers are its own.
        self.assertEqual(summaries[1]["top_peers"], {"192.0.2.12": 2})
        self.assertEqual(summaries[2]["top_peers"], {"192.0.2.13": 3})

    def test_quiet_after_summaries(self) -> None:
        """After summaries, one quiet window ends them and the next refusal logs at once."""
        self._refuse(LIMIT_TOTAL, times=3)
        self.clock.advance(10)
        self.assertEqual(len(self._events("connections_refused")), 1)
        self.clock.advance(10)
        self.assertEqual(len(self._events("connections_refused")), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self._refuse(LIMIT_TOTAL)
        self.assertEqual(len(self._events("connection_refused")), 2)
        self.clock.advance(100)
        self.assertEqual(len(self._events("connections_refused")), 1)

    def test_one_timer(self) -> None:
        """However many refusals arrive, at most one summary timer is pending."""
        self._refuse(LIMIT_TOTAL, times=10)
        self._refuse(LIMIT_PER_IP, times=10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_stop(self) -> None:
        """``stop`` cancels the pending summary: nothing more is logged, no call is left."""
        self._refuse(LIMIT_TOTAL, times=5)
        self.refusals.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(self._events("connections_refused"), [])

    def test_stop_idle(self) -> None:
        """``stop`` without a pending summary, or twice, does nothing."""
        self.refusals.stop()
        self._refuse(LIMIT_TOTAL)
        self.refusals.stop()
        self.refusals.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refused_totals(self) -> None:
        """``refused`` counts every refusal per reason, logged at once or not, across windows."""
        self._refuse(LIMIT_TOTAL, times=3)
        self.clock.advance(30)
        self._refuse(LIMIT_TOTAL, times=2)
        self._refuse(DRAINING)
        self.assertEqual(self.refusals.refused, {LIMIT_TOTAL: 5, DRAINING: 1})


class FdLimitTests(SynchronousTestCase):
    """:func:`raise_fd_limit` and :func:`default_max_connections`."""

    def test_raise_fd_limit(self) -> None:
        """The soft limit is raised to a finite hard limit, and the result is what is in force."""
        original = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, original)
        soft, hard = limits.raise_fd_limit()
        self.assertEqual((soft, hard), resource.getrlimit(resource.RLIMIT_NOFILE))
        self.assertEqual(hard, original[1])
        if hard == resource.RLIM_INFINITY:
            self.assertTrue(soft == resource.RLIM_INFINITY or soft >= original[0])
        else:
            self.assertLessEqual(soft, hard)
            self.assertEqual(soft, hard)
        # Raising again changes nothing.
        self.assertEqual(limits.raise_fd_limit(), (soft, hard))

    def _fake_rlimits(self, soft: int, hard: int, *, fail: bool = False) -> list[tuple[int, int]]:
        """Replace get/setrlimit for :mod:`secure_echo.edge.limits`; return the calls to set."""
        calls: list[tuple[int, int]] = []

        def getrlimit(which: int) -> tuple[int, int]:
            self.assertEqual(which, resource.RLIMIT_NOFILE)
            return soft, hard

        def setrlimit(which: int, value: tuple[int, int]) -> None:
            self.assertEqual(which, resource.RLIMIT_NOFILE)
            calls.append(value)
            if fail:
                raise ValueError("not allowed")

        self.patch(resource, "getrlimit", getrlimit)
        self.patch(resource, "setrlimit", setrlimit)
        return calls

    def test_raise_to_hard(self) -> None:
        """A soft limit below a finite hard limit is set to the hard limit."""
        calls = self._fake_rlimits(1024, 4096)
        self.assertEqual(limits.raise_fd_limit(), (4096, 4096))
        self.assertEqual(calls, [(4096, 4096)])

    def test_already_raised(self) -> None:
        """A soft limit already at the hard limit is left alone."""
        calls = self._fake_rlimits(4096, 4096)
        self.assertEqual(limits.raise_fd_limit(), (4096, 4096))
        self.assertEqual(calls, [])

    def test_infinite_hard(self) -> None:
        """With no hard limit the soft limit is raised to 2**20, never lowered."""
        infinity = resource.RLIM_INFINITY
        calls = self._fake_rlimits(1024, infinity)
        self.assertEqual(limits.raise_fd_limit(), (1 << 20, infinity))
        self.assertEqual(calls, [(1 << 20, infinity)])

    def test_infinite_both(self) -> None:
        """With no limits at all nothing is changed."""
        infinity = resource.RLIM_INFINITY
        calls = self._fake_rlimits(infinity, infinity)
        self.assertEqual(limits.raise_fd_limit(), (infinity, infinity))
        self.assertEqual(calls, [])

    def test_raise_refused(self) -> None:
        """If the system refuses the raise, the limits in force are returned unchanged."""
        calls = self._fake_rlimits(1024, 4096, fail=True)
        self.assertEqual(limits.raise_fd_limit(), (1024, 4096))
        self.assertEqual(calls, [(4096, 4096)])

    def test_default_max_connections(self) -> None:
        """The default connection limit is the soft fd limit less the reserve."""
        self.assertEqual(FD_RESERVE, 64)
        self.assertEqual(default_max_connections(1024), 1024 - FD_RESERVE)
        self.assertEqual(default_max_connections(FD_RESERVE + 1), 1)

    def test_default_max_connections_floor(self) -> None:
        """A soft limit at or below the reserve still allows one connection."""
        for soft in [FD_RESERVE, FD_RESERVE - 1, 1, 0]:
            self.assertEqual(default_max_connections(soft), 1, soft)

    def test_default_max_connections_unlimited(self) -> None:
        """An unlimited fd limit gives a large finite default."""
        self.assertEqual(default_max_connections(resource.RLIM_INFINITY), 1 << 20)
