"""Both record I/O implementations give the transport the same behaviour.

The transport's own tests run on the fast implementation (where pyOpenSSL's
private handles exist); here they run again on the public-API one, and the two
are compared directly.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls import recordio
from tests import test_transport
from tests.helpers import make_pki
from tests.tlspair import TLSPair, client_context, server_factory


def fast_pair(case: SynchronousTestCase) -> TLSPair:
    """A TLS pair over the fast record I/O, its handshake done."""
    case.patch(recordio, "use_fast", True)
    pki = make_pki(case.mktemp())
    pair = TLSPair(server_factory(pki, Clock()), client_context(pki))
    pair.handshake()
    return pair


class PublicEchoOverTLSTests(test_transport.EchoOverTLSTests):
    """The echo, close and error cases over the public-API record I/O."""

    def setUp(self) -> None:
        self.patch(recordio, "use_fast", False)
        super().setUp()


class PublicHandshakeTests(test_transport.HandshakeTests):
    """The handshake cases over the public-API record I/O."""

    def setUp(self) -> None:
        self.patch(recordio, "use_fast", False)
        super().setUp()


class ImplementationTests(SynchronousTestCase):
    """What is chosen, and that the two agree byte for byte."""

    def test_fast_is_used_when_available(self) -> None:
        """With pyOpenSSL's handles present the transport runs the fast record I/O."""
        self.assertTrue(recordio.FAST_AVAILABLE, "the installed pyOpenSSL lost its handles")
        pki = make_pki(self.mktemp())
        pair = TLSPair(server_factory(pki, Clock()), client_context(pki))
        self.assertIsInstance(pair.server._io, recordio.FastRecordIO)

    def run_echo(self, *, fast: bool) -> tuple[bytes, str | None]:
        self.patch(recordio, "use_fast", fast)
        pki = make_pki(self.mktemp())
        pair = TLSPair(server_factory(pki, Clock()), client_context(pki))
        pair.handshake()
        pair.send(b"x" * 60_000 + b"\n" + b"short\n")
        pair.pump()
        pair.server.dataReceived(b"\x17\x03\x03\x00\x05hello")
        return pair.received, pair.server.record.tls_error

    def test_same_bytes_and_errors(self) -> None:
        """Large records, small ones and a corrupt one: same plaintext, same reason."""
        fast = self.run_echo(fast=True)
        public = self.run_echo(fast=False)
        self.assertEqual(fast, public)
        self.assertEqual(fast[0], b"x" * 60_000 + b"\n" + b"short\n")
        self.assertTrue(fast[1])

    def run_bad_hello(self, *, fast: bool) -> tuple[str | None, str | None]:
        self.patch(recordio, "use_fast", fast)
        pki = make_pki(self.mktemp())
        pair = TLSPair(server_factory(pki, Clock()), client_context(pki))
        # A handshake record whose message is no ClientHello OpenSSL can read.
        pair.server.dataReceived(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00")
        record = pair.server.record
        return record.tls_error, record.close_reason

    def test_same_handshake_failure(self) -> None:
        """A handshake OpenSSL refuses: the same reason through either implementation."""
        fast = self.run_bad_hello(fast=True)
        public = self.run_bad_hello(fast=False)
        self.assertEqual(fast, public)
        self.assertTrue(fast[0])
        self.assertEqual(fast[1], "handshake_failed")


class FastRecordIOTests(SynchronousTestCase):
    """What the fast record I/O hands the transport, over a real TLS session."""

    def setUp(self) -> None:
        self.pair = fast_pair(self)
        self.io = self.pair.server._io
        assert isinstance(self.io, recordio.FastRecordIO)

    def test_records_of_one_read_in_one_chunk(self) -> None:
        """Several records fed at once come out as one bytes, not one per record."""
        for part in (b"one\n", b"two\n", b"three\n"):
            self.pair.client.write(part)  # a record each
        self.io.feed(self.pair.outgoing.read())
        chunks, finished, error = self.io.read()
        self.assertEqual(chunks, [b"one\ntwo\nthree\n"])
        self.assertEqual((finished, error), (False, None))

    def test_more_than_the_buffer(self) -> None:
        """Plaintext larger than the shared buffer comes out whole, in order."""
        data = bytes(range(256)) * 2048  # 512 KiB: 32 records, 4 buffers' worth
        self.pair.client.write(data)
        self.io.feed(self.pair.outgoing.read())
        chunks, _, _ = self.io.read()
        self.assertEqual(b"".join(chunks), data)
        self.assertLessEqual(len(chunks), 5)

    def test_pending_out_is_a_view_when_small(self) -> None:
        """Ciphertext that fits the shared buffer is handed out as a view of it."""
        self.io.write(b"reply\n")
        out = self.io.pending_out()
        self.assertIsInstance(out, memoryview)
        self.pair.incoming.write(bytes(out))
        self.pair.read_client()
        self.assertEqual(self.pair.received, b"reply\n")
        self.assertEqual(self.io.pending_out(), b"")

    def test_pending_out_larger_than_the_buffer(self) -> None:
        """More ciphertext than the buffer holds comes out whole, as bytes."""
        data = bytes(range(256)) * 1024  # 256 KiB of plaintext
        self.io.write(data)
        out = self.io.pending_out()
        self.assertIsInstance(out, bytes)
        self.pair.incoming.write(out)
        self.pair.read_client()
        self.assertEqual(self.pair.received, data)


class ReleaseTests(SynchronousTestCase):
    """The memory BIOs' buffers are given back once the handshake's flights are out."""

    def setUp(self) -> None:
        self.patch(recordio, "use_fast", True)
        pki = make_pki(self.mktemp())
        self.pair = TLSPair(server_factory(pki, Clock()), client_context(pki))

    def test_handshake_ends_with_fresh_bios(self) -> None:
        """After the handshake the connection has new BIOs, and echoes on them."""
        tls = self.pair.server._tls
        before = (tls._into_ssl, tls._from_ssl)
        self.pair.handshake()
        self.assertNotEqual(tls._into_ssl, before[0])
        self.assertNotEqual(tls._from_ssl, before[1])
        self.pair.send(b"after\n" * 3)
        self.pair.pump()
        self.assertEqual(self.pair.received, b"after\n" * 3)
        self.assertEqual(self.pair.server._io.pending_out(), b"")

    def test_not_while_bytes_wait(self) -> None:
        """Ciphertext still waiting in either BIO keeps both (nothing is lost)."""
        self.pair.handshake()
        io = self.pair.server._io
        assert isinstance(io, recordio.FastRecordIO)
        io.write(b"waiting\n")
        self.assertFalse(io.release())
        self.pair.incoming.write(bytes(io.pending_out()))
        self.pair.read_client()
        self.assertEqual(self.pair.received, b"waiting\n")
        self.pair.client.write(b"in\n")
        io.feed(self.pair.outgoing.read())
        self.assertFalse(io.release())
        chunks, _, _ = io.read()
        self.assertEqual(chunks, [b"in\n"])
        self.assertTrue(io.release())

    def test_public_api_keeps_its_bios(self) -> None:
        """Through the public API nothing can be replaced: release says so."""
        self.patch(recordio, "use_fast", False)
        pki = make_pki(self.mktemp())
        pair = TLSPair(server_factory(pki, Clock()), client_context(pki))
        pair.handshake()
        self.assertFalse(pair.server._io.release())
        pair.send(b"x\n")
        pair.pump()
        self.assertEqual(pair.received, b"x\n")


class _CountingLib:
    """OpenSSL's bindings, counting ``SSL_write`` calls."""

    def __init__(self, lib: object) -> None:
        self._lib = lib
        self.writes = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._lib, name)

    def SSL_write(self, *args: object) -> int:
        self.writes += 1
        return self._lib.SSL_write(*args)  # type: ignore[attr-defined,no-any-return]


class WholeWritesTests(SynchronousTestCase):
    """One ``SSL_write`` encrypts a whole batch of replies, however many records."""

    def setUp(self) -> None:
        self.pair = fast_pair(self)

    def test_connections_write_whole(self) -> None:
        """The fast record I/O turns OpenSSL's partial-write mode off for its connection."""
        lib: Any = getattr(recordio, "_lib")  # noqa: B009 - private, not re-exported
        mode = lib.SSL_set_mode(self.pair.server._tls._ssl, 0)  # adds nothing, returns the mode
        self.assertEqual(mode & lib.SSL_MODE_ENABLE_PARTIAL_WRITE, 0)
        self.assertTrue(mode & lib.SSL_MODE_RELEASE_BUFFERS)

    def test_nothing_to_write(self) -> None:
        """An empty write calls nothing and queues nothing."""
        counting = _CountingLib(getattr(recordio, "_lib"))  # noqa: B009 - private
        self.patch(recordio, "_lib", counting)
        self.pair.server._io.write(b"")
        self.assertEqual((counting.writes, self.pair.server._io.pending_out()), (0, b""))

    def test_failed_write_raises(self) -> None:
        """A write OpenSSL refuses (after our close_notify) raises pyOpenSSL's error."""
        tls = self.pair.server._tls
        tls.shutdown()
        self.assertRaises(SSL.Error, self.pair.server._io.write, b"late\n")

    def test_one_call_for_many_records(self) -> None:
        """64 KiB of replies (four records and more) take one SSL_write, and arrive whole."""
        counting = _CountingLib(getattr(recordio, "_lib"))  # noqa: B009 - private
        self.patch(recordio, "_lib", counting)
        io = self.pair.server._io
        data = bytes(range(256)) * 256
        io.write(data)
        self.assertEqual(counting.writes, 1)
        self.pair.incoming.write(bytes(io.pending_out()))
        self.pair.read_client()
        self.assertEqual(self.pair.received, data)
