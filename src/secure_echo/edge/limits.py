"""Connection limits, the refusal log that a flood cannot flood, and fd limits.

* :func:`peer_key` groups clients: an IPv4 address counts alone, an IPv6 address
  by its /64 (one subscriber usually holds a whole /64), UNIX clients together.
* :class:`ConnectionLimiter` counts open connections in total and per key.
* :class:`RefusalLog` logs refusals without letting them flood the log
  (:mod:`secure_echo.edge.digest`): the first refusal of each reason in a window
  is logged at once (``connection_refused``); the rest are counted and summed up
  once at the end of the window (``connections_refused``, with counts per reason
  and the busiest peers).
* :func:`raise_fd_limit` raises the soft file-descriptor limit to the hard one, so
  the connection limit can default to what the process may really hold.
"""

from __future__ import annotations

import ipaddress
import resource
from collections import Counter
from typing import TYPE_CHECKING, Final

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger

from secure_echo.edge.digest import Digest

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IReactorTime

#: Reason tokens for refused connections (the ``reason`` field).
LIMIT_TOTAL: Final = "limit_total"
LIMIT_PER_IP: Final = "limit_per_ip"
DRAINING: Final = "draining"

#: File descriptors kept back from the connection limit: listening sockets, log
#: files, certificate reads, the reactor's own.
FD_RESERVE: Final = 64


def peer_key(address: IAddress) -> str:
    """The key a peer is counted under for per-IP limits."""
    if isinstance(address, IPv6Address):
        try:
            # A zone (fe80::1%eth0) is kept by the parser and dropped by the /64.
            ip = ipaddress.ip_address(address.host)
        except ValueError:
            return address.host
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)  # pragma: no cover - an IPv6Address always holds a v6 host
    if isinstance(address, IPv4Address):
        return address.host
    return "unix"


class ConnectionLimiter:
    """Counts connections; says whether one more may be accepted.

    ``max_total`` and ``max_per_ip`` of 0 mean no limit.
    """

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_key: Counter[str] = Counter()

    def acquire(self, key: str, *, per_ip: bool = True) -> str | None:
        """Count a new connection under ``key``, or return why it is refused.

        ``per_ip=False`` counts it under ``key`` without refusing it for that key
        (a trusted balancer's socket before its PROXY header names the client).
        """
        if self.max_total and self.total >= self.max_total:
            return LIMIT_TOTAL
        if per_ip and self.max_per_ip and self._per_key[key] >= self.max_per_ip:
            return LIMIT_PER_IP
        self.total += 1
        self._per_key[key] += 1
        return None

    def rekey(self, old: str, new: str) -> str | None:
        """Move one connection from ``old`` to ``new``, or say why ``new`` is refused.

        On a refusal nothing moves: the connection is still counted under ``old``.
        """
        if new == old:
            return None
        if self.max_per_ip and self._per_key[new] >= self.max_per_ip:
            return LIMIT_PER_IP
        self._per_key[new] += 1
        self.release(old)
        self.total += 1
        return None

    def release(self, key: str) -> None:
        """Forget one connection counted under ``key``."""
        self.total -= 1
        count = self._per_key[key] - 1
        if count > 0:
            self._per_key[key] = count
        else:
            del self._per_key[key]

    def count(self, key: str) -> int:
        """Open connections under ``key``."""
        return self._per_key.get(key, 0)


class RefusalLog:
    """Refused connections, logged through a :class:`~secure_echo.edge.digest.Digest`.

    The first refusal of each reason in a window is ``connection_refused``; the
    rest are summed up in ``connections_refused`` at the window's end.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, window: float = 10.0, top: int = 5) -> None:
        self._digest = Digest(clock, self._summary, window, top)
        #: Every refusal, by reason, since the start.
        self.refused = self._digest.total

    def refused_connection(self, reason: str, peer: str, key: str) -> None:
        """Record one refusal; log it now or in the window's summary."""
        if self._digest.first(reason, key):
            self.log.warn(
                "refused connection from {peer}: {reason}",
                event="connection_refused",
                reason=reason,
                close_reason=reason,
                peer=peer,
                peer_key=key,
            )

    def _summary(self, counts: dict[str, int], top_peers: dict[str, int], window: float) -> None:
        self.log.warn(
            "refused {total} more connections in {window:g} s: {counts}",
            event="connections_refused",
            total=sum(counts.values()),
            window=window,
            counts=counts,
            top_peers=top_peers,
        )

    def stop(self) -> None:
        """Cancel the pending summary (at shutdown)."""
        self._digest.stop()


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        target = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    else:
        target = hard
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, hard
        soft = target
    return soft, hard


def default_max_connections(soft_fd_limit: int) -> int:
    """The connection limit the fd limit allows, keeping a reserve."""
    if soft_fd_limit == resource.RLIM_INFINITY:
        return 1 << 20
    return max(soft_fd_limit - FD_RESERVE, 1)
