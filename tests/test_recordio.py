"""Both record I/O implementations give the transport the same behaviour.

The transport's own tests run on the fast implementation (where pyOpenSSL's
private handles exist); here they run again on the public-API one, and the two
are compared directly.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from secure_echo import recordio
from tests import test_transport
from tests.helpers import make_pki
from tests.tlspair import TLSPair, client_context, server_factory


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
