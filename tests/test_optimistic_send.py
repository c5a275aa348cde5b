"""The transport sends ciphertext at once when Twisted's queue is empty."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls.connection import TLSServerConnection, _direct_socket
from secure_echo.tls.record import ConnectionRecord


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


class OptimisticSendTests(SynchronousTestCase):
    """_send_stream: one send() when nothing is queued, the queue otherwise."""

    def setUp(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.ours.setblocking(False)
        self.theirs.settimeout(5)
        self.transport = SocketTransport(self.ours)
        self.connection = TLSServerConnection.__new__(TLSServerConnection)
        self.connection.transport = self.transport
        self.connection.record = ConnectionRecord(1, "peer", "local", 0.0)
        self.connection._socket = _direct_socket(self.transport)

    def test_direct_when_queue_empty(self) -> None:
        """With an empty queue the bytes go straight to the socket, not to write()."""
        self.assertIsNotNone(self.connection._socket)
        self.connection._send_stream(b"records")
        self.assertEqual(self.transport.queued, [])
        self.assertEqual(self.theirs.recv(100), b"records")

    def test_queued_when_something_is_waiting(self) -> None:
        """If the transport already holds data, new data queues behind it (order kept)."""
        self.transport._tempDataLen = 3
        self.connection._send_stream(b"later")
        self.assertEqual(self.transport.queued, [b"later"])

    def test_remainder_queued_when_kernel_is_full(self) -> None:
        """What the kernel does not take goes through write(), after what it took."""
        big = bytes(range(256)) * 40000  # ~10 MB: more than any socket buffer
        self.connection._send_stream(big)
        self.assertEqual(len(self.transport.queued), 1)
        remainder = self.transport.queued[0]
        self.assertTrue(0 < len(remainder) < len(big))
        self.assertTrue(big.endswith(remainder))

    def test_view_sent_directly(self) -> None:
        """A view of the record buffer is sent as it is, without a copy."""
        buffer = bytearray(b"view records")
        self.connection._send_stream(memoryview(buffer))
        self.assertEqual(self.transport.queued, [])
        self.assertEqual(self.theirs.recv(100), b"view records")

    def test_view_remainder_copied(self) -> None:
        """What the kernel does not take of a view is queued as a copy.

        The view's buffer is reused by the next read, so the queue must own its bytes.
        """
        buffer = bytearray(bytes(range(256)) * 40000)
        self.connection._send_stream(memoryview(buffer))
        (remainder,) = self.transport.queued
        self.assertIs(type(remainder), bytes)
        expected = bytes(buffer[len(buffer) - len(remainder) :])
        buffer[:] = b"\0" * len(buffer)  # the next read overwrites the buffer
        self.assertEqual(remainder, expected)

    def test_view_queued_as_copy(self) -> None:
        """With something already queued, a view is queued as a copy too."""
        self.transport._tempDataLen = 3
        self.connection._send_stream(memoryview(bytearray(b"later")))
        self.assertEqual(self.transport.queued, [b"later"])

    def test_other_transports_use_write(self) -> None:
        """A transport that is not Twisted's FileDescriptor is never bypassed."""
        self.assertIsNone(_direct_socket(object()))
