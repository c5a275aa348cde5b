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


class IBatchLineHandler(ILineHandler):
    """A handler that can also answer a run of whole lines in one call.

    ``handle_batch(lines, count)`` receives ``count`` complete lines (each ending
    with LF, none longer than the line limit) as one bytes object and returns,
    synchronously, the concatenation of the replies ``handle_line`` would give
    for each of them, in order.  The protocol uses it only when no earlier reply
    is pending, so ordering is unchanged; a handler whose replies depend on
    anything but each line must not provide it.
    """

    def handle_batch(lines: bytes, count: int) -> bytes:  # noqa: N805
        """Return the replies to ``count`` whole lines, concatenated."""


@implementer(IBatchLineHandler)
class EchoHandler:
    """Reply with the line itself, byte for byte, terminator included."""

    def handle_line(self, line: bytes) -> bytes:
        """Return ``line`` unchanged."""
        return line

    def handle_batch(self, lines: bytes, count: int) -> bytes:  # noqa: ARG002
        """Return ``lines`` unchanged: the echo of each line, in order."""
        return lines
