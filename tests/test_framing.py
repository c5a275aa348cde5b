"""Tests for :mod:`secure_echo.line.framing`: lines at every split point, limits, cost."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, SupportsIndex

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.line import framing
from secure_echo.line.framing import CRLF, LF, OVERLONG, LineFramer, count_lines, terminator_of

if TYPE_CHECKING:
    from collections.abc import Iterable

    from typing_extensions import Buffer

    from secure_echo.line.framing import Event

#: Hypothesis budget: enough to find framing bugs, small enough for CI.
PROPERTY = settings(max_examples=300, deadline=None, database=None)


def chunks_of(data: bytes, size: int) -> list[bytes]:
    """Split ``data`` into pieces of ``size`` bytes (the last may be shorter)."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def frame(framer: LineFramer, pieces: Iterable[bytes]) -> list[Event]:
    """Feed every piece, then end the stream; return all events in order."""
    events: list[Event] = []
    for piece in pieces:
        events.extend(framer.feed(piece))
    events.extend(framer.end())
    return events


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Split ``data`` at the given offsets (any order, repeats and ends allowed)."""
    points = [0, *sorted({c for c in cuts if 0 <= c <= len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def reference(data: bytes, limit: int) -> list[Event]:
    """The framer's contract written as plainly as possible: split on LF, classify."""
    *lines, tail = data.split(LF)
    events: list[Event] = []
    for body in lines:
        content = len(body) - body.endswith(b"\r")
        events.append(OVERLONG if content > limit else body + LF)
    if tail:
        events.append(OVERLONG if len(tail) > limit else tail)
    return events


def reported_by(prefix: bytes, limit: int) -> int:
    """How many events the framer must have returned once ``prefix`` was fed.

    One per LF, and one for the unfinished line if its bytes, less a last CR
    (which may begin a CRLF), are already over the limit.
    """
    tail = prefix.rsplit(LF, 1)[-1]
    return prefix.count(LF) + (len(tail) - tail.endswith(b"\r") > limit)


@st.composite
def split_streams(draw: st.DrawFn, max_pieces: int = 40) -> tuple[bytes, list[bytes]]:
    """A byte stream rich in LF/CR, and the same stream cut at arbitrary points."""
    atoms = st.one_of(
        st.sampled_from([b"\n", b"\r\n", b"\r", b"\x00", b"\xff\xfe", b"x"]),
        st.binary(max_size=8),
    )
    data = b"".join(draw(st.lists(atoms, max_size=max_pieces)))
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=12))
    return data, split_at(data, cuts)


class CountingBytes(bytes):
    """Bytes that count how many bytes ``find`` scans (matching from ``start``), and calls."""

    scanned = 0
    finds = 0

    def find(
        self,
        sub: Buffer | SupportsIndex,
        start: SupportsIndex | None = None,
        end: SupportsIndex | None = None,
        /,
    ) -> int:
        """Find as bytes does, adding the bytes looked at to ``CountingBytes.scanned``."""
        begin = 0 if start is None else int(start)
        stop = len(self) if end is None else int(end)
        found = bytes.find(self, sub, begin, stop)
        CountingBytes.scanned += (stop if found < 0 else found + 1) - begin
        self.finds += 1
        return found


class SplitPointTests(SynchronousTestCase):
    """The same stream gives the same lines however it is cut (Twisted's test_basic)."""

    def assert_every_split(
        self, data: bytes, expected: list[Event], max_line_length: int = 100
    ) -> None:
        """Check ``data`` fed in chunks of 1..10 bytes, and at every single cut."""
        for size in range(1, 11):
            framer = LineFramer(max_line_length)
            self.assertEqual(frame(framer, chunks_of(data, size)), expected, f"chunk size {size}")
        for cut in range(len(data) + 1):
            framer = LineFramer(max_line_length)
            self.assertEqual(frame(framer, split_at(data, [cut])), expected, f"cut at {cut}")

    def test_lf_lines(self) -> None:
        """LF-terminated lines come out whole, terminator included, however split."""
        self.assert_every_split(b"hello\nworld\n!\n", [b"hello\n", b"world\n", b"!\n"])

    def test_crlf_lines(self) -> None:
        """CRLF-terminated lines keep their CRLF, even when CR and LF arrive apart."""
        self.assert_every_split(b"hello\r\nworld\r\n", [b"hello\r\n", b"world\r\n"])

    def test_mixed_terminators(self) -> None:
        """LF and CRLF lines can alternate on one connection."""
        data = b"a\r\nb\nc\r\nd\n"
        self.assert_every_split(data, [b"a\r\n", b"b\n", b"c\r\n", b"d\n"])

    def test_lone_cr_is_content(self) -> None:
        """A CR not followed by LF is an ordinary byte of the line."""
        data = b"a\rb\n\r\r\n\rc"
        self.assert_every_split(data, [b"a\rb\n", b"\r\r\n", b"\rc"])

    def test_nul_and_invalid_utf8(self) -> None:
        """NUL and bytes that are not UTF-8 pass through unchanged."""
        data = b"\x00\xff\xfe\n\xc3(\x00\r\n\x80"
        self.assert_every_split(data, [b"\x00\xff\xfe\n", b"\xc3(\x00\r\n", b"\x80"])

    def test_empty_lines(self) -> None:
        """Empty lines (a bare LF or CRLF) are lines too."""
        self.assert_every_split(b"\n\r\n\n", [b"\n", b"\r\n", b"\n"])

    def test_final_unterminated_line(self) -> None:
        """``end()`` returns the bytes after the last LF as a line without terminator."""
        self.assert_every_split(b"one\ntwo", [b"one\n", b"two"])

    def test_final_cr_stays_content(self) -> None:
        """A CR at the very end of the stream is content of the final line."""
        self.assert_every_split(b"one\r", [b"one\r"])

    def test_empty_stream(self) -> None:
        """No bytes, no events; an empty ``feed`` yields nothing either."""
        framer = LineFramer(10)
        self.assertEqual(framer.feed(b""), [])
        self.assertEqual(framer.end(), [])

    def test_empty_feed_adds_no_final_line(self) -> None:
        """``feed(b"")`` between lines holds nothing: ``end()`` reports no empty line."""
        framer = LineFramer(10)
        self.assertEqual(framer.feed(b"a\n"), [b"a\n"])
        self.assertEqual(framer.feed(b""), [])
        self.assertEqual(framer.buffered, 0)
        self.assertEqual(framer.end(), [])

    def test_end_resets(self) -> None:
        """After ``end()`` the framer holds nothing and a second ``end()`` is empty."""
        framer = LineFramer(10)
        framer.feed(b"abc")
        self.assertEqual(framer.end(), [b"abc"])
        self.assertEqual(framer.buffered, 0)
        self.assertEqual(framer.end(), [])

    def test_limit_must_be_positive(self) -> None:
        """A limit below 1 is refused with a message naming it."""
        error = self.assertRaises(ValueError, LineFramer, 0)
        self.assertIn("max_line_length must be at least 1, not 0", str(error))


class LimitTests(SynchronousTestCase):
    """``max_line_length`` counts content only; the boundary is exact."""

    LIMIT = 5

    def assert_framed(self, data: bytes, expected: list[Event]) -> None:
        """Check ``data`` in one chunk, a byte at a time, and cut at every offset."""
        splits = [[data], chunks_of(data, 1)] + [split_at(data, [c]) for c in range(len(data))]
        for pieces in splits:
            framer = LineFramer(self.LIMIT)
            self.assertEqual(frame(framer, pieces), expected, f"pieces {pieces!r}")

    def test_content_at_limit_lf(self) -> None:
        """A line whose content is exactly the limit is a line (LF)."""
        self.assert_framed(b"12345\n", [b"12345\n"])

    def test_content_at_limit_crlf(self) -> None:
        """A line whose content is exactly the limit is a line (CRLF: limit + 2 bytes)."""
        self.assert_framed(b"12345\r\n", [b"12345\r\n"])

    def test_content_over_limit_lf(self) -> None:
        """One byte more than the limit is OVERLONG (LF)."""
        self.assert_framed(b"123456\n", [OVERLONG])

    def test_content_over_limit_crlf(self) -> None:
        """One byte more than the limit is OVERLONG (CRLF)."""
        self.assert_framed(b"123456\r\n", [OVERLONG])

    def test_content_ending_in_cr_over_limit(self) -> None:
        """Limit bytes then a lone CR then LF: CRLF terminator, content within the limit."""
        self.assert_framed(b"1234\r\r\n", [b"1234\r\r\n"])
        self.assert_framed(b"12345\r\r\n", [OVERLONG])

    def test_far_over_limit(self) -> None:
        """A much longer line is one OVERLONG, whatever its terminator."""
        self.assert_framed(b"x" * 50 + b"\r\n", [OVERLONG])
        self.assert_framed(b"x" * 50 + b"\n", [OVERLONG])

    def test_overlong_then_next_line(self) -> None:
        """An overlong line is dropped and the lines around it still come out."""
        data = b"ok\n" + b"y" * 20 + b"\nnext\r\n"
        self.assert_framed(data, [b"ok\n", OVERLONG, b"next\r\n"])

    def test_overlong_reported_when_the_limit_is_crossed(self) -> None:
        """OVERLONG comes with the byte that crosses the limit, not with the LF."""
        framer = LineFramer(self.LIMIT)
        self.assertEqual(framer.feed(b"12345"), [])
        self.assertEqual(framer.feed(b"6"), [OVERLONG])
        self.assertEqual(framer.feed(b"x" * 100), [])
        self.assertTrue(framer.holding)
        self.assertEqual(framer.feed(b"\nnext\n"), [b"next\n"])
        self.assertFalse(framer.holding)

    def test_overlong_in_one_read_without_its_lf(self) -> None:
        """Lines, then the start of an overlong line, in one read: both reported."""
        framer = LineFramer(self.LIMIT)
        self.assertEqual(framer.feed(b"a\nb\n" + b"z" * 6), [b"a\n", b"b\n", OVERLONG])
        self.assertEqual(framer.feed(b"\r\nc\n"), [b"c\n"])

    def test_held_cr_at_the_limit_waits_for_the_next_byte(self) -> None:
        """Limit bytes and a CR may still be a line with CRLF: the next byte decides."""
        framer = LineFramer(self.LIMIT)
        self.assertEqual(framer.feed(b"12345\r"), [])
        self.assertEqual(framer.feed(b"\n"), [b"12345\r\n"])
        self.assertEqual(framer.feed(b"12345\r"), [])
        self.assertEqual(framer.feed(b"\r"), [OVERLONG])
        self.assertEqual(framer.feed(b"\n"), [])
        self.assertEqual(framer.feed(b"123\r"), [])
        self.assertEqual(framer.feed(b"x"), [])
        self.assertEqual(framer.feed(b"\n"), [b"123\rx\n"])

    def test_overlong_cr_and_lf_in_separate_feeds(self) -> None:
        """While discarding, a read that ends in CR and a read of LF end the line once."""
        framer = LineFramer(self.LIMIT)
        self.assertEqual(framer.feed(b"x" * 10), [OVERLONG])
        self.assertEqual(framer.feed(b"\r"), [])
        self.assertEqual(framer.feed(b""), [])
        self.assertEqual(framer.feed(b"\nnext\n"), [b"next\n"])
        self.assertEqual(framer.end(), [])

    def test_overlong_split_after_cr_across_reads(self) -> None:
        """A held line of limit bytes and CR, then more bytes: OVERLONG once, then lines."""
        for rest in (b"x\r\n", b"\r\n", b"xx\n"):
            framer = LineFramer(self.LIMIT)
            self.assertEqual(framer.feed(b"ab\n12345\r"), [b"ab\n"])
            self.assertEqual(framer.feed(rest + b"ok\n"), [OVERLONG, b"ok\n"], rest)

    def test_final_line_at_limit(self) -> None:
        """An unterminated final line of exactly the limit is returned by ``end()``."""
        self.assert_framed(b"a\n12345", [b"a\n", b"12345"])

    def test_final_line_one_over_limit(self) -> None:
        """An unterminated final line of limit + 1 is OVERLONG.

        Limit bytes and a CR are held in case the CR begins a CRLF, so that case
        is only decided by ``end()``.
        """
        self.assert_framed(b"a\n123456", [b"a\n", OVERLONG])
        framer = LineFramer(self.LIMIT)
        self.assertEqual(framer.feed(b"12345\r"), [])
        self.assertEqual(framer.end(), [OVERLONG])

    def test_final_line_far_over_limit(self) -> None:
        """An unterminated line already reported gets no second event at ``end()``."""
        self.assert_framed(b"a\n" + b"z" * 30, [b"a\n", OVERLONG])
        framer = LineFramer(self.LIMIT)
        self.assertEqual(framer.feed(b"z" * 30), [OVERLONG])
        self.assertEqual(framer.end(), [])
        self.assertFalse(framer.holding)

    def test_buffered_counts_held_bytes(self) -> None:
        """``buffered`` is the held length, up to limit + 1, and 0 once discarding."""
        framer = LineFramer(self.LIMIT)
        framer.feed(b"12345")
        self.assertEqual(framer.buffered, 5)
        framer.feed(b"\r")
        self.assertEqual(framer.buffered, 6)
        self.assertEqual(framer.feed(b"x"), [OVERLONG])
        self.assertEqual(framer.buffered, 0)
        framer.feed(b"\n")
        self.assertEqual(framer.buffered, 0)


class LazyEventsTests(SynchronousTestCase):
    """``events()`` frames as its events are taken, so a consumer can stop part-way."""

    def test_stop_and_go_on(self) -> None:
        """Events not yet taken are not framed: the framer's state follows the taking."""
        framer = LineFramer(5)
        events = framer.events(b"a\nb\n" + b"x" * 9)
        self.assertEqual(next(events), b"a\n")
        self.assertFalse(framer.holding)
        self.assertEqual(next(events), b"b\n")
        self.assertFalse(framer.holding)
        self.assertIs(next(events), OVERLONG)
        self.assertTrue(framer.holding)
        self.assertEqual(list(events), [])
        self.assertEqual(framer.feed(b"\nc"), [])
        self.assertEqual(framer.end(), [b"c"])


class CostTests(SynchronousTestCase):
    """Memory stays bounded and work stays linear however the input is cut."""

    def test_bounded_memory_for_huge_line(self) -> None:
        """A 10 MiB line fed in pieces never makes the framer hold more than limit + 1."""
        limit = 1000
        framer = LineFramer(limit)
        piece = b"x" * 4096
        self.assertEqual(framer.feed(piece), [OVERLONG])
        for _ in range(10 * 1024 * 1024 // len(piece) - 1):
            self.assertEqual(framer.feed(piece), [])
            self.assertLessEqual(framer.buffered, limit + 1)
            self.assertLessEqual(sum(map(len, framer._pending)), limit + 1)
        self.assertEqual(framer.feed(b"\r\nok\n"), [b"ok\n"])
        self.assertEqual(framer.buffered, 0)

    def test_bounded_memory_byte_at_a_time(self) -> None:
        """Fed a byte at a time, held bytes grow to the limit and then drop to 0.

        Only a last CR may take the held bytes to limit + 1 (see LimitTests).
        """
        limit = 64
        framer = LineFramer(limit)
        peak = 0
        for _ in range(1000):
            framer.feed(b"a")
            peak = max(peak, framer.buffered)
            self.assertEqual(framer.buffered, sum(map(len, framer._pending)))
        self.assertEqual(peak, limit)
        self.assertEqual(framer.buffered, 0)

    def test_held_pieces_are_never_copied(self) -> None:
        """Until its LF arrives, a held line only grows by appending the new piece.

        This is the deterministic form of "a long line sent a byte at a time costs
        O(n)": ``LineReceiver`` re-joins and re-searches its whole buffer on every
        ``dataReceived``, which is O(n²).  Here every earlier piece stays the very
        same object (no join, no copy) and each feed adds one, so the work per feed
        is constant and the one join happens when the line completes.  Timing
        ratios would say the same thing flakily on a loaded CI machine.
        """
        n = 20_000
        framer = LineFramer(n + 10)
        fed: list[bytes] = []
        for i in range(n):
            piece = bytes([97 + i % 26])
            framer.feed(piece)
            fed.append(piece)
            self.assertEqual(len(framer._pending), i + 1)
            self.assertIs(framer._pending[-1], piece)
        self.assertTrue(all(a is b for a, b in zip(framer._pending, fed, strict=True)))
        self.assertEqual(framer.feed(b"\n"), [b"".join(fed) + b"\n"])

    def test_every_byte_searched_once(self) -> None:
        """Over a whole stream, ``find`` looks at each byte exactly once.

        The stream mixes many short lines with a long line cut into small pieces;
        the count is exact, so a framer that re-searched held bytes (or searched
        each chunk twice) would fail whatever the machine's speed.
        """
        data = b"short\n" * 200 + b"L" * 5000 + b"\r\n" + b"tail"
        for size in (1, 3, 7, 64, 4096):
            CountingBytes.scanned = 0
            framer = LineFramer(10_000)
            events = frame(framer, [CountingBytes(p) for p in chunks_of(data, size)])
            self.assertEqual(b"".join(e for e in events if isinstance(e, bytes)), data)
            self.assertEqual(CountingBytes.scanned, len(data), f"chunk size {size}")


class TerminatorTests(SynchronousTestCase):
    """``terminator_of`` and ``OVERLONG``."""

    def test_terminator_of(self) -> None:
        """CRLF, LF or nothing, judged only from the end of the line."""
        self.assertEqual(terminator_of(b"a\r\n"), CRLF)
        self.assertEqual(terminator_of(b"\r\n"), CRLF)
        self.assertEqual(terminator_of(b"a\n"), LF)
        self.assertEqual(terminator_of(b"\n"), LF)
        self.assertEqual(terminator_of(b"a\r"), b"")
        self.assertEqual(terminator_of(b""), b"")

    def test_overlong_value(self) -> None:
        """OVERLONG is one object that reads as its name."""
        self.assertEqual(repr(OVERLONG), "OVERLONG")


class PropertyTests(SynchronousTestCase):
    """Hypothesis: any bytes, cut anywhere."""

    @PROPERTY
    @given(split_streams())
    def test_lines_concatenate_to_input(self, stream: tuple[bytes, list[bytes]]) -> None:
        """With a large limit, the events joined together are the input, byte for byte."""
        data, pieces = stream
        events = frame(LineFramer(max(1, len(data))), pieces)
        self.assertTrue(all(isinstance(e, bytes) for e in events))
        self.assertEqual(b"".join(e for e in events if isinstance(e, bytes)), data)
        # Every event but a final one ends with LF and holds no other LF.
        for event in events[:-1]:
            assert isinstance(event, bytes)
            self.assertEqual(event.count(LF), 1)
            self.assertTrue(event.endswith(LF))

    @PROPERTY
    @given(split_streams(), st.integers(min_value=1, max_value=12))
    def test_matches_reference_model(self, stream: tuple[bytes, list[bytes]], limit: int) -> None:
        """With a small limit, events equal the split-on-LF-and-classify model."""
        data, pieces = stream
        framer = LineFramer(limit)
        events: list[Event] = []
        for piece in pieces:
            events.extend(framer.feed(piece))
            self.assertLessEqual(framer.buffered, limit + 1)
        events.extend(framer.end())
        self.assertEqual(events, reference(data, limit))

    @PROPERTY
    @given(split_streams(), st.integers(min_value=1, max_value=12))
    def test_overlong_as_soon_as_known(
        self, stream: tuple[bytes, list[bytes]], limit: int
    ) -> None:
        """After each feed, every line ended or proven too long has its event, no more."""
        _, pieces = stream
        framer = LineFramer(limit)
        count = 0
        fed = b""
        for piece in pieces:
            count += len(framer.feed(piece))
            fed += piece
            self.assertEqual(count, reported_by(fed, limit), fed)

    @PROPERTY
    @given(split_streams(), st.integers(min_value=1, max_value=12))
    def test_event_count(self, stream: tuple[bytes, list[bytes]], limit: int) -> None:
        """One event per LF, plus one for a non-empty tail, whatever the limit."""
        data, pieces = stream
        events = frame(LineFramer(limit), pieces)
        tail = data.rsplit(LF, 1)[-1]
        self.assertEqual(len(events), data.count(LF) + (1 if tail else 0))


@st.composite
def line_runs(draw: st.DrawFn) -> tuple[bytes, int]:
    """Bytes with LFs at lengths around the search threshold, and an end just after one."""
    lengths = st.one_of(
        st.integers(min_value=0, max_value=8),
        st.integers(min_value=framing._FIND_FROM - 3, max_value=framing._FIND_FROM + 3),
        st.integers(min_value=0, max_value=2000),
    )
    lines = draw(st.lists(lengths, min_size=1, max_size=framing._MAX_FINDS + 20))
    data = b"".join(b"x" * size + LF for size in lines)
    end = draw(st.integers(min_value=1, max_value=len(data)))
    end = data.rfind(LF, 0, end) + 1 or data.find(LF) + 1
    extra = draw(st.binary(max_size=8))
    return data + extra, end


class CountLinesTests(SynchronousTestCase):
    """``count_lines`` is ``bytes.count`` by another road."""

    @PROPERTY
    @given(line_runs())
    def test_same_as_count(self, case: tuple[bytes, int]) -> None:
        """Whatever the line lengths, the LFs before ``end`` are all counted, no more."""
        data, end = case
        self.assertEqual(count_lines(data, end), data.count(LF, 0, end))

    def test_each_road(self) -> None:
        """Short lines (one count), long lines (searches), and more than the searches."""
        short = b"ab\n" * 100
        self.assertEqual(count_lines(short, len(short)), 100)
        long_line = b"y" * framing._FIND_FROM + LF
        few = long_line * 5 + b"tail"
        self.assertEqual(count_lines(few, len(long_line) * 5), 5)
        many = long_line + b"\n" * (framing._MAX_FINDS * 3)
        self.assertEqual(count_lines(many, len(many)), 1 + framing._MAX_FINDS * 3)
        exact = long_line * (framing._MAX_FINDS + 1)
        self.assertEqual(count_lines(exact, len(exact)), framing._MAX_FINDS + 1)
        edge = b"z" * (framing._FIND_FROM - 2) + LF + b"\n" * 3
        self.assertEqual(count_lines(edge, len(edge)), 4)

    def test_nothing_after_end_counts(self) -> None:
        """LFs (and NULs) after ``end`` are not counted, on each road."""
        long_line = b"y" * framing._FIND_FROM + LF
        short = b"ab\n" * 10 + b"\n" * 5
        self.assertEqual(count_lines(short, 3), 1)
        few = long_line * 3 + b"\n" * 5
        self.assertEqual(count_lines(few, len(long_line) * 2), 2)
        many = long_line + b"\n" * (framing._MAX_FINDS + 10)
        end = len(many)
        self.assertEqual(count_lines(many + b"\n" * 10, end), framing._MAX_FINDS + 11)
        # A NUL far after the end is no LF: the first search is for LF, from 0.
        nul = b"ab\n" * 3 + b"x" * 500 + b"\0\n"
        self.assertEqual(count_lines(nul, 9), 3)

    def test_first_byte_may_be_the_lf(self) -> None:
        """An LF at offset 0 is the first line, also when the next one is long."""
        data = LF + b"x" * (framing._FIND_FROM + 16) + LF
        self.assertEqual(count_lines(data, len(data)), 2)

    def test_searches_are_bounded(self) -> None:
        """A long first line then many short ones: at most _MAX_FINDS + 1 searches."""
        data = CountingBytes(b"y" * 1000 + LF + b"\n" * 10_000)
        self.assertEqual(count_lines(data, len(data)), 10_001)
        self.assertLessEqual(data.finds, framing._MAX_FINDS + 1)
