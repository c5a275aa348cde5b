"""Tests for :mod:`secure_echo.wire.proxy`: the PROXY header parser and builders."""

from __future__ import annotations

import ipaddress
import itertools
from typing import TYPE_CHECKING, Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.wire.proxy import (
    LOCAL,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    PROXY,
    PROXY_MALFORMED,
    PROXY_MISSING,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    build_v1_header,
    build_v2_header,
    crc32c,
    encode_tlvs,
    looks_like_proxy,
    parse_header,
    ssl_tlv,
)

if TYPE_CHECKING:
    from collections.abc import Sequence


#: Hypothesis budget: enough to find buffering bugs, small enough for CI.
PROPERTY = settings(max_examples=200, deadline=None, database=None)

#: A TLS 1.x ClientHello record header: what a client that skips the balancer sends.
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32
BALANCER = IPv4Address("TCP", "127.0.0.1", 40000)
STRANGER = IPv4Address("TCP", "198.51.100.9", 40001)
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


def v2_tcp4(**kwargs: Any) -> bytes:
    """A v2 PROXY header for 203.0.113.7:51234 -> 192.0.2.1:443."""
    return build_v2_header(("203.0.113.7", 51234), ("192.0.2.1", 443), **kwargs)


def raw_v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header from its parts, with no checks at all (for malformed input)."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + body


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Split ``data`` at the given offsets (any order, repeats and ends allowed)."""
    points = [0, *sorted({c for c in cuts if 0 <= c <= len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed(pieces: Sequence[bytes]) -> tuple[ProxyHeader, bytes]:
    """Feed pieces to the parser the way the reader does; return (header, rest).

    Every call before the header is complete must answer ``None``.
    """
    buffer = bytearray()
    for index, piece in enumerate(pieces):
        buffer += piece
        header = parse_header(buffer)
        if header is not None:
            rest = bytes(buffer[header.consumed :]) + b"".join(pieces[index + 1 :])
            return header, rest
    msg = f"no header in {bytes(buffer)!r}"
    raise AssertionError(msg)


class ParserCase(SynchronousTestCase):
    """Helpers for parser tests."""

    def assert_rejected(self, data: bytes, reason: str, text: str) -> ProxyProtocolError:
        """Parsing ``data`` raises ``reason``, and its text contains ``text``."""
        error: ProxyProtocolError = self.assertRaises(ProxyProtocolError, parse_header, data)
        self.assertEqual(error.reason, reason, str(error))
        self.assertIn(text, error.text)
        self.assertEqual(str(error), f"{reason}: {error.text}")
        return error

    def assert_needs_more(self, data: bytes) -> None:
        """Every proper prefix of a header parses as "need more bytes"."""
        for size in range(len(data)):
            self.assertIsNone(parse_header(data[:size]), size)


class LooksLikeProxyTests(SynchronousTestCase):
    """:func:`looks_like_proxy` decides from the first bytes."""

    def test_too_short_to_tell(self) -> None:
        """Empty input and proper prefixes of either signature are undecided."""
        for prefix in (b"", b"P", b"PROXY", b"\r", b"\r\n\r\n", V2_SIGNATURE[:11]):
            self.assertIsNone(looks_like_proxy(prefix), prefix)

    def test_headers(self) -> None:
        """``PROXY`` and a space, or the whole v2 signature, start a header."""
        self.assertIs(looks_like_proxy(b"PROXY "), True)
        self.assertIs(looks_like_proxy(b"PROXY TCP4 1.2"), True)
        self.assertIs(looks_like_proxy(V2_SIGNATURE), True)
        self.assertIs(looks_like_proxy(bytearray(V2_SIGNATURE + b"\x21")), True)

    def test_not_headers(self) -> None:
        """A TLS record, a plaintext line or a near miss is decided at once."""
        for prefix in (b"\x16", CLIENT_HELLO, b"PING\n", b"PROXY\t", b"\r\n\r\nX", b"GET /"):
            self.assertIs(looks_like_proxy(prefix), False, prefix)


class V1Tests(ParserCase):
    """Version 1: the text header."""

    def test_tcp4(self) -> None:
        """A TCP4 header gives both endpoints; ``consumed`` ends at its CRLF."""
        data = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n"
        header = parse_header(data + b"\x16rest")
        self.assertEqual(
            header,
            ProxyHeader(1, PROXY, "TCP4", ("203.0.113.7", 51234), ("192.0.2.1", 443), len(data)),
        )

    def test_tcp6(self) -> None:
        """A TCP6 header's addresses come back in compressed form."""
        data = b"PROXY TCP6 2001:db8:0:0::1 ::ffff:192.0.2.1 0 65535\r\n"
        header = parse_header(data)
        assert header is not None
        self.assertEqual(header.family, "TCP6")
        self.assertEqual(header.source, ("2001:db8::1", 0))
        self.assertEqual(header.destination, ("::ffff:c000:201", 65535))
        self.assertEqual(header.consumed, len(data))

    def test_unknown(self) -> None:
        """UNKNOWN, bare or followed by anything, carries no addresses."""
        for data in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
            header = parse_header(data + b"more")
            self.assertEqual(header, ProxyHeader(1, PROXY, "UNKNOWN", None, None, len(data)))

    def test_longest(self) -> None:
        """A 107-byte header is accepted; 107 bytes without CRLF are not."""
        data = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
        self.assertEqual(len(data), V1_MAX_LENGTH)
        header = parse_header(data)
        assert header is not None
        self.assertEqual(header.consumed, V1_MAX_LENGTH)
        self.assert_rejected(data[:-2] + b"xx", PROXY_MALFORMED, "no CRLF within 107 bytes")
        self.assert_rejected(data[:-2] + b"x\r\n", PROXY_MALFORMED, "no CRLF within 107 bytes")

    def test_incomplete(self) -> None:
        """Every prefix of a header, up to its last byte, needs more bytes."""
        self.assert_needs_more(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")

    def test_bad_ports(self) -> None:
        """Ports are decimal 0..65535 without sign or leading zeros."""
        for port in (b"65536", b"0080", b"-1", b"+1", b"abc", b"", b"123456", b"\xd9\xa1"):
            data = b"PROXY TCP4 1.2.3.4 5.6.7.8 " + port + b" 80\r\n"
            reason = "not ASCII" if not port.isascii() else "is not a decimal number"
            self.assert_rejected(data, PROXY_MALFORMED, reason)

    def test_bad_addresses(self) -> None:
        """Addresses must be valid and of the named family."""
        for family, address in (
            (b"TCP4", b"::1"),
            (b"TCP4", b"256.1.1.1"),
            (b"TCP4", b"01.2.3.4"),
            (b"TCP6", b"1.2.3.4"),
            (b"TCP6", b"fe80::1%eth0"),
            (b"TCP6", b"host.example"),
        ):
            data = b"PROXY " + family + b" " + address + b" " + address + b" 1 2\r\n"
            self.assert_rejected(data, PROXY_MALFORMED, "is not valid")

    def test_bad_shapes(self) -> None:
        """Wrong protocols, field counts, line ends and bytes are malformed."""
        cases = [
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "is not TCP4, TCP6 or UNKNOWN"),
            (b"PROXY \r\n", "is not TCP4, TCP6 or UNKNOWN"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "needs 6 space-separated fields, got 5"),
            (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "got 7"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "LF without CR"),
            (b"PROXY UNKNOWN \xff\r\n", "not ASCII"),
        ]
        for data, text in cases:
            self.assert_rejected(data, PROXY_MALFORMED, text)

    def test_not_a_header(self) -> None:
        """Bytes that do not start like a header are ``proxy_missing``."""
        self.assert_rejected(CLIENT_HELLO, PROXY_MISSING, "TLS handshake record (0x16)")
        self.assert_rejected(b"PROXZ TCP4", PROXY_MISSING, "start with b'PROXZ TC'")

    def test_builder(self) -> None:
        """The v1 builder writes what the parser reads."""
        data = build_v1_header(("2001:db8::1", 1), ("2001:db8::2", 2))
        self.assertEqual(data, b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
        self.assertEqual(build_v1_header(), b"PROXY UNKNOWN\r\n")
        header = parse_header(build_v1_header(("10.0.0.1", 3), ("10.0.0.2", 4)))
        assert header is not None
        self.assertEqual((header.source, header.destination), (("10.0.0.1", 3), ("10.0.0.2", 4)))


class V2Tests(ParserCase):
    """Version 2: the binary header."""

    def test_proxy_tcp4(self) -> None:
        """A TCP4 PROXY header gives both endpoints and is 28 bytes long."""
        data = v2_tcp4()
        self.assertEqual(len(data), 28)
        header = parse_header(data + CLIENT_HELLO)
        self.assertEqual(
            header,
            ProxyHeader(2, PROXY, "TCP4", ("203.0.113.7", 51234), ("192.0.2.1", 443), 28),
        )

    def test_proxy_tcp6(self) -> None:
        """A TCP6 PROXY header gives both endpoints and is 52 bytes long."""
        data = build_v2_header(("2001:db8::7", 1), ("2001:db8::1", 65535))
        header = parse_header(data)
        self.assertEqual(
            header, ProxyHeader(2, PROXY, "TCP6", ("2001:db8::7", 1), ("2001:db8::1", 65535), 52)
        )

    def test_proxy_unix(self) -> None:
        """A UNIX header gives both paths (NUL padding removed, abstract names kept)."""
        data = build_v2_header(b"/run/client.sock", b"\x00abstract")
        header = parse_header(data)
        assert header is not None
        self.assertEqual(header.family, "UNIX")
        self.assertEqual(header.consumed, 16 + 216)
        self.assertIsNone(header.source)
        self.assertEqual(header.source_path, b"/run/client.sock")
        self.assertEqual(header.destination_path, b"\x00abstract")

    def test_local(self) -> None:
        """LOCAL (a balancer's health check) carries no addresses, even if sent."""
        for data in (
            build_v2_header(command=LOCAL),
            build_v2_header(("1.2.3.4", 1), ("5.6.7.8", 2), command=LOCAL),
            raw_v2(0x20, 0x12, bytes(12)),  # LOCAL ignores even a UDP family
        ):
            header = parse_header(data + b"next")
            assert header is not None
            self.assertEqual(header.command, LOCAL)
            self.assertEqual((header.source, header.destination), (None, None))
            self.assertEqual(header.consumed, len(data))

    def test_unspec(self) -> None:
        """A PROXY command with the UNSPEC family carries no addresses."""
        header = parse_header(build_v2_header())
        self.assertEqual(header, ProxyHeader(2, PROXY, "UNSPEC", None, None, 16))

    def test_incomplete(self) -> None:
        """Every prefix of a header with TLVs, up to its last byte, needs more bytes."""
        self.assert_needs_more(v2_tcp4(tlvs=[(PP2_TYPE_ALPN, b"h2")], crc=True))

    def test_tlvs(self) -> None:
        """Known TLVs are named; custom, experimental and other types are numbered."""
        tlvs = [
            (PP2_TYPE_ALPN, b"h2"),
            (PP2_TYPE_AUTHORITY, b"echo.example"),
            (PP2_TYPE_NOOP, b"\x00" * 3),
            (PP2_TYPE_UNIQUE_ID, b"u" * 128),
            (PP2_TYPE_NETNS, b"blue"),
            (0xEA, b"vpce-1"),
            (0xF1, b""),
            (0x42, b"?"),
        ]
        header = parse_header(v2_tcp4(tlvs=tlvs))
        assert header is not None
        self.assertEqual([(t.type, t.value) for t in header.tlvs], tlvs)
        self.assertEqual(
            [t.name for t in header.tlvs],
            [
                "ALPN",
                "AUTHORITY",
                "NOOP",
                "UNIQUE_ID",
                "NETNS",
                "CUSTOM_0xEA",
                "EXPERIMENT_0xF1",
                "0x42",
            ],
        )
        self.assertEqual(header.tlv(PP2_TYPE_AUTHORITY), b"echo.example")
        self.assertIsNone(header.tlv(PP2_TYPE_CRC32C))
        self.assertIsNone(header.ssl)

    def test_ssl(self) -> None:
        """The SSL TLV gives its client bits, verify result and named sub-TLVs."""
        value = ssl_tlv(
            PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN,
            0,
            [
                (PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3"),
                (PP2_SUBTYPE_SSL_CN, b"client.example"),
                (PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_128_GCM_SHA256"),
                (0x26, b"X25519"),
                (0x28, b"\x30\x82"),
                (0x2F, b"?"),
            ],
        )
        header = parse_header(v2_tcp4(tlvs=[(PP2_TYPE_SSL, value)]))
        assert header is not None
        info = header.ssl
        assert info is not None
        self.assertEqual(header.tlvs[0].name, "SSL")
        self.assertEqual(info.client, PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN)
        self.assertEqual(info.verify, 0)
        self.assertEqual(
            [t.name for t in info.tlvs],
            ["SSL_VERSION", "SSL_CN", "SSL_CIPHER", "SSL_GROUP", "SSL_CLIENT_CERT", "0x2F"],
        )
        self.assertEqual(info.value(PP2_SUBTYPE_SSL_CN), b"client.example")
        self.assertIsNone(info.value(0x24))

    def test_ssl_malformed(self) -> None:
        """An SSL TLV too short for its fixed part, or with a broken sub-TLV, is refused."""
        self.assert_rejected(
            v2_tcp4(tlvs=[(PP2_TYPE_SSL, b"\x01\x00\x00")]), PROXY_MALFORMED, "fewer than the 5"
        )
        broken = ssl_tlv(1, 0) + b"\x21\x00\x09TLSv1"
        self.assert_rejected(
            v2_tcp4(tlvs=[(PP2_TYPE_SSL, broken)]),
            PROXY_MALFORMED,
            "TLV SSL_VERSION declares 9 bytes but only 5 remain",
        )

    def test_crc32c(self) -> None:
        """A correct CRC32C TLV is accepted; one flipped bit anywhere is refused."""
        data = v2_tcp4(tlvs=[(PP2_TYPE_ALPN, b"h2")], crc=True)
        header = parse_header(data)
        assert header is not None
        self.assertEqual(header.tlvs[-1].name, "CRC32C")
        for index in (12, 20, len(data) - 8, len(data) - 1):
            bad = bytearray(data)
            bad[index] ^= 0x01
            self.assert_rejected(bytes(bad), PROXY_MALFORMED, "CRC32C mismatch")

    def test_crc32c_shape(self) -> None:
        """A CRC32C TLV must be 4 bytes, and only one may be present."""
        self.assert_rejected(
            v2_tcp4(tlvs=[(PP2_TYPE_CRC32C, b"\x00" * 3)]), PROXY_MALFORMED, "has 3 bytes, not 4"
        )
        self.assert_rejected(
            v2_tcp4(tlvs=[(PP2_TYPE_CRC32C, b"\x00" * 4)], crc=True),
            PROXY_MALFORMED,
            "more than one CRC32C",
        )

    def test_crc32c_function(self) -> None:
        """The checksum is CRC-32C (Castagnoli): its standard check value."""
        self.assertEqual(crc32c(b"123456789"), 0xE3069283)
        self.assertEqual(crc32c(b""), 0)

    def test_bad_signature(self) -> None:
        """A near miss of the v2 signature is not a header."""
        data = bytearray(v2_tcp4())
        data[6] = 0x0B
        self.assert_rejected(bytes(data), PROXY_MISSING, "not a PROXY header")

    def test_bad_version_command_family(self) -> None:
        """Version 2 only, LOCAL or PROXY only, defined address families only."""
        body = bytes(12)
        cases = [
            (raw_v2(0x11, 0x11, body), "version 1, not 2"),
            (raw_v2(0x31, 0x11, body), "version 3, not 2"),
            (raw_v2(0x22, 0x11, body), "command 2 is neither LOCAL"),
            (raw_v2(0x21, 0x41, body), "byte 0x41 is not defined"),
            (raw_v2(0x21, 0x13, body), "byte 0x13 is not defined"),
            (raw_v2(0x21, 0x10, body), "byte 0x10 is not defined"),
            (raw_v2(0x21, 0x12, body), "UDP4 datagram flow"),
            (raw_v2(0x21, 0x32, bytes(216)), "UNIX_DGRAM datagram flow"),
        ]
        for data, text in cases:
            self.assert_rejected(data, PROXY_MALFORMED, text)

    def test_truncated_addresses(self) -> None:
        """A declared length shorter than the family's addresses is refused."""
        self.assert_rejected(
            raw_v2(0x21, 0x11, bytes(8)), PROXY_MALFORMED, "length 8 is shorter than the TCP4"
        )
        self.assert_rejected(
            raw_v2(0x21, 0x21, bytes(12)), PROXY_MALFORMED, "shorter than the TCP6 addresses (36)"
        )

    def test_tlv_beyond_length(self) -> None:
        """A TLV longer than what the declared length leaves, or cut short, is refused."""
        addresses = v2_tcp4()[16:]
        overrun = raw_v2(0x21, 0x11, addresses + b"\x01\x00\x05h2")
        self.assert_rejected(
            overrun, PROXY_MALFORMED, "TLV ALPN declares 5 bytes but only 2 remain"
        )
        for tail in (b"\x01", b"\x01\x00"):
            self.assert_rejected(
                raw_v2(0x21, 0x11, addresses + tail), PROXY_MALFORMED, "is cut short"
            )
        self.assert_rejected(
            v2_tcp4(tlvs=[(PP2_TYPE_UNIQUE_ID, b"u" * 129)]), PROXY_MALFORMED, "more than 128"
        )

    def test_longest(self) -> None:
        """The largest declared length (65535) is read whole once it is all there."""
        data = v2_tcp4(tlvs=[(PP2_TYPE_NOOP, b"\x00" * (65535 - 12 - 3))])
        self.assertEqual(len(data), 16 + 65535)
        self.assertIsNone(parse_header(data[:-1]))
        header = parse_header(data + b"x")
        assert header is not None
        self.assertEqual(header.consumed, len(data))

    def test_builder_errors(self) -> None:
        """The builder refuses endpoints and TLVs that cannot be encoded."""
        for source, destination in (
            (("1.2.3.4", 1), ("::1", 2)),
            (b"a" * 109, b"b"),
            (("1.2.3.4", 1), None),
            (b"/a", ("1.2.3.4", 1)),
        ):
            self.assertRaises(ValueError, build_v2_header, source, destination)
        self.assertRaises(ValueError, encode_tlvs, [(256, b"")])
        self.assertRaises(ValueError, v2_tcp4, tlvs=[(PP2_TYPE_NOOP, bytes(65535))])


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A valid v1 or v2 header with random endpoints and (for v2) random TLVs."""
    ipv6 = draw(st.booleans())
    address = st.ip_addresses(v=6 if ipv6 else 4).map(str)
    port = st.integers(0, 65535)
    source = (draw(address), draw(port))
    destination = (draw(address), draw(port))
    if draw(st.booleans()):
        return build_v1_header(source, destination)
    tlv_type = st.integers(0, 255).filter(
        lambda t: t not in {PP2_TYPE_CRC32C, PP2_TYPE_SSL, PP2_TYPE_UNIQUE_ID}
    )
    tlvs = draw(st.lists(st.tuples(tlv_type, st.binary(max_size=40)), max_size=4))
    return build_v2_header(source, destination, tlvs=tlvs, crc=draw(st.booleans()))


class SplitTests(SynchronousTestCase):
    """However a header and what follows it are split into reads, nothing changes."""

    def test_every_split_point(self) -> None:
        """Each header split in two at every offset gives the same header and rest."""
        payload = CLIENT_HELLO
        for data in (
            build_v1_header(("203.0.113.7", 51234), ("192.0.2.1", 443)),
            v2_tcp4(tlvs=[(PP2_TYPE_SSL, ssl_tlv(1, 0, [(0x21, b"TLSv1.3")]))], crc=True),
            build_v2_header(b"/client", b"/server"),
        ):
            whole = parse_header(data)
            for cut in range(len(data) + len(payload) + 1):
                self.assertEqual(feed(split_at(data + payload, [cut])), (whole, payload), cut)
            for size in range(1, 10):
                pieces = [
                    (data + payload)[i : i + size] for i in range(0, len(data + payload), size)
                ]
                self.assertEqual(feed(pieces), (whole, payload), size)

    @PROPERTY
    @given(headers(), st.binary(max_size=64), st.lists(st.integers(0, 400), max_size=8))
    def test_any_split(self, data: bytes, payload: bytes, cuts: list[int]) -> None:
        """Any split of a valid header + payload gives the whole header and the payload."""
        whole = parse_header(data)
        assert whole is not None
        self.assertEqual(whole.consumed, len(data))
        self.assertEqual(feed(split_at(data + payload, cuts)), (whole, payload))

    @PROPERTY
    @given(
        st.ip_addresses().map(str),
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.lists(st.tuples(st.integers(0xE0, 0xEF), st.binary(max_size=300)), max_size=3),
    )
    def test_round_trip(self, host: str, sport: int, dport: int, tlvs: list[Any]) -> None:
        """What the v2 builder writes, the parser reads back."""
        other = "::1" if ":" in host else "127.0.0.1"
        header = parse_header(build_v2_header((host, sport), (other, dport), tlvs=tlvs))
        assert header is not None
        self.assertEqual(header.source, (str(ipaddress.ip_address(host)), sport))
        self.assertEqual(header.destination, (other, dport))
        self.assertEqual([(t.type, t.value) for t in header.tlvs], tlvs)
