"""The textbook Twisted TLS line echo: the baseline every ratio is measured against.

``LineReceiver`` (delimiter ``b"\\n"``) answering each line with ``sendLine``, served
through the ``ssl:`` endpoint string, exactly as the Twisted documentation shows it.
The endpoint string cannot set a minimum TLS version; the load generator offers
TLS 1.3 only, so TLS 1.3 is what gets negotiated.

Usage: ``python textbook_twisted.py CERT KEY [--lifetime SECONDS]``.  Prints the bound
port on a line of its own, then serves on 127.0.0.1 until SIGTERM or the lifetime
(default 1800 s) is over, so a forgotten server stops by itself.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from twisted.internet import endpoints, reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort


class Echo(LineReceiver):
    """Echo every line."""

    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        """Send the line straight back."""
        self.sendLine(line)  # type: ignore[no-untyped-call]


def main(argv: list[str]) -> int:
    """Listen, print the port, serve until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cert")
    parser.add_argument("key")
    parser.add_argument("--lifetime", type=float, default=1800.0)
    args = parser.parse_args(argv)
    key = endpoints.quoteStringArgument(args.key)
    cert = endpoints.quoteStringArgument(args.cert)
    description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    endpoint = endpoints.serverFromString(reactor, description)

    def listening(port: IListeningPort) -> None:
        print(port.getHost().port, flush=True)  # type: ignore[attr-defined]

    def failed(failure: object) -> None:
        print(f"textbook_twisted: cannot listen: {failure}", file=sys.stderr, flush=True)
        reactor.stop()

    endpoint.listen(Factory.forProtocol(Echo)).addCallbacks(listening, failed)
    reactor.callLater(args.lifetime, reactor.stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
