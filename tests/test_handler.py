"""Tests for :mod:`secure_echo.line.handler`: the interface and the echo handler."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from secure_echo.line.handler import EchoHandler, IBatchLineHandler, ILineHandler


class EchoHandlerTests(SynchronousTestCase):
    """``EchoHandler`` replies with the line itself."""

    def test_provides_interface(self) -> None:
        """EchoHandler declares and correctly implements ``ILineHandler``."""
        self.assertTrue(verifyClass(ILineHandler, EchoHandler))
        self.assertTrue(verifyObject(ILineHandler, EchoHandler()))

    def test_returns_line_unchanged(self) -> None:
        """Lines with LF, CRLF, no terminator, NUL and non-UTF-8 come back as they are."""
        handler = EchoHandler()
        for line in [b"hello\n", b"hello\r\n", b"final", b"", b"\x00\xff\r\n", b"a\rb\n"]:
            self.assertEqual(handler.handle_line(line), line)

    def test_returns_bytes_synchronously(self) -> None:
        """The reply is plain bytes, not a Deferred: the protocol writes it at once."""
        self.assertIs(type(EchoHandler().handle_line(b"x\n")), bytes)

    @settings(max_examples=100, deadline=None, database=None)
    @given(st.binary())
    def test_any_bytes(self, line: bytes) -> None:
        """Any bytes at all are echoed unchanged."""
        self.assertEqual(EchoHandler().handle_line(line), line)


class BatchTests(SynchronousTestCase):
    """The echo handler's batch form answers like its per-line form."""

    def test_provides_batch_interface(self) -> None:
        """EchoHandler declares and implements ``IBatchLineHandler``."""
        self.assertTrue(verifyObject(IBatchLineHandler, EchoHandler()))

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"") + b"\n")))
    def test_batch_equals_lines(self, lines: list[bytes]) -> None:
        """handle_batch(lines) is the concatenation of handle_line(line) for each."""
        handler = EchoHandler()
        joined = b"".join(lines)
        self.assertEqual(
            handler.handle_batch(joined, len(lines)),
            b"".join(handler.handle_line(line) for line in lines),
        )
