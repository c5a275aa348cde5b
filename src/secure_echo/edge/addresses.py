"""How addresses are written in logs, replies and status lines.

Every layer that names a peer (the TLS connection's record, the PROXY reader's
refusals, the listening service's ``listening`` event) writes it the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress


def format_address(address: IAddress) -> str:
    """Render an address for logs: ``host:port``, ``[v6]:port`` or ``unix:path``."""
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        raw = address.name
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return f"unix:{name or '-'}"
    return str(address)
