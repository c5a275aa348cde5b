"""Tests for :mod:`secure_echo.tools.handshake`: groups read from real handshake bytes.

Handshakes run in memory: Python's ``ssl`` as the client (as in ``secure-echo-client``)
against either Python's ``ssl`` or pyOpenSSL as the server, capturing every byte each
side sends.  pyOpenSSL's ``Connection.get_group_name()`` (OpenSSL's own answer, from
another OpenSSL build than the client's) is the independent check of what the parser
reads.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tools import certgen
from secure_echo.tools.handshake import (
    POST_QUANTUM,
    ClientOffer,
    ServerChoice,
    group_name,
    parse_client_offer,
    parse_server_choice,
)
from secure_echo.wire.clienthello import GROUP_NAMES, is_grease

X25519, SECP256R1, SECP384R1 = 0x001D, 0x0017, 0x0018


@dataclass(frozen=True)
class Capture:
    """Both directions of one handshake and the client's view of it."""

    client_sent: bytes
    server_sent: bytes
    client: ssl.SSLObject


@dataclass(frozen=True)
class Files:
    """A CA and a server certificate for localhost, on disk."""

    ca: Path
    cert: Path
    key: Path
    issued: certgen.Issued


def make_files(case: SynchronousTestCase) -> Files:
    """Write a CA and a localhost server pair under ``case.mktemp()``."""
    directory = Path(case.mktemp())
    directory.mkdir()
    ca = certgen.make_ca("handshake test CA")
    server = certgen.issue_server(ca, ["localhost"])
    certgen.write_public(directory / "ca.pem", ca.cert_pem())
    certgen.write_pair(server, directory / "server.pem", directory / "server.key")
    return Files(directory / "ca.pem", directory / "server.pem", directory / "server.key", server)


def client_context(files: Files, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A verifying client context like the client's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=files.ca)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def stdlib_handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> Capture:
    """Handshake Python's ssl with itself in memory; capture both directions."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    peer = server.wrap_bio(s_in, s_out, server_side=True)
    sent, received = bytearray(), bytearray()
    for _ in range(10):
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            return Capture(bytes(sent), bytes(received), tls)
        data = c_out.read()
        sent += data
        s_in.write(data)
        with contextlib.suppress(ssl.SSLWantReadError):
            peer.do_handshake()
        data = s_out.read()
        received += data
        c_in.write(data)
    raise AssertionError("no handshake in 10 rounds")


def pyopenssl_handshake(client: ssl.SSLContext, files: Files) -> tuple[Capture, str]:
    """Handshake Python's ssl with a pyOpenSSL server; also return its group name."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate_chain_file(str(files.cert))
    context.use_privatekey_file(str(files.key))
    server = SSL.Connection(context, None)
    server.set_accept_state()
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    sent, received = bytearray(), bytearray()
    for _ in range(10):
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            return Capture(bytes(sent), bytes(received), tls), server.get_group_name() or ""
        data = c_out.read()
        sent += data
        if data:
            server.bio_write(data)
        with contextlib.suppress(SSL.WantReadError):
            server.do_handshake()
        with contextlib.suppress(SSL.WantReadError):
            data = server.bio_read(1 << 20)
            received += data
            c_in.write(data)
    raise AssertionError("no handshake in 10 rounds")


def server_context(files: Files) -> ssl.SSLContext:
    """A Python ssl server context with the test certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    return context


def ecdhe(capture: Capture) -> bool:
    """Whether the negotiated cipher suite is an ECDHE one (TLS 1.2 naming)."""
    return "ECDHE" in (capture.client.cipher() or ("",))[0]


class GroupNameTests(SynchronousTestCase):
    """Naming group code points."""

    def test_known(self) -> None:
        """Known groups get OpenSSL's spelling."""
        self.assertEqual(group_name(X25519), "x25519")
        self.assertEqual(group_name(SECP256R1), "secp256r1")
        self.assertEqual(group_name(0x11EC), "X25519MLKEM768")
        self.assertEqual(group_name(0x0100), "ffdhe2048")

    def test_grease_and_unknown(self) -> None:
        """GREASE values are called GREASE; anything else unknown is shown in hex."""
        for code in (0x0A0A, 0x1A1A, 0xFAFA):
            self.assertTrue(is_grease(code))
            self.assertEqual(group_name(code), "GREASE")
        self.assertFalse(is_grease(0x0A1A))
        self.assertEqual(group_name(0x1234), "0x1234")

    def test_post_quantum_groups_are_named(self) -> None:
        """Every group counted as post-quantum has a name, and it says ML-KEM or Kyber."""
        for code in POST_QUANTUM:
            self.assertRegex(GROUP_NAMES[code], "MLKEM|Kyber")


class RealHandshakeTests(SynchronousTestCase):
    """Offers and choices read from handshakes made by OpenSSL."""

    def setUp(self) -> None:
        self.files = make_files(self)

    def test_offer(self) -> None:
        """The client's groups, key share and ALPN list are read from its ClientHello."""
        capture = stdlib_handshake(
            client_context(self.files, ["h2", "secure-echo"]), server_context(self.files)
        )
        offer = parse_client_offer(capture.client_sent)
        assert offer is not None
        self.assertIn(X25519, offer.groups)
        self.assertIn(SECP256R1, offer.groups)
        self.assertEqual(offer.key_shares, (offer.groups[0],))
        self.assertEqual(offer.alpn, (b"h2", b"secure-echo"))

    def test_exact_offer(self) -> None:
        """A client limited to one curve offers exactly that group and its key share."""
        client = client_context(self.files)
        client.set_ecdh_curve("prime256v1")
        capture = stdlib_handshake(client, server_context(self.files))
        self.assertEqual(
            parse_client_offer(capture.client_sent), ClientOffer((SECP256R1,), (SECP256R1,), ())
        )

    def test_tls13_choice_matches_the_server(self) -> None:
        """The group read from a TLS 1.3 ServerHello is the one the server reports."""
        capture, server_says = pyopenssl_handshake(client_context(self.files), self.files)
        self.assertEqual(capture.client.version(), "TLSv1.3")
        choice = parse_server_choice(capture.server_sent, ecdhe=ecdhe(capture))
        assert choice is not None
        self.assertEqual(group_name(choice.group or 0), server_says)
        self.assertFalse(choice.retried)

    def test_tls12_choice_matches_the_server(self) -> None:
        """The curve read from a TLS 1.2 ServerKeyExchange is the one the server reports."""
        client = client_context(self.files)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        capture, server_says = pyopenssl_handshake(client, self.files)
        self.assertEqual(capture.client.version(), "TLSv1.2")
        self.assertTrue(ecdhe(capture))
        choice = parse_server_choice(capture.server_sent, ecdhe=True)
        self.assertEqual(choice, ServerChoice(group=X25519, retried=False))
        self.assertEqual(server_says, "x25519")

    def test_tls12_finite_field_is_not_read_as_a_curve(self) -> None:
        """A TLS 1.2 key exchange that is not ECDHE names no group."""
        client = client_context(self.files)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        capture, _ = pyopenssl_handshake(client, self.files)
        self.assertEqual(
            parse_server_choice(capture.server_sent, ecdhe=False),
            ServerChoice(group=None, retried=False),
        )

    def test_hello_retry(self) -> None:
        """A server that wants another key share retries; the group is the one it asked for."""
        server = server_context(self.files)
        server.set_ecdh_curve("secp384r1")
        capture = stdlib_handshake(client_context(self.files), server)
        offer = parse_client_offer(capture.client_sent)
        assert offer is not None
        self.assertNotIn(SECP384R1, offer.key_shares)
        choice = parse_server_choice(capture.server_sent, ecdhe=ecdhe(capture))
        self.assertEqual(choice, ServerChoice(group=SECP384R1, retried=True))

    def test_tls12_with_a_chosen_curve(self) -> None:
        """A TLS 1.2 server limited to P-384 is read as having chosen P-384."""
        server = server_context(self.files)
        server.set_ecdh_curve("secp384r1")
        server.maximum_version = ssl.TLSVersion.TLSv1_2
        capture = stdlib_handshake(client_context(self.files), server)
        choice = parse_server_choice(capture.server_sent, ecdhe=ecdhe(capture))
        self.assertEqual(choice, ServerChoice(group=SECP384R1, retried=False))

    def test_every_truncation(self) -> None:
        """A stream cut anywhere gives None or the full answer, and never raises."""
        capture = stdlib_handshake(client_context(self.files), server_context(self.files))
        full_choice = parse_server_choice(capture.server_sent, ecdhe=False)
        full_offer = parse_client_offer(capture.client_sent)
        for end in range(len(capture.server_sent)):
            self.assertIn(
                parse_server_choice(capture.server_sent[:end], ecdhe=False), (None, full_choice)
            )
        for end in range(len(capture.client_sent)):
            self.assertIn(parse_client_offer(capture.client_sent[:end]), (None, full_offer))


def vector(length_size: int, data: bytes) -> bytes:
    """A TLS vector: the length in ``length_size`` bytes, then ``data``."""
    return len(data).to_bytes(length_size, "big") + data


def client_hello_record(extensions: list[tuple[int, bytes]]) -> bytes:
    """One handshake record holding a ClientHello with these extensions."""
    block = b"".join(kind.to_bytes(2, "big") + vector(2, data) for kind, data in extensions)
    body = b"\x03\x03" + b"\0" * 32 + vector(1, b"") + vector(2, b"\x13\x01") + vector(1, b"\0")
    body += vector(2, block)
    message = b"\x01" + vector(3, body)
    return b"\x16\x03\x01" + vector(2, message)


class BuiltHelloTests(SynchronousTestCase):
    """ClientHellos built field by field."""

    def test_fields(self) -> None:
        """Every group, every key share (GREASE included) and every ALPN name is read."""
        groups = vector(2, bytes.fromhex("2a2a 11ec 001d 0017 0018"))
        shares = vector(
            2,
            bytes.fromhex("2a2a")
            + vector(2, b"\0")
            + bytes.fromhex("11ec")
            + vector(2, b"k" * 1216)
            + bytes.fromhex("001d")
            + vector(2, b"k" * 32),
        )
        alpn = vector(2, vector(1, b"h2") + vector(1, b"http/1.1"))
        record = client_hello_record([(0, b""), (10, groups), (51, shares), (16, alpn)])
        self.assertEqual(
            parse_client_offer(record),
            ClientOffer(
                groups=(0x2A2A, 0x11EC, X25519, SECP256R1, SECP384R1),
                key_shares=(0x2A2A, 0x11EC, X25519),
                alpn=(b"h2", b"http/1.1"),
            ),
        )

    def test_split_over_records(self) -> None:
        """A ClientHello fragmented over several records is reassembled."""
        record = client_hello_record([(10, vector(2, bytes.fromhex("001d0017")))])
        message = record[5:]
        pieces = [message[i : i + 7] for i in range(0, len(message), 7)]
        stream = b"".join(b"\x16\x03\x01" + vector(2, piece) for piece in pieces)
        offer = parse_client_offer(stream)
        assert offer is not None
        self.assertEqual(offer.groups, (X25519, SECP256R1))


class MalformedTests(SynchronousTestCase):
    """Bytes that are not a handshake."""

    def test_not_tls(self) -> None:
        """Plaintext, an alert and empty input give None."""
        for data in (b"", b"GET / HTTP/1.1\r\n\r\n", bytes.fromhex("15030300020228")):
            self.assertIsNone(parse_client_offer(data))
            self.assertIsNone(parse_server_choice(data, ecdhe=True))

    def test_lengths_past_the_end(self) -> None:
        """A hello whose inner lengths point past its end gives None."""
        body = b"\x03\x03" + b"\0" * 32 + b"\xff"
        message = b"\x01" + len(body).to_bytes(3, "big") + body
        record = b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
        self.assertIsNone(parse_client_offer(record))
        self.assertIsNone(
            parse_server_choice(b"\x16\x03\x03" + record[3:5] + b"\x02" + message[1:], ecdhe=True)
        )

    def test_hello_without_extensions(self) -> None:
        """A ClientHello with no extensions offers nothing."""
        body = b"\x03\x03" + b"\0" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
        message = b"\x01" + len(body).to_bytes(3, "big") + body
        record = b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
        self.assertEqual(parse_client_offer(record), ClientOffer((), (), ()))

    @given(st.binary(max_size=600), st.booleans())
    def test_any_bytes(self, data: bytes, flag: bool) -> None:
        """Any bytes, with or without a handshake record header, never raise."""
        for stream in (data, b"\x16\x03\x03" + len(data).to_bytes(2, "big") + data):
            parse_client_offer(stream)
            parse_server_choice(stream, ecdhe=flag)
