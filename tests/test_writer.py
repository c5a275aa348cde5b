"""Tests for :mod:`secure_echo.tls.writer`: ciphertext goes out at once when nothing waits."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls.writer import StreamWriter, direct_socket


class SocketTransport(FileDescriptor):
    """A FileDescriptor over one end of a socket pair; write() is recorded."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(reactor=object())  # type: ignore[arg-type]
        self.socket = sock
        self.queued: list[bytes] = []

    def write(self, data: Any) -> None:
        # Twisted's write refuses anything but bytes; so does this one.
        if type(data) is not bytes:
            msg = f"write() got {type(data).__name__}, not bytes"
            raise TypeError(msg)
        self.queued.append(data)

    def fileno(self) -> int:
        return self.socket.fileno()

    def loseConnection(self) -> None:
        # No reactor here: only record that the close was asked for.
        self.disconnecting = True


class Owner:
    """Records what the writer reports."""

    def __init__(self) -> None:
        self.full: list[bool] = []

    def write_full(self, *, full: bool) -> None:
        self.full.append(full)


class OptimisticSendTests(SynchronousTestCase):
    """send: one send() when nothing is queued, the queue otherwise."""

    def setUp(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.ours.setblocking(False)
        self.theirs.settimeout(5)
        self.transport = SocketTransport(self.ours)
        self.owner = Owner()
        self.writer = StreamWriter(self.transport, self.owner)

    def test_direct_when_queue_empty(self) -> None:
        """With an empty queue the bytes go straight to the socket, not to write()."""
        self.assertIsNotNone(direct_socket(self.transport))
        self.writer.send(b"records")
        self.assertEqual(self.transport.queued, [])
        self.assertEqual(self.theirs.recv(100), b"records")

    def test_queued_when_something_is_waiting(self) -> None:
        """If the transport already holds data, new data queues behind it (order kept)."""
        self.transport._tempDataLen = 3
        self.writer.send(b"later")
        self.assertEqual(self.transport.queued, [b"later"])

    def test_remainder_queued_when_kernel_is_full(self) -> None:
        """What the kernel does not take goes through write(), after what it took."""
        big = bytes(range(256)) * 40000  # ~10 MB: more than any socket buffer
        self.writer.send(big)
        self.assertEqual(len(self.transport.queued), 1)
        remainder = self.transport.queued[0]
        self.assertTrue(0 < len(remainder) < len(big))
        self.assertTrue(big.endswith(remainder))

    def test_view_sent_directly(self) -> None:
        """A view of the record buffer is sent as it is, without a copy."""
        buffer = bytearray(b"view records")
        self.writer.send(memoryview(buffer))
        self.assertEqual(self.transport.queued, [])
        self.assertEqual(self.theirs.recv(100), b"view records")

    def test_view_remainder_copied(self) -> None:
        """What the kernel does not take of a view is queued as a copy.

        The view's buffer is reused by the next read, so the queue must own its bytes.
        """
        buffer = bytearray(bytes(range(256)) * 40000)
        self.writer.send(memoryview(buffer))
        (remainder,) = self.transport.queued
        self.assertIs(type(remainder), bytes)
        expected = bytes(buffer[len(buffer) - len(remainder) :])
        buffer[:] = b"\0" * len(buffer)  # the next read overwrites the buffer
        self.assertEqual(remainder, expected)

    def test_view_queued_as_copy(self) -> None:
        """With something already queued, a view is queued as a copy too."""
        self.transport._tempDataLen = 3
        self.writer.send(memoryview(bytearray(b"later")))
        self.assertEqual(self.transport.queued, [b"later"])

    def test_other_transports_use_write(self) -> None:
        """A transport that is not Twisted's FileDescriptor is never bypassed."""
        self.assertIsNone(direct_socket(object()))

    def test_registered_as_streaming_producer(self) -> None:
        """The writer hears when the transport's buffer fills and drains."""
        self.assertIs(self.transport.producer, self.writer)
        self.assertTrue(self.transport.streamingProducer)
        self.writer.pauseProducing()
        self.assertTrue(self.writer.full)
        self.writer.resumeProducing()
        self.assertFalse(self.writer.full)
        self.assertEqual(self.owner.full, [True, False])

    def test_held_counts_what_the_socket_did_not_take(self) -> None:
        """held() is Twisted's buffer: what was never written to the socket."""
        self.assertEqual(self.writer.held(), 0)
        self.transport.dataBuffer = b"0123456789"
        self.transport.offset = 4
        self.transport._tempDataLen = 3
        self.assertEqual(self.writer.held(), 9)

    def test_unsent_adds_the_kernel_queue(self) -> None:
        """unsent() counts bytes the kernel holds that the peer has not acknowledged."""
        self.theirs.setblocking(False)
        self.assertEqual(self.writer.unsent(), 0)
        self.transport._tempDataLen = 5
        self.assertEqual(self.writer.unsent(), 5)

    def test_close_with_unread_input_is_refused(self) -> None:
        """close() reports unread input instead of closing (the caller lingers)."""
        self.theirs.sendall(b"unread")
        for _ in range(100):
            if self.writer.close() is False:
                break
        else:
            self.fail("the unread input was never seen")
        self.assertFalse(self.transport.disconnecting)

    def test_close_without_input_closes(self) -> None:
        """close() with nothing to read closes the stream after its buffer."""
        self.assertTrue(self.writer.close())
        self.assertTrue(self.transport.disconnecting)
