"""Line framing: bytes in, line events out.  No I/O, no Twisted.

The wire grammar (see docs/protocol.md)::

    stream   = *line [final]
    line     = *OCTET-but-LF LF          ; a CR before the LF is part of the terminator
    final    = 1*OCTET-but-LF            ; only at end of stream

Contract of :class:`LineFramer`:

* ``feed(data)`` returns, in order, every line completed by ``data``.  A line is
  returned *with* its terminator (``b"\\n"`` or ``b"\\r\\n"``) so that an echo is the
  line itself, byte for byte.
* A line whose content (the bytes before its terminator) is longer than
  ``max_line_length`` is not returned; an :class:`Overlong` event stands in its place,
  emitted when its terminator arrives (or at end of stream), so replies keep their
  order.
* ``end()`` returns the final unterminated line, if any (or its :class:`Overlong`).
* Cost is linear in the bytes fed, however the stream is split: every byte is
  searched for LF once.  Memory is bounded: the framer holds at most
  ``max_line_length + 1`` bytes of an unterminated line (the ``+ 1`` is a possible CR
  of a CRLF terminator), plus nothing for a line it is discarding.
"""

from __future__ import annotations

from typing import Final

LF: Final = b"\n"
CRLF: Final = b"\r\n"


class Overlong:
    """Stands in for a line longer than the limit; its bytes were discarded.

    ``terminator`` is the discarded line's terminator (``b"\\n"``, ``b"\\r\\n"``, or
    ``b""`` when the stream ended inside it) and ``length`` its content length.
    """

    __slots__ = ("length", "terminator")

    def __init__(self, length: int, terminator: bytes) -> None:
        self.length = length
        self.terminator = terminator

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Overlong):
            return NotImplemented
        return (self.length, self.terminator) == (other.length, other.terminator)

    def __hash__(self) -> int:
        return hash((self.length, self.terminator))

    def __repr__(self) -> str:
        return f"Overlong(length={self.length}, terminator={self.terminator!r})"


#: What :meth:`LineFramer.feed` yields: a whole line (terminator included) or an
#: :class:`Overlong` in its place.
Event = bytes | Overlong


def terminator_of(line: bytes) -> bytes:
    """Return the terminator a framed line ends with: ``CRLF``, ``LF`` or ``b""``."""
    if line.endswith(LF):
        return CRLF if line.endswith(CRLF) else LF
    return b""


class LineFramer:
    """Split a byte stream into lines; see the module docstring for the contract."""

    __slots__ = ("_discard_last", "_discarded", "_discarding", "_limit", "_pending", "_size")

    def __init__(self, max_line_length: int) -> None:
        if max_line_length < 1:
            msg = f"max_line_length must be at least 1, not {max_line_length}"
            raise ValueError(msg)
        self._limit = max_line_length
        # Pieces of the current unterminated line; none of them contains LF.
        self._pending: list[bytes] = []
        self._size = 0
        # While discarding an overlong line: how many bytes went, and the last one
        # (to tell a CRLF terminator from an LF one when the LF finally comes).
        self._discarding = False
        self._discarded = 0
        self._discard_last = b""

    @property
    def holding(self) -> bool:
        """True while part of a line is held or an overlong line is being discarded."""
        return self._size > 0 or self._discarding

    @property
    def buffered(self) -> int:
        """Bytes of an unterminated line currently held (never above limit + 1)."""
        return self._size

    def _content_length(self, line_length: int, line: bytes) -> int:
        """Length of a terminated line without its terminator."""
        if line_length >= 2 and line[-2:-1] == b"\r":  # noqa: PLR2004 - CRLF is 2 bytes
            return line_length - 2
        return line_length - 1

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data``; return the events it completes, in order."""
        events: list[Event] = []
        nl = data.find(LF)
        if nl < 0:
            self._hold(data)
            return events
        start = 0
        if self._pending or self._discarding:
            start = nl + 1
            events.append(self._complete_held(data[:start]))
            nl = data.find(LF, start)
        limit = self._limit
        # Lines wholly inside this chunk: one find and one slice each.
        while nl >= 0:
            end = nl + 1
            line = data[start:end]
            # A content of up to limit bytes plus "\r\n" is at most limit + 2 long.
            if end - start > limit + 1 and self._content_length(end - start, line) > limit:
                events.append(
                    Overlong(self._content_length(end - start, line), terminator_of(line))
                )
            else:
                events.append(line)
            start = end
            nl = data.find(LF, start)
        if start < len(data):
            self._hold(data[start:])
        return events

    def end(self) -> list[Event]:
        """Signal end of stream; return the final unterminated line's event, if any."""
        if self._discarding:
            event: Event = Overlong(self._discarded, b"")
            self._reset()
            return [event]
        if self._pending:
            line = b"".join(self._pending)
            self._reset()
            # Up to limit + 1 bytes are held in case the last is a CR; with no
            # terminator coming, all of them are content.
            if len(line) > self._limit:
                return [Overlong(len(line), b"")]
            return [line]
        return []

    def _reset(self) -> None:
        self._pending = []
        self._size = 0
        self._discarding = False
        self._discarded = 0
        self._discard_last = b""

    def _hold(self, piece: bytes) -> None:
        """Keep (or discard) a piece of an unterminated line; ``piece`` has no LF."""
        if not piece:
            # feed(b""): holding it would make end() report an empty final line,
            # and while discarding it would forget a trailing CR.
            return
        if self._discarding:
            self._discarded += len(piece)
            self._discard_last = piece[-1:]
            return
        size = self._size + len(piece)
        # limit + 1: the last held byte may turn out to be the CR of a CRLF.
        if size > self._limit + 1:
            self._discarding = True
            self._discarded = size
            self._discard_last = piece[-1:]
            self._pending = []
            self._size = 0
            return
        self._pending.append(piece)
        self._size = size

    def _complete_held(self, tail: bytes) -> Event:
        """Finish the held line with ``tail`` (which ends with its LF)."""
        if self._discarding:
            body = tail[:-1]
            crlf = body.endswith(b"\r") or (not body and self._discard_last == b"\r")
            length = self._discarded + len(body) - (1 if crlf else 0)
            self._reset()
            return Overlong(length, CRLF if crlf else LF)
        self._pending.append(tail)
        line = b"".join(self._pending)
        self._pending = []
        self._size = 0
        if len(line) > self._limit + 1 and self._content_length(len(line), line) > self._limit:
            return Overlong(self._content_length(len(line), line), terminator_of(line))
        return line
