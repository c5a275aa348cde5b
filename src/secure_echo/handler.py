"""The line-handler interface and the echo handler.

A handler is where a line's business logic lives; the protocol owns everything
else (framing, ordering, limits, timeouts, writing).  Tests and future features
swap in their own handler.

Contract of :meth:`ILineHandler.handle_line`:

* It receives one whole line, terminator included (``b"...\\n"``, ``b"...\\r\\n"``, or
  no terminator for a final line at end of stream).
* It returns the reply bytes, written exactly as returned, or a ``Deferred`` that
  fires with them.  The reply should end with the line's terminator if the client
  is to see it as a line.
* It may raise or fail its ``Deferred``: the client then gets ``-ERR
  handler-failed`` in that line's place and the failure is logged.  It may take
  long: after the protocol's handler timeout the ``Deferred`` is cancelled and the
  client gets ``-ERR handler-timeout``.
* Replies are written in line order whatever order handlers finish in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Interface, implementer

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class ILineHandler(Interface):
    """Turns a received line into its reply."""

    def handle_line(line: bytes) -> bytes | Deferred[bytes]:  # noqa: N805
        """Return the reply to ``line`` (terminator included), or a Deferred of it."""


@implementer(ILineHandler)
class EchoHandler:
    """Reply with the line itself, byte for byte, terminator included."""

    def handle_line(self, line: bytes) -> bytes:
        """Return ``line`` unchanged."""
        return line
