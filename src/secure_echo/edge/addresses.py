"""How addresses are written in logs, replies and status lines.

Every layer that names a peer (the TLS connection's record, the PROXY reader's
refusals, the listening service's ``listening`` event) writes it the same way.
A peer's address may come from a PROXY header, that is from whoever sent it: a
UNIX path in particular is any bytes, so it is escaped for the log
(:mod:`secure_echo.edge.text`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from secure_echo.edge.text import printable, printable_bytes

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress


def host_port(host: str, port: int, *, ipv6: bool) -> str:
    """``host:port``, or ``[host]:port`` for IPv6; ``host`` must be safe to log already."""
    return f"[{host}]:{port}" if ipv6 else f"{host}:{port}"


def format_address(address: IAddress) -> str:
    """Render an address for logs: ``host:port``, ``[v6]:port`` or ``unix:path``."""
    if isinstance(address, IPv4Address | IPv6Address):
        ipv6 = isinstance(address, IPv6Address)
        return host_port(printable(address.host), address.port, ipv6=ipv6)
    if isinstance(address, UNIXAddress):
        raw = address.name
        name = printable_bytes(raw) if raw else ""
        return f"unix:{name or '-'}"
    return printable(str(address))
