"""Client-controlled text cannot forge or disguise a log line (SNI, names, PROXY paths)."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import ssl
from typing import TYPE_CHECKING, Any, Final

from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.daemon.logs import JSONLinesObserver, render_message
from secure_echo.edge.proxyreader import ProxySettings
from secure_echo.edge.text import printable, printable_bytes
from secure_echo.tls.allowlist import AllowList
from secure_echo.tls.connection import TLSServerConnection
from secure_echo.tls.policy import ClientAuth, TLSSettings
from secure_echo.tools import certgen
from secure_echo.wire.proxy import build_v2_header
from tests.helpers import make_pki
from tests.tlspair import TLSPair, capture_events, client_context, named, server_factory

if TYPE_CHECKING:
    from twisted.logger import LogEvent

#: What may never reach a log line raw: C0, DEL, C1, bidi and zero-width controls.
FORBIDDEN: Final = frozenset(
    [*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0))]
    + [chr(c) for c in (0x061C, 0x200B, 0x200E, 0x200F, 0x2028, 0x2029, 0xFEFF)]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
)
EVIL: Final = "evil\n2026-01-01 forged record\x1b[31m\u202egnp.exe\u200b\x85"


def assert_clean(case: SynchronousTestCase, text: str) -> None:
    """``text`` holds none of the forbidden characters."""
    case.assertEqual(set(text) & FORBIDDEN, set(), repr(text))


def as_lines(event: LogEvent) -> tuple[str, str]:
    """The event as the text log renders it and as the JSON log writes it."""
    stream = io.StringIO()
    JSONLinesObserver(stream)(event)
    written = stream.getvalue()
    # One record, one line: the only line break is the record's own end.
    assert written.count("\n") == 1, written
    assert written.endswith("\n"), written
    line = written[:-1]
    json.loads(line)
    return render_message(event), line


class PrintableTests(SynchronousTestCase):
    """edge.text.printable."""

    def test_clean_text_unchanged(self) -> None:
        """Ordinary names, non-ASCII letters included, come through as they are."""
        for text in ("localhost", "CN=test client,O=secure-echo", "bücher.example", "例え.jp"):
            self.assertIs(printable(text), text)

    def test_escapes(self) -> None:
        """Controls become \\xNN, format characters \\uNNNN."""
        self.assertEqual(printable("a\nb"), "a\\x0ab")
        self.assertEqual(printable("\x1b[31m"), "\\x1b[31m")
        self.assertEqual(printable("\x7f\x85"), "\\x7f\\x85")
        self.assertEqual(printable("a\u202eb\u2066"), "a\\u202eb\\u2066")
        self.assertEqual(printable_bytes(b"ok\xff\n"), "ok\\xff\\x0a")

    @given(st.text())
    def test_nothing_forbidden_survives(self, text: str) -> None:
        """Whatever the input, the output holds no forbidden character."""
        assert_clean(self, printable(text))

    @given(st.text(alphabet=st.characters(blacklist_characters=sorted(FORBIDDEN))))
    def test_safe_text_is_kept(self, text: str) -> None:
        """Text without forbidden characters is not changed."""
        self.assertEqual(printable(text), text)

    @given(st.binary())
    def test_any_bytes(self, raw: bytes) -> None:
        """Any bytes become clean text."""
        assert_clean(self, printable_bytes(raw))


class RecordTests(SynchronousTestCase):
    """The records of real connections whose client chose hostile text."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.clock = Clock()
        self.events = capture_events(self)

    def test_sni(self) -> None:
        """An SNI with a newline, an escape sequence and a bidi override is escaped.

        The client is pyOpenSSL (OpenSSL sends the name as given); the record, the
        text log line and the JSON log line hold none of those characters.
        """
        factory = server_factory(self.pki, self.clock)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5))
        server = factory.buildProtocol(transport.getPeer())
        assert isinstance(server, TLSServerConnection)
        server.makeConnection(transport)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        client = SSL.Connection(context, None)
        client.set_connect_state()
        client.set_tlsext_host_name(EVIL.encode())
        for _ in range(10):
            with contextlib.suppress(SSL.WantReadError):
                client.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                server.dataReceived(client.bio_read(65536))
            data = transport.value()
            transport.clear()
            if data:
                client.bio_write(data)
        self.assertIsNotNone(server.record.tls_version)
        self.assertIn("evil\\x0a", server.record.sni or "")
        server.loseConnection()
        server.connectionLost(None)
        (closed,) = named(self.events, "connection_closed")
        for line in (closed["sni"], *as_lines(closed)):
            assert_clean(self, line)

    def test_certificate_names(self) -> None:
        """A client certificate's CN and SANs with controls are escaped, refused or not."""
        issued = certgen.issue_client(self.pki.ca, EVIL, dns=["ok.example"])
        cert, key = self.pki.directory / "evil.pem", self.pki.directory / "evil-key.pem"
        certgen.write_pair(issued, cert, key)
        settings = TLSSettings(
            self.pki.server_cert,
            self.pki.server_key,
            self.pki.ca_cert,
            ClientAuth.REQUIRED,
            allow=AllowList.build(cns=["someone else"]),
        )
        factory = server_factory(self.pki, self.clock, settings=settings)
        pair = TLSPair(factory, client_context(self.pki, cert=cert, key=key))
        with contextlib.suppress(ssl.SSLError):
            pair.handshake()
            pair.send(b"x\n")
            pair.pump()
        pair.finish_stream()
        events: list[dict[str, Any]] = [
            *named(self.events, "handshake_failed"),
            *named(self.events, "connection_closed"),
        ]
        self.assertEqual(len(events), 2)
        for event in events:
            self.assertIn("evil\\x0a", event["client_cert_subject"])
            told = event.get("tls_error", event.get("reason"))
            for line in (event["client_cert_subject"], told, *as_lines(event)):
                assert_clean(self, str(line))

    def test_proxy_unix_path(self) -> None:
        """A UNIX path from a trusted balancer's PROXY header, any bytes, is escaped."""
        factory = server_factory(
            self.pki,
            self.clock,
            proxy=ProxySettings("required", (ipaddress.ip_network("127.0.0.0/8"),), 5.0),
        )
        path = EVIL.encode() + b"\xff"
        stream = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5))
        reader = factory.buildProtocol(stream.getPeer())
        assert reader is not None
        reader.makeConnection(stream)
        reader.dataReceived(build_v2_header(path, b"/srv"))
        (connection,) = [c for c in factory.connections if isinstance(c, TLSServerConnection)]
        self.assertTrue(connection.record.peer.startswith("unix:evil\\x0a"))
        assert_clean(self, connection.record.peer)
        connection.connectionLost(None)
        (closed,) = named(self.events, "connection_closed")
        for line in as_lines(closed):
            assert_clean(self, line)
