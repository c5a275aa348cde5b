"""Tests for :mod:`secure_echo.wire.ja4`: FoxIO's published values, real clients, ja4plus.

Three independent checks: the examples FoxIO publishes with their raw inputs (the
specification's worked example and the ``JA4_ro`` values of FoxIO's test captures,
rebuilt here into ClientHellos), the recorded hellos of real clients compared with
``ja4plus`` (an implementation written apart from FoxIO's and ours), and
hypothesis-generated hellos compared with ``ja4plus`` too.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from hypothesis import given, settings
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from secure_echo.wire.clienthello import (
    EXT_ALPN,
    EXT_KEY_SHARE,
    EXT_SERVER_NAME,
    EXT_SIGNATURE_ALGORITHMS,
    EXT_SUPPORTED_GROUPS,
    EXT_SUPPORTED_VERSIONS,
    ClientHello,
)
from secure_echo.wire.ja4 import (
    EMPTY_HASH,
    JA4,
    VERSION_CODES,
    alpn_code,
    fingerprints,
    ja4,
    version_code,
)
from tests.test_clienthello import (
    EXPECTED,
    Generated,
    HelloSpec,
    alpn_body,
    fixture,
    frame,
    hellos,
    key_share_body,
    parsed,
    sni_body,
    u16_list,
)

if TYPE_CHECKING:
    from collections.abc import Callable

#: Hypothesis budget for the comparison with ja4plus.
PROPERTY = settings(max_examples=300, deadline=None, database=None)

#: The shape of a JA4.
JA4_FORM = re.compile(
    r"^t(1[0-3]|s[23]|d[123]|00)[di]\d{4}[0-9A-Za-z]{2}_[0-9a-f]{12}_[0-9a-f]{12}$"
)

# -- FoxIO's published values --------------------------------------------------------

#: (JA4, JA4_r, JA4_o, JA4_ro, first ALPN value), from FoxIO-LLC/ja4: the worked
#: example of technical_details/JA4.md, then python/test/testdata/*.json for the
#: captures named.  JA4_ro gives the raw inputs; the first ALPN value is what the
#: two ALPN characters stand for.
PUBLISHED: list[tuple[str, str, str, str, bytes | None]] = [
    (  # JA4.md, "Example" and "Raw Output"
        "t13d1516h2_8daaf6152771_e5627efa2ab1",
        (
            "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,"
            "cca9_0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,"
            "0401,0503,0805,0501,0806,0601"
        ),
        "t13d1516h2_acb858a92679_18f69afefd3d",
        (
            "t13d1516h2_1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,"
            "0035_001b,0000,0033,0010,4469,0017,002d,000d,0005,0023,0012,002b,ff01,000b,000a,0015_"
            "0403,0804,0401,0503,0805,0501,0806,0601"
        ),
        b"h2",
    ),
    (  # https3-301-get.pcap: TLS 1.0, SNI the only extension, SCSV counted
        "t10d230100_6a57a6f57151_000000000000",
        (
            "t10d230100_0003,0004,0005,0006,0008,0009,000a,0011,0012,0013,0014,0015,0016,002f,"
            "0032,0033,0035,0038,0039,0096,0099,009a,00ff_"
        ),
        "t10d230100_ce175d585f73_000000000000",
        (
            "t10d230100_0039,0038,0035,0016,0013,000a,0033,0032,002f,009a,0099,0096,0005,0004,"
            "0015,0012,0009,0014,0011,0008,0006,0003,00ff_0000"
        ),
        None,
    ),
    (  # latest.pcapng: TLS 1.2 without ALPN
        "t12d190800_d83cc789557e_7af1ed941c26",
        (
            "t12d190800_000a,002f,0035,003c,003d,009c,009d,c009,c00a,c013,c014,c023,c024,c027,"
            "c028,c02b,c02c,c02f,c030_0005,000a,000b,000d,0017,0023,ff01_0804,0805,0806,0401,0501,"
            "0201,0403,0503,0203,0202,0601,0603"
        ),
        "t12d190800_e8d5f427a2c5_5e98404dd3cc",
        (
            "t12d190800_c02c,c02b,c030,c02f,c024,c023,c028,c027,c00a,c009,c014,c013,009d,009c,"
            "003d,003c,0035,002f,000a_0000,0005,000a,000b,000d,0023,0017,ff01_0804,0805,0806,0401,"
            "0501,0201,0403,0503,0203,0202,0601,0603"
        ),
        None,
    ),
    (  # ipv6.pcapng: 46 suites, unusual signature values kept in their order
        "t12d4605h2_85626a9a5f7f_aaf95bb78ec9",
        (
            "t12d4605h2_0004,0005,000a,0016,002f,0033,0035,0039,003c,003d,0041,0045,0067,006b,"
            "0081,0084,0088,009c,009d,009e,009f,00ba,00be,00c0,00c4,00ff,c007,c008,c009,c00a,c011,"
            "c012,c013,c014,c023,c024,c027,c028,c02b,c02c,c02f,c030,cca8,cca9,ccaa,ff85_000a,000b,"
            "000d_0601,0603,efef,0501,0503,0401,0403,eeee,eded,0301,0303,0201,0203"
        ),
        "t12d4605h2_644f5d117d98_094daec7ec8d",
        (
            "t12d4605h2_c030,c02c,c028,c024,c014,c00a,009f,006b,0039,cca9,cca8,ccaa,ff85,00c4,"
            "0088,0081,009d,003d,0035,00c0,0084,c02f,c02b,c027,c023,c013,c009,009e,0067,0033,00be,"
            "0045,009c,003c,002f,00ba,0041,c011,c007,0005,0004,c012,c008,0016,000a,00ff_0000,000b,"
            "000a,000d,0010_0601,0603,efef,0501,0503,0401,0403,eeee,eded,0301,0303,0201,0203"
        ),
        b"h2",
    ),
    (  # tls-handshake.pcapng: TLS 1.3 without ALPN
        "t13d151400_8daaf6152771_de4a06bb82e3",
        (
            "t13d151400_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,"
            "cca9_0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,ff01_0403,0804,0401,"
            "0503,0805,0501,0806,0601"
        ),
        "t13d151400_acb858a92679_2f4561be1d1f",
        (
            "t13d151400_1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,"
            "0035_0033,002b,001b,0000,0012,002d,000d,000a,0005,0023,0017,ff01,000b,0015_0403,0804,"
            "0401,0503,0805,0501,0806,0601"
        ),
        None,
    ),
    (  # tls-handshake.pcapng: http/1.1 and pre_shared_key
        "t13d1517h1_8daaf6152771_6cdcb247c39b",
        (
            "t13d1517h1_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,"
            "cca9_0005,000a,000b,000d,0012,0015,0017,001b,0023,0029,002b,002d,0033,4469,ff01_0403,"
            "0804,0401,0503,0805,0501,0806,0601"
        ),
        "t13d1517h1_acb858a92679_98b2855b1dea",
        (
            "t13d1517h1_1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,"
            "0035_0000,0017,0005,002b,0012,0023,000a,0033,0010,002d,001b,4469,000b,000d,ff01,0015,"
            "0029_0403,0804,0401,0503,0805,0501,0806,0601"
        ),
        b"http/1.1",
    ),
    (  # macos_tcp_flags.pcap: 26 suites, a repeated signature value
        "t13d2613h2_2802a3db6c62_845d286b0d67",
        (
            "t13d2613h2_000a,002f,0035,003c,003d,009c,009d,1301,1302,1303,c008,c009,c00a,c012,"
            "c013,c014,c023,c024,c027,c028,c02b,c02c,c02f,c030,cca8,cca9_0005,000a,000b,000d,0012,"
            "0015,0017,002b,002d,0033,ff01_0403,0804,0401,0503,0203,0805,0805,0501,0806,0601,0201"
        ),
        "t13d2613h2_78a7dc604b78_93870a65b655",
        (
            "t13d2613h2_1301,1302,1303,c02c,c02b,c024,c023,c00a,c009,cca9,c030,c02f,c028,c027,"
            "c014,c013,cca8,009d,009c,003d,003c,0035,002f,c008,c012,000a_ff01,0000,0017,000d,0005,"
            "0012,0010,000b,0033,002d,002b,000a,0015_0403,0804,0401,0503,0203,0805,0805,0501,0806,"
            "0601,0201"
        ),
        b"h2",
    ),
    (  # badcurveball.pcap
        "t13d1615h2_46e7e9700bed_45f260be83e2",
        (
            "t13d1615h2_000a,002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,"
            "cca8,cca9_0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,ff01_0403,0804,"
            "0401,0503,0805,0501,0806,0601,0201"
        ),
        "t13d1615h2_45f31bb0a5cc_b0e5d31d5128",
        (
            "t13d1615h2_1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,"
            "0035,000a_0000,0017,ff01,000a,000b,0023,0010,0005,000d,0012,0033,002d,002b,001b,0015_"
            "0403,0804,0401,0503,0805,0501,0806,0601,0201"
        ),
        b"h2",
    ),
    (  # tls12.pcap: Firefox, delegated_credential and record_size_limit
        "t13d1715h2_5b57614c22b0_3d5424432f57",
        (
            "t13d1715h2_002f,0035,009c,009d,1301,1302,1303,c009,c00a,c013,c014,c02b,c02c,c02f,"
            "c030,cca8,cca9_0005,000a,000b,000d,0015,0017,001c,0022,0023,002b,002d,0033,ff01_0403,"
            "0503,0603,0804,0805,0806,0401,0501,0601,0203,0201"
        ),
        "t13d1715h2_5b234860e130_014157ec0da2",
        (
            "t13d1715h2_1301,1303,1302,c02b,c02f,cca9,cca8,c02c,c030,c00a,c009,c013,c014,009c,"
            "009d,002f,0035_0000,0017,ff01,000a,000b,0023,0010,0005,0022,0033,002b,000d,002d,001c,"
            "0015_0403,0503,0603,0804,0805,0806,0401,0501,0601,0203,0201"
        ),
        b"h2",
    ),
    (  # tls-non-ascii-alpn.pcapng: first ALPN value 0xba 0xad.  FoxIO's capture
        # data says "99" (an older rule, still in its Python and Rust code, FoxIO-LLC/ja4
        # issue 326); the specification's rule gives "bd": hex "baad", first and last.
        "t13d1516bd_8daaf6152771_e5627efa2ab1",
        (
            "t13d1516bd_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,"
            "cca9_0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,"
            "0401,0503,0805,0501,0806,0601"
        ),
        "t13d1516bd_acb858a92679_8fc3c02244b2",
        (
            "t13d1516bd_1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,"
            "0035_ff01,0033,002d,0005,4469,000d,0010,0023,001b,002b,0000,0012,000a,0017,000b,0015_"
            "0403,0804,0401,0503,0805,0501,0806,0601"
        ),
        b"\xba\xad",
    ),
]

_LEGACY = {"13": 0x0303, "12": 0x0303, "11": 0x0302, "10": 0x0301}


def hello_from_raw(ja4_ro: str, alpn: bytes | None, *, grease_signature: bool = True) -> bytes:
    """A ClientHello with the raw inputs ``ja4_ro`` shows, GREASE added everywhere.

    GREASE goes where clients put it (first cipher suite, first and last extension,
    first supported version and group, and one signature value) so that the
    fingerprint proves it ignores them.  ``grease_signature=False`` leaves the
    signature list exactly as ``ja4_ro`` has it (possibly empty).
    """
    part_a, ciphers, extensions, *rest = ja4_ro.split("_")
    version = part_a[1:3]
    algorithms = [int(v, 16) for v in rest[0].split(",")] if rest else []
    bodies: dict[int, bytes] = {
        EXT_SERVER_NAME: sni_body([(0, b"example.com")]),
        EXT_SUPPORTED_GROUPS: u16_list([0x3A3A, 0x001D, 0x0017]),
        EXT_SIGNATURE_ALGORITHMS: u16_list(
            [*algorithms[:1], 0x5A5A, *algorithms[1:]] if grease_signature else algorithms
        ),
        EXT_ALPN: alpn_body([alpn or b"", b"http/1.1"]),
        EXT_SUPPORTED_VERSIONS: u16_list([0x7A7A, 0x0304, 0x0303], 1),
        EXT_KEY_SHARE: key_share_body([(0x3A3A, b"\x00"), (0x001D, bytes(32))]),
    }
    listed = [int(e, 16) for e in extensions.split(",")] if extensions else []
    spec = HelloSpec(
        cipher_suites=[0x0A0A, *(int(c, 16) for c in ciphers.split(","))],
        extensions=[
            (0x1A1A, b""),
            *((kind, bodies.get(kind, b"")) for kind in listed),
            (0xFAFA, b"\x00"),
        ],
        legacy_version=_LEGACY[version],
        session_id=bytes(32),
    )
    return spec.wire()


class PublishedTests(SynchronousTestCase):
    """FoxIO's published JA4 values, from their raw inputs."""

    def test_published(self) -> None:
        """Each published JA4, JA4_r, JA4_o and JA4_ro is reproduced exactly."""
        for published_ja4, ja4_r, ja4_o, ja4_ro, alpn in PUBLISHED:
            hello = parsed(hello_from_raw(ja4_ro, alpn))
            self.assertTrue(hello.grease)
            self.assertEqual(
                fingerprints(hello), JA4(published_ja4, ja4_r, ja4_o, ja4_ro), published_ja4
            )
            self.assertEqual(ja4(hello), published_ja4)
            self.assertRegex(published_ja4, JA4_FORM)

    def test_extension_hash_without_signatures(self) -> None:
        """JA4.md: with no signature algorithms the list ends without '_': 6d807ffa2a79."""
        ja4_ro = PUBLISHED[0][3].rsplit("_", 1)[0]
        hello = parsed(hello_from_raw(ja4_ro, b"h2", grease_signature=False))
        self.assertEqual(hello.signature_algorithms, ())
        self.assertIn(EXT_SIGNATURE_ALGORITHMS, hello.extensions)
        result = fingerprints(hello)
        self.assertEqual(result.ja4, "t13d1516h2_8daaf6152771_6d807ffa2a79")
        self.assertFalse(result.ja4_r.endswith("_"))
        self.assertEqual(result.ja4_r.count("_"), 2)

    def test_spec_alpn_examples(self) -> None:
        """JA4.md's ALPN examples: letters and digits as they are, else hex ends."""
        examples = {
            b"h2": "h2",
            b"http/1.1": "h1",
            b"\xab": "ab",
            b"\x20": "20",
            b"\xab\xcd": "ad",
            b"\x20\x61": "21",
            b"\x30\xab": "3b",
            b"\x61\x20": "60",
            b"\x30\x31\xab\xcd": "3d",
            b"\x30\xab\xcd\x31": "01",
            b"a": "aa",
            b"Z": "ZZ",
            b"AB": "AB",
            b"@A": "41",
            b"0": "00",
            b"9/z": "9z",
            b"A-": "4d",
            b"~a": "71",
            b"\x2f": "2f",
            b"\x3a": "3a",
            b"\x40": "40",
            b"\x5b": "5b",
            b"\x60": "60",
            b"\x7b": "7b",
        }
        for value, code in examples.items():
            hello = parsed(HelloSpec(extensions=[(EXT_ALPN, alpn_body([value, b"h2"]))]).wire())
            self.assertEqual(alpn_code(hello), code, value)
            self.assertEqual(ja4(hello)[8:10], code, value)

    def test_no_alpn(self) -> None:
        """No ALPN extension, an empty list, or an empty first value: "00"."""
        for extensions in (
            [],
            [(EXT_ALPN, alpn_body([]))],
            [(EXT_ALPN, alpn_body([b"", b"h2"]))],
        ):
            hello = parsed(HelloSpec(extensions=extensions).wire())
            self.assertEqual(alpn_code(hello), "00", extensions)


class RuleTests(SynchronousTestCase):
    """Each rule of the specification on its own."""

    def test_version(self) -> None:
        """The highest non-GREASE supported version wins; else the legacy version."""

        def hello(legacy: int, versions: list[int] | None) -> ClientHello:
            extensions = (
                [] if versions is None else [(EXT_SUPPORTED_VERSIONS, u16_list(versions, 1))]
            )
            return parsed(HelloSpec(legacy_version=legacy, extensions=extensions).wire())

        self.assertEqual(version_code(hello(0x0303, [0x0A0A, 0x0303, 0x0304])), "13")
        self.assertEqual(version_code(hello(0x0303, [0x0302, 0x0303])), "12")
        self.assertEqual(version_code(hello(0x0301, None)), "10")
        self.assertEqual(version_code(hello(0x0302, [])), "11")
        self.assertEqual(version_code(hello(0x0302, [0xFAFA])), "11")
        self.assertEqual(version_code(hello(0x0303, [0x7F1C])), "00")
        self.assertEqual(version_code(hello(0x0300, None)), "s3")
        for value, code in VERSION_CODES.items():
            self.assertEqual(version_code(hello(value, None)), code)
            self.assertEqual(version_code(hello(0x0301, [value])), code)
        self.assertEqual(
            VERSION_CODES,
            {
                0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3",
                0x0002: "s2", 0xFEFF: "d1", 0xFEFD: "d2", 0xFEFC: "d3",
            },
        )  # fmt: skip
        self.assertEqual(ja4(hello(0x0002, None))[:3], "ts2")

    def test_counts_cap_at_99(self) -> None:
        """Over 99 suites or extensions print 99; the hashes still cover all of them."""
        suites = list(range(0x0100, 0x0100 + 120))
        extensions = [(0x7000 + i, b"") for i in range(100)]
        hello = parsed(HelloSpec(cipher_suites=suites, extensions=extensions).wire())
        result = fingerprints(hello)
        self.assertEqual(result.ja4[:10], "t12i999900")
        self.assertEqual(len(result.ja4_r.split("_")[1].split(",")), 120)
        fewer = parsed(HelloSpec(cipher_suites=suites[:99], extensions=extensions[:99]).wire())
        self.assertEqual(fingerprints(fewer).ja4[:10], "t12i999900")
        self.assertNotEqual(fingerprints(fewer).ja4[11:23], result.ja4[11:23])
        nine = parsed(HelloSpec(cipher_suites=suites[:9], extensions=extensions[:10]).wire())
        self.assertEqual(ja4(nine)[:10], "t12i091000")

    def test_empty_lists(self) -> None:
        """No suites and no extensions: zero counts and the all-zero hashes."""
        hello = parsed(HelloSpec(cipher_suites=[0x0A0A], extensions=None).wire())
        self.assertEqual(
            fingerprints(hello),
            JA4(
                "t12i000000_000000000000_000000000000",
                "t12i000000__",
                "t12i000000_000000000000_000000000000",
                "t12i000000__",
            ),
        )
        self.assertEqual(EMPTY_HASH, "000000000000")

    def test_only_sni_and_alpn(self) -> None:
        """With SNI and ALPN alone, both extension hashes are all zeros (as FoxIO's)."""
        hello = parsed(
            HelloSpec(
                extensions=[
                    (EXT_SERVER_NAME, sni_body([(0, b"a.example")])),
                    (EXT_ALPN, alpn_body([b"h2"])),
                ]
            ).wire()
        )
        result = fingerprints(hello)
        self.assertEqual(result.ja4, "t12d0202h2_c1929292aa6b_000000000000")
        self.assertEqual(result.ja4_o[-12:], EMPTY_HASH)
        self.assertEqual(result.ja4_r, "t12d0202h2_1301,c02f_")
        self.assertEqual(result.ja4_ro, "t12d0202h2_1301,c02f_0000,0010")

    def test_sni_is_presence(self) -> None:
        """An SNI extension without a host name still makes it "d"."""
        hello = parsed(HelloSpec(extensions=[(EXT_SERVER_NAME, sni_body([]))]).wire())
        self.assertIsNone(hello.server_name)
        self.assertEqual(ja4(hello)[3], "d")

    def test_order(self) -> None:
        """JA4 ignores the order of suites and extensions; JA4_o does not."""
        spec = HelloSpec(
            cipher_suites=[0x1301, 0xC02F, 0x009C],
            extensions=[
                (0x0017, b""),
                (EXT_SIGNATURE_ALGORITHMS, u16_list([0x0403, 0x0804])),
                (0xFF01, b"\x00"),
            ],
        )
        shuffled = replace(
            spec,
            cipher_suites=[0x009C, 0x1301, 0xC02F],
            extensions=[spec.extensions[2], spec.extensions[0], spec.extensions[1]],  # type: ignore[index]
        )
        first, second = fingerprints(parsed(spec.wire())), fingerprints(parsed(shuffled.wire()))
        self.assertEqual(first.ja4, second.ja4)
        self.assertEqual(first.ja4_r, second.ja4_r)
        self.assertNotEqual(first.ja4_o, second.ja4_o)
        self.assertNotEqual(first.ja4_ro, second.ja4_ro)
        swapped = replace(
            spec,
            extensions=[
                (0x0017, b""),
                (EXT_SIGNATURE_ALGORITHMS, u16_list([0x0804, 0x0403])),
                (0xFF01, b"\x00"),
            ],
        )
        self.assertNotEqual(ja4(parsed(swapped.wire())), first.ja4)

    def test_record(self) -> None:
        """The four forms log under their names."""
        self.assertEqual(
            JA4("a", "b", "c", "d").as_record(),
            {"ja4": "a", "ja4_r": "b", "ja4_o": "c", "ja4_ro": "d"},
        )


# -- real clients, and an independent implementation -------------------------------------

#: The JA4 of each recorded hello, as this module computes it; ja4plus gives the same
#: (RealClientTests.test_ja4plus_agrees).
FIXTURE_JA4: dict[str, str] = {
    "curl-cffi-chrome": "t13d1517h2_8daaf6152771_cb7bf5808d99",
    "curl": "t13d3112h2_e8f1e7e78f70_b26ce05bbdd6",
    "gnutls": "t13d291300_723694b0fccc_2cc26d266019",
    "java": "t13d3713h2_db35923f8641_7c76daad20ec",
    "node": "t13d591000_a33745022dd6_1f22a2ca17c4",
    "openssl-alpn": "t13i3110h2_e8f1e7e78f70_1f22a2ca17c4",
    "openssl-default": "t13i310900_e8f1e7e78f70_1f22a2ca17c4",
    "openssl-resume-early-data": "t13i311100_e8f1e7e78f70_87f12a3f655c",
    "openssl-sni": "t13d311000_e8f1e7e78f70_1f22a2ca17c4",
    "openssl-tls12-ticket": "t12i280600_d943125447b4_e7e480e5a997",
    "openssl-tls12": "t12i280600_d943125447b4_e7e480e5a997",
    "pyopenssl-fragmented": "t13d301100_1d37bd780c83_0d46a1bf4a7c",
    "pyopenssl": "t13d301100_1d37bd780c83_0d46a1bf4a7c",
    "python-ssl": "t13d181100_85036bcba153_d41ae481755e",
}


def ja4plus() -> tuple[
    Callable[[bytes], Any], Callable[..., str | None], Callable[..., str | None]
]:
    """ja4plus's ClientHello reader and its two fingerprint functions.

    Skips the calling test when ja4plus (in the ``test`` extra) is not installed.
    """
    try:
        from ja4plus.fingerprinters.ja4 import generate_ja4, get_raw_fingerprint  # noqa: PLC0415
        from ja4plus.utils.tls_utils import parse_tls_handshake  # noqa: PLC0415
    except ImportError as error:
        msg = f"ja4plus is not installed (pip install '.[test]'): {error}"
        raise SkipTest(msg) from None
    return parse_tls_handshake, generate_ja4, get_raw_fingerprint


def ja4plus_forms(wire: bytes) -> JA4:
    """What ja4plus computes for the hello in ``wire`` (one record of the whole message).

    ja4plus reads one record, so a fragmented hello is given to it reassembled.
    """
    parse, generate, raw = ja4plus()
    message = b""
    position = 0
    while position < len(wire):
        length = int.from_bytes(wire[position + 3 : position + 5], "big")
        message += wire[position + 5 : position + 5 + length]
        position += 5 + length
    info = parse(frame(message, [len(message)]))
    forms = (
        generate(info),
        raw(info),
        generate(info, original_order=True),
        raw(info, original_order=True),
    )
    assert all(isinstance(form, str) for form in forms), forms
    return JA4(*forms)  # type: ignore[arg-type]


class RealClientTests(SynchronousTestCase):
    """The recorded hellos of real clients."""

    def test_fixture_values(self) -> None:
        """Each recorded hello has the JA4 listed (the README's clients)."""
        self.assertEqual(sorted(FIXTURE_JA4), sorted(EXPECTED))
        for name, value in FIXTURE_JA4.items():
            result = fingerprints(parsed(fixture(name)))
            self.assertEqual(result.ja4, value, name)
            self.assertRegex(result.ja4, JA4_FORM)

    def test_ja4plus_agrees(self) -> None:
        """ja4plus computes the same four forms for every recorded hello."""
        for name in FIXTURE_JA4:
            wire = fixture(name)
            self.assertEqual(fingerprints(parsed(wire)), ja4plus_forms(wire), name)

    @PROPERTY
    @given(hellos())
    def test_ja4plus_agrees_on_generated_hellos(self, generated: Generated) -> None:
        """ja4plus agrees on generated hellos, except its old ALPN rule for odd bytes."""
        wire = generated.wire()
        mine = fingerprints(parsed(wire))
        theirs = ja4plus_forms(wire)
        alpn = generated.expected.alpn
        # bytes.isalnum() is ASCII letters and digits only.
        odd = bool(alpn and alpn[0]) and not (alpn[0][:1].isalnum() and alpn[0][-1:].isalnum())
        if odd:
            # ja4plus prints "9" for bytes >= 0x80, the byte for other printable
            # characters, and "99" for controls; the specification says hex.
            forms = (theirs.ja4, theirs.ja4_r, theirs.ja4_o, theirs.ja4_ro)
            theirs = JA4(*(form[:8] + mine.ja4[8:10] + form[10:] for form in forms))
        self.assertEqual(mine, theirs)
        self.assertRegex(mine.ja4, JA4_FORM)
