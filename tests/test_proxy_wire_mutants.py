"""Edges of the PROXY protocol codec that mutation testing found untested.

Each test pins down one behaviour a balancer or an operator would notice if it
broke: a v1 header followed by client data with CRLF in it, TLVs of 256 bytes or
more, the smallest SSL TLV, datagram families on a stream listener, a CRC32C TLV
that is not the last one, the TLV type ranges, abstract UNIX names, the limits
of the builders, and the exact text of each refusal.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from secure_echo.wire import proxy
from secure_echo.wire.proxy import (
    LOCAL,
    PP2_TYPE_ALPN,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PROXY,
    PROXY_MALFORMED,
    PROXY_MISSING,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    build_v1_header,
    build_v2_header,
    crc32c,
    encode_tlvs,
    parse_header,
    ssl_tlv,
)

TCP4 = (("192.0.2.1", 40000), ("198.51.100.2", 443))


def raw_v2(fam: int, body: bytes, ver_cmd: int = 0x21) -> bytes:
    """A v2 header with ``body`` as it stands (addresses and TLVs), length filled in."""
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + len(body).to_bytes(2, "big") + body


def parsed(data: bytes) -> ProxyHeader:
    """``parse_header(data)``, which must be complete."""
    header = parse_header(data)
    assert header is not None, "incomplete header"
    return header


class ErrorTests(SynchronousTestCase):
    """The error's parts, and the exact text of refusals an operator reads."""

    def refusal(self, data: bytes) -> ProxyProtocolError:
        """The error ``parse_header`` raises for ``data``."""
        error: ProxyProtocolError = self.assertRaises(ProxyProtocolError, parse_header, data)
        return error

    def test_error_arguments(self) -> None:
        """The error carries its reason and text as its arguments too."""
        error = ProxyProtocolError(PROXY_MALFORMED, "bad")
        self.assertEqual(error.args, (PROXY_MALFORMED, "bad"))
        self.assertEqual(str(error), "proxy_malformed: bad")

    def test_tls_instead_of_a_header(self) -> None:
        """A TLS record where the header should be is named as such."""
        error = self.refusal(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00")
        self.assertEqual(error.reason, PROXY_MISSING)
        self.assertEqual(
            error.text,
            "the first bytes are not a PROXY header: a TLS handshake record (0x16): "
            "the client did not come through the balancer",
        )

    def test_v1_texts(self) -> None:
        """v1 refusals quote the offending field, cut to a readable length."""
        cases = {
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n": "v1 header line ends in LF without CR",
            b"PROXY TCP4 \xff 5.6.7.8 1 2\r\n": "v1 header is not ASCII",
            b"PROXY " + b"X" * 20 + b" a b 1 2\r\n": (
                "v1 protocol 'XXXXXXXXXXXXXXXX' is not TCP4, TCP6 or UNKNOWN"
            ),
            b"PROXY TCP6 " + b"1" * 50 + b" ::1 1 2\r\n": (
                "v1 TCP6 address '" + "1" * 45 + "' is not valid"
            ),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 123456789 2\r\n": (
                "v1 port '12345678' is not a decimal number 0..65535"
            ),
        }
        for data, text in cases.items():
            error = self.refusal(data)
            self.assertEqual((error.reason, error.text), (PROXY_MALFORMED, text), data)

    def test_v2_tlv_texts(self) -> None:
        """v2 TLV refusals say where and how much."""
        addresses = build_v2_header(*TCP4)[16:]
        cut = raw_v2(0x11, addresses + b"\x04\x00")
        self.assertEqual(self.refusal(cut).text, "v2 TLV at offset 28 is cut short (2 bytes left)")
        long = raw_v2(0x11, addresses + b"\x04\x00\x09abc")
        self.assertEqual(
            self.refusal(long).text,
            "v2 TLV NOOP declares 9 bytes but only 3 remain in the header",
        )
        crc = encode_tlvs([(PP2_TYPE_CRC32C, b"\x00" * 4)])
        twice = raw_v2(0x11, addresses + crc + crc)
        self.assertEqual(self.refusal(twice).text, "v2 header has more than one CRC32C TLV")


class V1Tests(SynchronousTestCase):
    """v1 headers followed by the client's own bytes."""

    def test_client_data_with_crlf_in_the_same_read(self) -> None:
        """The header ends at its first CRLF, whatever CRLFs the data after it holds."""
        header = build_v1_header(*TCP4)
        data = header + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        result = parsed(data)
        self.assertEqual(result.consumed, len(header))
        self.assertEqual((result.source, result.destination), TCP4)

    def test_unknown_when_either_end_is_missing(self) -> None:
        """With only one end known the builder says UNKNOWN."""
        self.assertEqual(build_v1_header(TCP4[0], None), b"PROXY UNKNOWN\r\n")
        self.assertEqual(build_v1_header(None, TCP4[1]), b"PROXY UNKNOWN\r\n")


class TLVTests(SynchronousTestCase):
    """TLV sizes, SSL TLVs and names."""

    def test_tlv_of_256_bytes_and_more(self) -> None:
        """Lengths use both bytes: values of 256 and 300 bytes come out whole."""
        for size in (256, 300, 4096):
            value = bytes(i % 256 for i in range(size))
            header = parsed(build_v2_header(*TCP4, tlvs=[(PP2_TYPE_ALPN, value), (0x04, b"z")]))
            self.assertEqual(header.tlv(PP2_TYPE_ALPN), value)
            self.assertEqual(header.tlv(PP2_TYPE_NOOP), b"z")

    def test_sub_tlv_of_256_bytes(self) -> None:
        """An SSL sub-TLV of 300 bytes comes out whole."""
        value = b"c" * 300
        header = parsed(
            build_v2_header(*TCP4, tlvs=[(PP2_TYPE_SSL, ssl_tlv(1, 0, [(0x22, value)]))])
        )
        info = header.ssl
        assert info is not None
        self.assertEqual(info.value(0x22), value)

    def test_minimal_ssl_tlv(self) -> None:
        """Five bytes, client bits and verify result with no sub-TLV, is a valid SSL TLV."""
        tlv = ssl_tlv(0x07, 0x01020304)
        self.assertEqual(len(tlv), 5)
        header = parsed(build_v2_header(*TCP4, tlvs=[(PP2_TYPE_SSL, tlv)]))
        info = header.ssl
        assert info is not None
        self.assertEqual((info.client, info.verify, info.tlvs), (0x07, 0x01020304, ()))

    def test_four_byte_ssl_tlv_is_refused(self) -> None:
        """Fewer than five bytes cannot hold client and verify."""
        data = build_v2_header(*TCP4, tlvs=[(PP2_TYPE_SSL, b"\x01\x00\x00\x00")])
        error = self.assertRaises(ProxyProtocolError, parse_header, data)
        self.assertEqual(
            error.text, "v2 SSL TLV has 4 bytes, fewer than the 5 of client and verify"
        )

    def test_names_of_the_ranges(self) -> None:
        """Custom (0xE0-0xEF) and experimental (0xF0-0xF7) types are named by range."""
        names = {
            0xDF: "0xDF",
            0xE0: "CUSTOM_0xE0",
            0xEF: "CUSTOM_0xEF",
            0xF0: "EXPERIMENT_0xF0",
            0xF7: "EXPERIMENT_0xF7",
            0xF8: "0xF8",
        }
        header = parsed(build_v2_header(*TCP4, tlvs=[(t, b"v") for t in names]))
        self.assertEqual({t.type: t.name for t in header.tlvs}, names)

    def test_encode_limits(self) -> None:
        """Types are one byte and values at most 65535 bytes long."""
        self.assertEqual(len(encode_tlvs([(0xFF, b"x" * 0xFFFF)])), 3 + 0xFFFF)
        for bad in ((256, b""), (-1, b""), (1, b"x" * 0x10000)):
            error = self.assertRaises(ValueError, encode_tlvs, [bad])
            self.assertEqual(
                str(error), f"TLV type {bad[0]} or its {len(bad[1])}-byte value does not fit"
            )


class CRCTests(SynchronousTestCase):
    """The CRC32C table and a CRC32C TLV anywhere in the header."""

    def test_table(self) -> None:
        """The table gives the standard check value of CRC-32C for b"123456789"."""
        table = proxy._make_crc32c_table()
        self.assertEqual(len(table), 256)
        crc = 0xFFFFFFFF
        for byte in b"123456789":
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        self.assertEqual(crc ^ 0xFFFFFFFF, 0xE3069283)
        self.assertEqual(crc32c(b"123456789"), 0xE3069283)

    def test_crc_tlv_before_another(self) -> None:
        """A CRC32C TLV followed by another TLV is checked over the whole header."""
        addresses = build_v2_header(*TCP4)[16:]
        body = addresses + encode_tlvs([(PP2_TYPE_CRC32C, b"\x00" * 4), (PP2_TYPE_NOOP, b"pad")])
        zeroed = raw_v2(0x11, body)
        offset = 16 + len(addresses) + 3
        good = zeroed[:offset] + crc32c(zeroed).to_bytes(4, "big") + zeroed[offset + 4 :]
        header = parsed(good)
        self.assertEqual(header.tlv(PP2_TYPE_NOOP), b"pad")
        bad = good[:-1] + b"q"
        error = self.assertRaises(ProxyProtocolError, parse_header, bad)
        self.assertTrue(error.text.startswith("v2 CRC32C mismatch"), error.text)


class FamilyTests(SynchronousTestCase):
    """Families and commands, and what each header carries."""

    def test_datagram_families_refused(self) -> None:
        """UDP4, UDP6 and UNIX_DGRAM describe datagrams: refused on a stream listener."""
        for fam, name, size in ((0x12, "UDP4", 12), (0x22, "UDP6", 36), (0x32, "UNIX_DGRAM", 216)):
            error = self.assertRaises(
                ProxyProtocolError, parse_header, raw_v2(fam, b"\x00" * size)
            )
            self.assertEqual(
                error.text,
                f"v2 header describes a {name} datagram flow; this is a stream listener",
            )

    def test_unix_header(self) -> None:
        """A UNIX header is version 2, keeps its command, TLVs and both paths."""
        header = parsed(
            build_v2_header(b"/run/a.sock", b"/run/b.sock", tlvs=[(PP2_TYPE_NOOP, b"n")])
        )
        self.assertEqual(
            (header.version, header.command, header.family, header.tlv(PP2_TYPE_NOOP)),
            (2, PROXY, "UNIX", b"n"),
        )
        self.assertEqual(
            (header.source_path, header.destination_path), (b"/run/a.sock", b"/run/b.sock")
        )

    def test_abstract_unix_name_ending_in_x(self) -> None:
        """An abstract name keeps its leading NUL and every byte but the padding."""
        header = parsed(build_v2_header(b"\x00nameX", b"\x00XX"))
        self.assertEqual((header.source_path, header.destination_path), (b"\x00nameX", b"\x00XX"))

    def test_local_keeps_tlvs(self) -> None:
        """A LOCAL header (a health check) still carries its TLVs."""
        header = parsed(build_v2_header(*TCP4, command=LOCAL, tlvs=[(PP2_TYPE_NOOP, b"hc")]))
        self.assertEqual((header.command, header.source), (LOCAL, None))
        self.assertEqual(header.tlv(PP2_TYPE_NOOP), b"hc")


class BuilderTests(SynchronousTestCase):
    """The header builders' limits and messages."""

    def test_unix_path_of_108_bytes(self) -> None:
        """A path of exactly 108 bytes fits; 109 does not."""
        path = b"/" + b"p" * 107
        header = parsed(build_v2_header(path, b"/b"))
        self.assertEqual(header.source_path, path)
        error = self.assertRaises(ValueError, build_v2_header, path + b"q", b"/b")
        self.assertEqual(str(error), "UNIX paths are at most 108 bytes")

    def test_mixed_ip_versions(self) -> None:
        """Source and destination must be of one IP version."""
        error = self.assertRaises(ValueError, build_v2_header, ("192.0.2.1", 1), ("::1", 2))
        self.assertEqual(
            str(error), "source 192.0.2.1 and destination ::1 are of different IP versions"
        )

    def test_mixed_endpoint_kinds(self) -> None:
        """An address and a path cannot be mixed."""
        error = self.assertRaises(ValueError, build_v2_header, ("192.0.2.1", 1), b"/p")
        self.assertEqual(
            str(error),
            "source and destination must both be (ip, port), both UNIX paths, or both None",
        )

    def test_body_limit(self) -> None:
        """The body may be 65535 bytes; one more does not fit the length field."""
        # UNSPEC: no addresses; one TLV of 65532 bytes makes a 65535-byte body.
        header = build_v2_header(tlvs=[(PP2_TYPE_NOOP, b"x" * 65532)])
        self.assertEqual(len(header), 16 + 65535)
        self.assertEqual(parsed(header).consumed, len(header))
        big = [(PP2_TYPE_NOOP, b"x" * 65532), (PP2_TYPE_NOOP, b"")]
        error = self.assertRaises(ValueError, build_v2_header, tlvs=big)
        self.assertEqual(str(error), "v2 header body of 65538 bytes exceeds 65535")
        one_over = [(PP2_TYPE_NOOP, b"x" * 65533)]
        error = self.assertRaises(ValueError, build_v2_header, tlvs=one_over)
        self.assertEqual(str(error), "v2 header body of 65536 bytes exceeds 65535")
