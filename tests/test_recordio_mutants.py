"""Edges of the record I/O that mutation testing found untested.

Each case runs on both implementations (the fast one through pyOpenSSL's private
handles and the public-API fallback) over a real in-memory TLS session: a
one-byte record, a close_notify, a broken record, one read that decrypts more
than 112 KiB in records that do not fill the shared buffer evenly, and outgoing
ciphertext of exactly one buffer (or one read) and one byte more.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import ClassVar

from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls import recordio
from tests.helpers import make_pki
from tests.tlspair import TLSPair, client_context, server_factory

#: TLS's largest record plaintext.
RECORD = 16384


class RecordIOEdges:
    """The cases, for a subclass that says which implementation runs them."""

    fast: ClassVar[bool]
    #: Ciphertext the implementation reads out of OpenSSL per call.
    out_chunk: ClassVar[int]

    def setUp(self) -> None:
        case = self.case
        case.patch(recordio, "use_fast", self.fast)
        pki = make_pki(case.mktemp())
        self.pair = TLSPair(server_factory(pki, Clock()), client_context(pki))
        self.pair.handshake()
        self.io = self.pair.server._io
        case.assertIsInstance(
            self.io, recordio.FastRecordIO if self.fast else recordio.PublicRecordIO
        )

    @property
    def case(self) -> SynchronousTestCase:
        assert isinstance(self, SynchronousTestCase)
        return self

    def client_records(self, *parts: bytes) -> bytes:
        """The ciphertext of one client record per part."""
        for part in parts:
            self.pair.client.write(part)
        return self.pair.outgoing.read()

    def test_one_byte_record(self) -> None:
        """A record holding one byte is read as that byte."""
        self.io.feed(self.client_records(b"\n"))
        self.case.assertEqual(self.io.read(), ([b"\n"], False, None))

    def test_close_notify(self) -> None:
        """Data then close_notify: the data, and ``finished``, and no error."""
        self.pair.client.write(b"bye\n")
        # unwrap() then waits for the server's close_notify, which is not wanted here.
        with contextlib.suppress(ssl.SSLWantReadError):
            self.pair.client.unwrap()
        self.io.feed(self.pair.outgoing.read())
        chunks, finished, error = self.io.read()
        self.case.assertEqual((b"".join(chunks), finished, error), (b"bye\n", True, None))

    def test_broken_record(self) -> None:
        """A record that does not decrypt is an error, not a close."""
        self.io.feed(self.client_records(b"ok\n"))
        self.io.feed(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        chunks, finished, error = self.io.read()
        self.case.assertEqual(b"".join(chunks), b"ok\n")
        self.case.assertFalse(finished)
        self.case.assertIsInstance(error, SSL.Error)

    def test_one_read_of_uneven_records_over_112_kib(self) -> None:
        """Records of 10,000 bytes, 200 KiB fed at once, come out whole and in order.

        Uneven records leave the shared buffer partly used when it has no room
        for another record, so what is copied out must be exactly what was used.
        """
        parts = [bytes([65 + i % 26]) * 10_000 for i in range(21)]
        self.io.feed(self.client_records(*parts))
        chunks, finished, error = self.io.read()
        self.case.assertEqual(b"".join(chunks), b"".join(parts))
        self.case.assertEqual((finished, error), (False, None))

    def overhead(self) -> int:
        """Bytes each record adds to its plaintext (measured with a 1-byte write)."""
        self.io.pending_out()  # the session tickets, if any
        self.io.write(b"x")
        out = bytes(self.io.pending_out())
        self.pair.incoming.write(out)
        self.pair.read_client()
        self.case.assertEqual(self.pair.received, b"x")
        self.pair.received = b""
        return len(out) - 1

    def plaintext_for(self, ciphertext: int) -> bytes:
        """Plaintext whose records make exactly ``ciphertext`` bytes."""
        overhead = self.overhead()
        full = RECORD + overhead
        records, rest = divmod(ciphertext, full)
        if rest <= overhead:  # the last record needs at least one byte of its own
            records -= 1
            rest += full
        size = records * RECORD + rest - overhead
        self.case.assertLessEqual(rest - overhead, RECORD)
        return bytes(i % 251 for i in range(size))

    def assert_pending_out_whole(self, ciphertext: int) -> None:
        """Write plaintext making ``ciphertext`` bytes; one pending_out gives all."""
        data = self.plaintext_for(ciphertext)
        self.io.write(data)
        out = self.io.pending_out()
        self.case.assertIsNotNone(out)
        self.case.assertEqual(len(out), ciphertext)
        self.pair.incoming.write(bytes(out))
        self.pair.read_client()
        self.case.assertEqual(self.pair.received, data)
        self.case.assertEqual(self.io.pending_out(), b"")

    def test_pending_out_of_exactly_one_chunk(self) -> None:
        """Ciphertext of exactly one read-out chunk comes out whole."""
        self.assert_pending_out_whole(self.out_chunk)

    def test_pending_out_of_one_chunk_and_one_byte(self) -> None:
        """Ciphertext one byte over a chunk comes out whole, that byte included."""
        self.assert_pending_out_whole(self.out_chunk + 1)

    def test_pending_out_of_two_chunks_and_more(self) -> None:
        """Ciphertext of several chunks comes out whole and in order."""
        self.assert_pending_out_whole(2 * self.out_chunk + 5000)

    def test_write_after_shutdown(self) -> None:
        """Writing after our close_notify raises pyOpenSSL's error."""
        self.pair.server._tls.shutdown()
        self.case.assertRaises(SSL.Error, self.io.write, b"late\n")


class FastRecordIOEdges(RecordIOEdges, SynchronousTestCase):
    """The edges over the fast record I/O."""

    fast = True
    out_chunk = recordio._BUFFER_SIZE


class PublicRecordIOEdges(RecordIOEdges, SynchronousTestCase):
    """The edges over the public-API record I/O."""

    fast = False
    out_chunk = recordio._PUBLIC_READ
