"""The opt-in info line: the connection as the server sees it, as one JSON line."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.line.protocol import LineSettings
from secure_echo.tls.policy import ClientAuth, TLSSettings
from tests.helpers import make_pki
from tests.tlspair import TLSPair, client_context, server_factory

INFO = b"\x00secure-echo:info"


class InfoLineTests(SynchronousTestCase):
    """With --info-line set, that line is answered with connection facts."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()

    def pair(self, info: bytes | None, *, mtls: bool = False) -> TLSPair:
        settings = None
        context = client_context(self.pki)
        if mtls:
            settings = TLSSettings(
                self.pki.server_cert, self.pki.server_key, self.pki.ca_cert, ClientAuth.REQUIRED
            )
            context = client_context(self.pki, cert=self.pki.client_cert, key=self.pki.client_key)
        factory = server_factory(
            self.pki, self.clock, settings=settings, line_settings=LineSettings(info_line=info)
        )
        pair = TLSPair(factory, context)
        pair.handshake()
        return pair

    def test_info_reply_in_order(self) -> None:
        """The info line gets one JSON line in its place; lines around it are echoed."""
        pair = self.pair(INFO)
        pair.send(b"before\n" + INFO + b"\r\nafter\n")
        pair.pump()
        before, info, after, rest = pair.received.split(b"\n")
        self.assertEqual((before, after, rest), (b"before", b"after", b""))
        self.assertTrue(info.endswith(b"\r"), "the info reply keeps the line's CRLF")
        facts = json.loads(info)
        self.assertEqual(facts["tls_version"], "TLSv1.3")
        self.assertEqual(facts["sni"], "localhost")
        self.assertEqual(facts["peer"], "127.0.0.1:50000")
        self.assertIs(facts["resumed"], False)
        self.assertIsNone(facts["client_cert_subject"])

    def test_client_certificate_facts(self) -> None:
        """With mutual TLS the info line names the client certificate and its SANs."""
        pair = self.pair(INFO, mtls=True)
        pair.send(INFO + b"\n")
        pair.pump()
        facts = json.loads(pair.received)
        self.assertEqual(facts["client_cert_subject"], "CN=test client")
        self.assertRegex(facts["client_cert_sha256"], "^[0-9a-f]{64}$")
        self.assertEqual(facts["client_cert_sans"], [])
        self.assertTrue(facts["client_cert_not_after"])

    def test_off_by_default(self) -> None:
        """Without the option the same line is echoed byte for byte."""
        pair = self.pair(None)
        pair.send(INFO + b"\n")
        pair.pump()
        self.assertEqual(pair.received, INFO + b"\n")

    def test_only_exact_content(self) -> None:
        """A line that merely starts or ends with the info text is echoed."""
        pair = self.pair(INFO)
        data = INFO + b"x\n" + b"x" + INFO + b"\n" + INFO + b"\r\r\n"
        pair.send(data)
        pair.pump()
        self.assertEqual(pair.received, data)
