"""Line framing: bytes in, line events out.  No I/O, no Twisted.

The wire grammar (see docs/protocol.md)::

    stream   = *line [final]
    line     = *OCTET-but-LF LF          ; a CR before the LF is part of the terminator
    final    = 1*OCTET-but-LF            ; only at end of stream

Contract of :class:`LineFramer`:

* ``feed(data)`` returns, in order, every event that ``data`` completes.  A line is
  returned *with* its terminator (``b"\\n"`` or ``b"\\r\\n"``) so that an echo is the
  line itself, byte for byte.
* A line whose content (the bytes before its terminator) is longer than
  ``max_line_length`` is not returned; :data:`OVERLONG` stands in its place, emitted
  by the ``feed`` whose bytes prove the line too long: its content so far, not
  counting a last CR (which may be half of a CRLF), passes the limit.  The rest of
  the line, up to and including its LF, is then dropped unseen and yields nothing;
  so a line that never ends still got its event, in its place in the order.
* ``end()`` returns the final unterminated line, if any (or :data:`OVERLONG`, when
  it is over the limit and was not reported yet).
* The events do not depend on how the stream was cut, only when they come out.
* Cost is linear in the bytes fed, however the stream is split: every byte is
  searched for LF once.  Memory is bounded: the framer holds at most
  ``max_line_length + 1`` bytes of an unterminated line (the ``+ 1`` is a possible CR
  of a CRLF terminator), plus nothing for a line it is discarding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterator

LF: Final = b"\n"
CRLF: Final = b"\r\n"
#: A held piece's last byte, when it may be the first half of a CRLF.
_CR: Final = 13


#: Lines at least this long (judged by the first) are counted by searching for each
#: LF (``memchr``, fast per byte, ~0.1 us per call) rather than by ``bytes.count``
#: (one pass at ~0.26 ns per byte): the two cost the same near 400-byte lines.
_FIND_FROM: Final = 384
#: At most this many searches; the rest of a read is counted in one pass, so that
#: long first line followed by many short ones costs no more than a count.
_MAX_FINDS: Final = 64


def count_lines(data: bytes, end: int) -> int:
    """How many LFs ``data[:end]`` holds; ``data[end - 1]`` must be one.

    The same number as ``data.count(LF, 0, end)``, found faster when lines are
    long: ``bytes.count`` looks at every byte in a plain loop, ``bytes.find`` jumps
    from LF to LF with ``memchr``.  The cost stays within one ``count`` plus
    :data:`_MAX_FINDS` searches whatever the bytes.
    """
    # Searches need no bound: an LF ends data[:end], so each finds one before it.
    position = data.find(LF) + 1
    if position < _FIND_FROM:
        return data.count(LF, 0, end)
    count = 1
    find = data.find
    for _ in range(_MAX_FINDS):
        if position >= end:
            return count
        position = find(LF, position) + 1
        count += 1
    return count + data.count(LF, position, end)


class Overlong:
    """The type of :data:`OVERLONG`: a line longer than the limit, dropped unseen."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OVERLONG"


#: Stands in for a line longer than the limit (one object; compare with ``is``).
OVERLONG: Final = Overlong()

#: What :meth:`LineFramer.feed` yields: a whole line (terminator included) or
#: :data:`OVERLONG` in its place.
Event = bytes | Overlong


def terminator_of(line: bytes) -> bytes:
    """Return the terminator a framed line ends with: ``CRLF``, ``LF`` or ``b""``."""
    if line.endswith(LF):
        return CRLF if line.endswith(CRLF) else LF
    return b""


class LineFramer:
    """Split a byte stream into lines; see the module docstring for the contract."""

    __slots__ = ("_discarding", "_limit", "_pending", "_size")

    def __init__(self, max_line_length: int) -> None:
        if max_line_length < 1:
            msg = f"max_line_length must be at least 1, not {max_line_length}"
            raise ValueError(msg)
        self._limit = max_line_length
        # Pieces of the current unterminated line; none of them contains LF.
        self._pending: list[bytes] = []
        self._size = 0
        # True from the OVERLONG of a line until its LF: its bytes are dropped.
        self._discarding = False

    @property
    def holding(self) -> bool:
        """True while part of a line is held or an overlong line is being discarded."""
        return self._size > 0 or self._discarding

    @property
    def buffered(self) -> int:
        """Bytes of an unterminated line currently held (never above limit + 1)."""
        return self._size

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data``; return the events it completes, in order."""
        return list(self.events(data))

    def events(self, data: bytes) -> Iterator[Event]:
        """Consume ``data`` as the events are taken; yield them in order.

        The lazy form of :meth:`feed`: a consumer may stop part-way and hold the
        iterator (which holds ``data``) to go on later, instead of a list of every
        line of the read.  Finish it before the next ``events``, ``feed`` or ``end``.
        """
        if not data:
            # Holding b"" would hide a held CR that may begin a CRLF.
            return
        nl = data.find(LF)
        start = 0
        if self._discarding:
            if nl < 0:
                return
            self._discarding = False
            start = nl + 1
            nl = data.find(LF, start)
        elif self._size:
            if nl < 0:
                if self._hold(data):
                    yield OVERLONG
                return
            start = nl + 1
            yield self._complete_held(data[:start])
            nl = data.find(LF, start)
        limit = self._limit
        # Lines wholly inside this chunk: one find and one slice each.  The content
        # is the bytes before the LF, less a CR just before it (an empty line's
        # "CR" is the previous line's last byte: its content, -1, is within limit).
        while nl >= 0:
            end = nl + 1
            if nl - start - (data[nl - 1] == _CR) > limit:
                yield OVERLONG
            else:
                yield data[start:end]
            start = end
            nl = data.find(LF, start)
        if start < len(data) and self._hold(data[start:]):
            yield OVERLONG

    def end(self) -> list[Event]:
        """Signal end of stream; return the final unterminated line's event, if any."""
        line = b"".join(self._pending)
        self._pending = []
        self._size = 0
        self._discarding = False
        if not line:
            return []
        # Up to limit + 1 bytes are held in case the last is a CR; with no
        # terminator coming, all of them are content.
        return [OVERLONG if len(line) > self._limit else line]

    def _hold(self, piece: bytes) -> bool:
        """Keep a piece of an unterminated line; True if the line is now overlong.

        ``piece`` has no LF and is not empty.  The line is known to be too long
        once its bytes, less a last CR that may begin its CRLF, pass the limit;
        the rest of it is then dropped.
        """
        size = self._size + len(piece)
        if size - (piece[-1] == _CR) > self._limit:
            self._discarding = True
            self._pending = []
            self._size = 0
            return True
        self._pending.append(piece)
        self._size = size
        return False

    def _complete_held(self, tail: bytes) -> Event:
        """Finish the held line with ``tail`` (which ends with its LF)."""
        self._pending.append(tail)
        line = b"".join(self._pending)
        self._pending = []
        self._size = 0
        if len(line) - len(terminator_of(line)) > self._limit:
            return OVERLONG
        return line
