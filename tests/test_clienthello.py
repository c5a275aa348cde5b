"""Tests for :mod:`secure_echo.wire.clienthello`: real clients' hellos, every split, bounds.

The builders below write ClientHellos byte by byte from the RFC 8446 layout, apart
from the parser, so that a generated hello's expected summary is known without it;
``tests/test_ja4.py`` builds its hellos with them too.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import struct
import subprocess
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from secure_echo.wire.clienthello import _LISTS as LISTS
from secure_echo.wire.clienthello import (
    CIPHER_SUITE_NAMES,
    EXT_ALPN,
    EXT_EARLY_DATA,
    EXT_ENCRYPTED_CLIENT_HELLO,
    EXT_KEY_SHARE,
    EXT_PRE_SHARED_KEY,
    EXT_SERVER_NAME,
    EXT_SESSION_TICKET,
    EXT_SIGNATURE_ALGORITHMS,
    EXT_SIGNATURE_ALGORITHMS_CERT,
    EXT_SUPPORTED_GROUPS,
    EXT_SUPPORTED_VERSIONS,
    INCOMPLETE,
    MALFORMED,
    MAX_COLLECT,
    MAX_LIST_ENTRIES,
    MAX_RECORD_LENGTH,
    MAX_STRING_CHARS,
    NOT_CLIENT_HELLO,
    NOT_TLS,
    SSLV2,
    TOO_LARGE,
    ClientHello,
    ClientHelloCollector,
    Unparsed,
    forget_layouts,
    is_grease,
    name_of,
    parse_client_hello,
    safe_text,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

#: Hypothesis budget: enough to find buffering bugs, small enough for CI.
PROPERTY = settings(max_examples=300, deadline=None, database=None)

FIXTURES = Path(__file__).parent / "fixtures" / "clienthello"

GREASE_VALUES = tuple(0x0A0A + 0x1010 * i for i in range(16))

# -- building hellos (independent of the parser) ------------------------------------


def u8(value: int) -> bytes:
    """One byte."""
    return value.to_bytes(1, "big")


def u16(value: int) -> bytes:
    """Two bytes, big-endian."""
    return value.to_bytes(2, "big")


def vector(data: bytes, prefix: int) -> bytes:
    """``data`` with its ``prefix``-byte length in front."""
    return len(data).to_bytes(prefix, "big") + data


def u16_list(values: Iterable[int], prefix: int = 2) -> bytes:
    """A vector of 16-bit values."""
    return vector(b"".join(u16(v) for v in values), prefix)


def sni_body(entries: Iterable[tuple[int, bytes]]) -> bytes:
    """A server_name extension body with ``(name_type, name)`` entries."""
    return vector(b"".join(u8(kind) + vector(name, 2) for kind, name in entries), 2)


def alpn_body(names: Iterable[bytes]) -> bytes:
    """An ALPN extension body."""
    return vector(b"".join(vector(name, 1) for name in names), 2)


def key_share_body(shares: Iterable[tuple[int, bytes]]) -> bytes:
    """A ClientHello key_share extension body with ``(group, key)`` entries."""
    return vector(b"".join(u16(group) + vector(key, 2) for group, key in shares), 2)


def extension(kind: int, body: bytes) -> bytes:
    """One extension: type, length, data."""
    return u16(kind) + vector(body, 2)


def feed_traced(
    collector: ClientHelloCollector, data: bytes
) -> tuple[ClientHello | Unparsed | None, int]:
    """Feed ``data``; the result and the peak of Python memory allocated meanwhile."""
    tracemalloc.start()
    try:
        result = collector.feed(data)
        _, top = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, top


@dataclass(frozen=True)
class HelloSpec:
    """What to put in a built ClientHello; ``extensions`` are ``(type, body)``.

    ``extensions=None`` leaves the extensions block out, as pre-TLS 1.2 clients may.
    """

    cipher_suites: Sequence[int] = (0x1301, 0xC02F)
    extensions: Sequence[tuple[int, bytes]] | None = ()
    legacy_version: int = 0x0303
    session_id: bytes = b""
    compression_methods: bytes = b"\x00"
    random: bytes = bytes(range(32))

    def body(self) -> bytes:
        """The ClientHello body."""
        out = u16(self.legacy_version) + self.random + vector(self.session_id, 1)
        out += u16_list(self.cipher_suites) + vector(self.compression_methods, 1)
        if self.extensions is not None:
            out += vector(b"".join(extension(k, b) for k, b in self.extensions), 2)
        return out

    def message(self) -> bytes:
        """The handshake message: type 1, 3-byte length, body."""
        body = self.body()
        return b"\x01" + len(body).to_bytes(3, "big") + body

    def wire(self, record_size: int = MAX_RECORD_LENGTH, record_version: int = 0x0301) -> bytes:
        """The message in handshake records of at most ``record_size`` bytes."""
        return frame(self.message(), [record_size], record_version)


def frame(message: bytes, sizes: Sequence[int], record_version: int = 0x0301) -> bytes:
    """``message`` in handshake records; sizes are used in turn, the last repeats."""
    out = b""
    position = 0
    for index in itertools.count():
        if position >= len(message):
            return out
        size = sizes[min(index, len(sizes) - 1)]
        piece = message[position : position + size]
        out += b"\x16" + u16(record_version) + vector(piece, 2)
        position += size
    raise AssertionError  # pragma: no cover - itertools.count never ends


def record(content_type: int, payload: bytes, version: int = 0x0301) -> bytes:
    """One TLS record of any type."""
    return u8(content_type) + u16(version) + vector(payload, 2)


# -- a strategy for valid hellos with their expected summary -------------------------

u16s = st.integers(0, 0xFFFF)
grease = st.sampled_from(GREASE_VALUES)
protocol_names = st.binary(max_size=12)
#: Extension types the parser reads the data of, or flags by presence.
KNOWN = {
    EXT_SERVER_NAME,
    EXT_SUPPORTED_GROUPS,
    EXT_SIGNATURE_ALGORITHMS,
    EXT_ALPN,
    EXT_SESSION_TICKET,
    EXT_SUPPORTED_VERSIONS,
    EXT_SIGNATURE_ALGORITHMS_CERT,
    EXT_KEY_SHARE,
    EXT_PRE_SHARED_KEY,
    EXT_EARLY_DATA,
    EXT_ENCRYPTED_CLIENT_HELLO,
}


@dataclass
class Generated:
    """A built hello and the summary the parser must give for it."""

    spec: HelloSpec
    expected: ClientHello
    record_version: int = 0x0301

    def wire(self, record_size: int = MAX_RECORD_LENGTH) -> bytes:
        """The hello on the wire."""
        return self.spec.wire(record_size, self.record_version)


@st.composite
def hellos(draw: st.DrawFn, *, with_grease: bool = True) -> Generated:
    """A valid ClientHello with a random mix of extensions, and its summary.

    ``with_grease=False``: no GREASE value anywhere.
    """
    value = st.one_of(u16s, grease) if with_grease else u16s.filter(lambda v: not is_grease(v))
    values = st.lists(value, max_size=12)
    fields: dict[str, object] = {}
    chosen: list[tuple[int, bytes]] = []
    if draw(st.booleans()):
        entries = draw(st.lists(st.tuples(st.integers(0, 3), st.binary(max_size=20)), max_size=3))
        chosen.append((EXT_SERVER_NAME, sni_body(entries)))
        fields["server_name"] = next((name for kind, name in entries if kind == 0), None)
    for kind, key, prefix in (
        (EXT_SUPPORTED_GROUPS, "supported_groups", 2),
        (EXT_SIGNATURE_ALGORITHMS, "signature_algorithms", 2),
        (EXT_SIGNATURE_ALGORITHMS_CERT, "signature_algorithms_cert", 2),
        (EXT_SUPPORTED_VERSIONS, "supported_versions", 1),
    ):
        if draw(st.booleans()):
            listed = draw(values)
            chosen.append((kind, u16_list(listed, prefix)))
            fields[key] = tuple(listed)
    if draw(st.booleans()):
        names = draw(st.lists(protocol_names, max_size=5))
        chosen.append((EXT_ALPN, alpn_body(names)))
        fields["alpn"] = tuple(names)
    if draw(st.booleans()):
        shares = draw(st.lists(st.tuples(value, st.binary(max_size=40)), max_size=3))
        chosen.append((EXT_KEY_SHARE, key_share_body(shares)))
        fields["key_share_groups"] = tuple(group for group, _ in shares)
    if draw(st.booleans()):
        ticket = draw(st.binary(max_size=40))
        chosen.append((EXT_SESSION_TICKET, ticket))
        fields["session_ticket"] = len(ticket)
    flagged = st.sampled_from([EXT_PRE_SHARED_KEY, EXT_EARLY_DATA, EXT_ENCRYPTED_CLIENT_HELLO])
    for kind in draw(st.sets(flagged)):
        chosen.append((kind, draw(st.binary(max_size=30))))  # noqa: PERF401 - draws in turn
    others = draw(
        st.lists(
            st.tuples(
                u16s.filter(lambda k: k not in KNOWN and (with_grease or not is_grease(k))),
                st.binary(max_size=30),
            ),
            max_size=4,
            unique_by=lambda pair: pair[0],
        )
    )
    extensions = draw(st.permutations([*chosen, *others]))
    no_block = not extensions and draw(st.booleans())
    spec = HelloSpec(
        cipher_suites=draw(st.lists(value, max_size=20)),
        extensions=None if no_block else extensions,
        legacy_version=draw(st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303])),
        session_id=draw(st.binary(max_size=32)),
        compression_methods=draw(st.binary(min_size=1, max_size=3)),
        random=draw(st.binary(min_size=32, max_size=32)),
    )
    record_version = draw(st.sampled_from([0x0300, 0x0301, 0x0303]))
    expected = ClientHello(
        record_version=record_version,
        legacy_version=spec.legacy_version,
        session_id_length=len(spec.session_id),
        cipher_suites=tuple(spec.cipher_suites),
        compression_methods=tuple(spec.compression_methods),
        extensions=tuple(kind for kind, _ in extensions),
        length=len(spec.body()),
        **fields,  # type: ignore[arg-type]
    )
    return Generated(spec, expected, record_version)


@st.composite
def split_points(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (empty pieces included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    points = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_all(pieces: Iterable[bytes], limit: int = MAX_COLLECT) -> ClientHello | Unparsed | None:
    """Feed every piece to a fresh collector; return its last answer."""
    collector = ClientHelloCollector(limit)
    result = None
    for piece in pieces:
        result = collector.feed(piece)
    return result


def parsed(data: bytes) -> ClientHello:
    """``data`` parsed at once, which must give a ClientHello."""
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello), result
    return result


def fixture(name: str) -> bytes:
    """A recorded hello (tests/fixtures/clienthello/NAME.bin)."""
    return (FIXTURES / f"{name}.bin").read_bytes()


# -- the recorded hellos ---------------------------------------------------------------

TLS13_12_10 = (0x0304, 0x0303, 0x0302, 0x0301)
#: Per fixture: the fields a reader of the capture sees (Wireshark agrees), and the
#: number of cipher suites and extensions.
EXPECTED: dict[str, dict[str, object]] = {
    "openssl-default": {
        "server_name": None,
        "alpn": (),
        "supported_versions": TLS13_12_10,
        "key_share_groups": (0x001D,),
        "ciphers": 31,
        "extensions": 9,
        "session_ticket": 0,
    },
    "openssl-tls12": {
        "server_name": None,
        "supported_versions": (),
        "key_share_groups": (),
        "ciphers": 28,
        "extensions": 6,
        "session_id_length": 0,
    },
    "openssl-alpn": {
        "server_name": None,
        "alpn": (b"h2", b"http/1.1"),
        "ciphers": 31,
        "extensions": 10,
    },
    "openssl-sni": {"server_name": b"localhost", "alpn": (), "ciphers": 31, "extensions": 10},
    "openssl-resume-early-data": {
        "psk": True,
        "early_data": True,
        "server_name": None,
        "extensions": 11,
        "last_extension": EXT_PRE_SHARED_KEY,
    },
    "openssl-tls12-ticket": {
        "supported_versions": (),
        "session_ticket": 176,
        "psk": False,
        "session_id_length": 32,
    },
    "gnutls": {
        "server_name": b"localhost",
        "key_share_groups": (0x0017, 0x001D),
        "ciphers": 29,
        "extensions": 13,
    },
    "curl": {
        "server_name": b"localhost",
        "alpn": (b"h2", b"http/1.1"),
        "supported_versions": TLS13_12_10,
        "ciphers": 31,
        "extensions": 12,
        "session_ticket": None,
    },
    "node": {"server_name": b"localhost", "alpn": (), "ciphers": 59, "extensions": 10},
    "java": {
        "record_version": 0x0303,
        "server_name": b"localhost",
        "alpn": (b"h2", b"http/1.1"),
        "supported_versions": (0x0304, 0x0303),
        "key_share_groups": (0x001D, 0x0017),
        "ciphers": 37,
        "extensions": 13,
        "signature_algorithms_cert": 21,
    },
    "python-ssl": {"server_name": b"localhost", "alpn": (), "ciphers": 18, "extensions": 11},
    "pyopenssl": {
        "server_name": b"localhost",
        "key_share_groups": (0x11EC, 0x001D),
        "ciphers": 30,
        "extensions": 11,
        "records": 1,
    },
    "pyopenssl-fragmented": {
        "server_name": b"localhost",
        "key_share_groups": (0x11EC, 0x001D),
        "records": 4,
    },
    "curl-cffi-chrome": {
        "server_name": b"localhost",
        "alpn": (b"h2", b"http/1.1"),
        "grease": True,
        "ech": True,
        "key_share_groups": (0x9A9A, 0x11EC, 0x001D),
        "supported_versions": (0xFAFA, 0x0304, 0x0303),
        "ciphers": 16,
        "extensions": 19,
    },
}


class FixtureTests(SynchronousTestCase):
    """Every recorded hello parses, whole and split, to what its client sent."""

    def test_every_fixture_is_listed(self) -> None:
        """Each recording in the fixture directory has expectations here and a README line."""
        names = sorted(path.stem for path in FIXTURES.glob("*.bin"))
        self.assertEqual(names, sorted(EXPECTED))
        readme = (FIXTURES / "README.md").read_text()
        for name in names:
            self.assertIn(f"`{name}.bin`", readme)

    def test_fields(self) -> None:
        """The summary of each recording has the values its client sent."""
        for name, expected in EXPECTED.items():
            hello = parsed(fixture(name))
            for key, value in expected.items():
                if key == "ciphers":
                    actual: object = len(hello.cipher_suites)
                elif key == "extensions":
                    actual = len(hello.extensions)
                elif key == "last_extension":
                    actual = hello.extensions[-1]
                elif key == "signature_algorithms_cert":
                    actual = len(hello.signature_algorithms_cert)
                else:
                    actual = getattr(hello, key)
                self.assertEqual(actual, value, f"{name}: {key}")
            self.assertEqual(hello.compression_methods, (0,), name)
            self.assertEqual(hello.legacy_version, 0x0303, name)
            self.assertTrue(hello.signature_algorithms, name)
            self.assertTrue(hello.supported_groups, name)
            self.assertEqual(hello.grease, name == "curl-cffi-chrome", name)
            self.assertEqual(hello.ech, name == "curl-cffi-chrome", name)
            wire = fixture(name)
            self.assertEqual(hello.length + 4 + 5 * hello.records, len(wire), name)

    def test_curl_record(self) -> None:
        """The log record of curl's hello, in full: names, order, flags."""
        record = parsed(fixture("curl")).as_record()
        self.assertEqual(
            record["extensions"],
            [
                "server_name",
                "ec_point_formats",
                "supported_groups",
                "application_layer_protocol_negotiation",
                "encrypt_then_mac",
                "extended_master_secret",
                "post_handshake_auth",
                "signature_algorithms",
                "supported_versions",
                "psk_key_exchange_modes",
                "key_share",
                "padding",
            ],
        )
        cipher_suites = record["cipher_suites"]
        assert isinstance(cipher_suites, list)
        self.assertEqual(
            cipher_suites[:4],
            [
                "TLS_AES_256_GCM_SHA384",
                "TLS_CHACHA20_POLY1305_SHA256",
                "TLS_AES_128_GCM_SHA256",
                "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            ],
        )
        self.assertEqual(cipher_suites[-1], "TLS_EMPTY_RENEGOTIATION_INFO_SCSV")
        self.assertEqual(
            {k: v for k, v in record.items() if k not in {"extensions", "cipher_suites"}},
            {
                "record_version": "TLS 1.0",
                "legacy_version": "TLS 1.2",
                "supported_versions": ["TLS 1.3", "TLS 1.2", "TLS 1.1", "TLS 1.0"],
                "supported_groups": [
                    "x25519",
                    "secp256r1",
                    "x448",
                    "secp521r1",
                    "secp384r1",
                    "ffdhe2048",
                    "ffdhe3072",
                    "ffdhe4096",
                    "ffdhe6144",
                    "ffdhe8192",
                ],
                "key_share_groups": ["x25519"],
                "signature_algorithms": [
                    "ecdsa_secp256r1_sha256",
                    "ecdsa_secp384r1_sha384",
                    "ecdsa_secp521r1_sha512",
                    "ed25519",
                    "ed448",
                    "rsa_pss_pss_sha256",
                    "rsa_pss_pss_sha384",
                    "rsa_pss_pss_sha512",
                    "rsa_pss_rsae_sha256",
                    "rsa_pss_rsae_sha384",
                    "rsa_pss_rsae_sha512",
                    "rsa_pkcs1_sha256",
                    "rsa_pkcs1_sha384",
                    "rsa_pkcs1_sha512",
                    "ecdsa_sha224",
                    "rsa_pkcs1_sha224",
                    "dsa_sha224",
                    "dsa_sha256",
                    "dsa_sha384",
                    "dsa_sha512",
                ],
                "signature_algorithms_cert": [],
                "alpn": ["h2", "http/1.1"],
                "sni": "localhost",
                "compression_methods": ["null"],
                "session_id_length": 32,
                "grease": False,
                "psk": False,
                "early_data": False,
                "session_ticket": None,
                "ech": False,
                "records": 1,
                "length": 508,
                "truncated": {},
            },
        )
        json.dumps(record)

    def test_chrome_record_shows_grease_and_post_quantum(self) -> None:
        """GREASE values show as hex; the hybrid group and ECH show by name."""
        record = parsed(fixture("curl-cffi-chrome")).as_record()
        self.assertEqual(record["key_share_groups"], ["0x9a9a", "X25519MLKEM768", "x25519"])
        extensions = record["extensions"]
        assert isinstance(extensions, list)
        self.assertEqual(extensions[0], "0xeaea")
        self.assertIn("encrypted_client_hello", extensions)
        self.assertIn("application_settings", extensions)
        self.assertEqual(record["supported_versions"], ["0xfafa", "TLS 1.3", "TLS 1.2"])

    def test_every_split_point(self) -> None:
        """Each recording cut at any one point, or fed a byte at a time, parses the same."""
        for name in EXPECTED:
            data = fixture(name)
            whole = parsed(data)
            for cut in range(len(data)):
                collector = ClientHelloCollector()
                first = collector.feed(data[:cut])
                self.assertIsNone(first, f"{name} at {cut}")
                self.assertEqual(collector.feed(data[cut:]), whole, f"{name} at {cut}")
            collector = ClientHelloCollector()
            answers = [collector.feed(data[i : i + 1]) for i in range(len(data))]
            self.assertEqual(answers[-1], whole, name)
            self.assertEqual(answers[:-1], [None] * (len(data) - 1), name)

    def test_fragmented_is_the_same_hello(self) -> None:
        """A hello over four records is the one-record hello with ``records`` = 4."""
        one = parsed(fixture("pyopenssl"))
        four = parsed(fixture("pyopenssl-fragmented"))
        self.assertEqual(four, replace(one, records=4))
        self.assertEqual(four.as_record()["records"], 4)

    def test_reframed_at_every_record_size(self) -> None:
        """Any record size, down to one byte, gives the same hello."""
        hello = parsed(fixture("curl-cffi-chrome"))
        message = fixture("curl-cffi-chrome")[5:]
        for size in [1, 2, 3, 4, 5, 7, 100, 511, 1000, len(message) - 1]:
            wire = frame(message, [size])
            records = -(-len(message) // size)
            self.assertEqual(parsed(wire), replace(hello, records=records), size)

    def test_data_after_the_hello_is_ignored(self) -> None:
        """Bytes after the hello (early data, a second record) do not change it."""
        data = fixture("openssl-resume-early-data")
        after = record(0x17, b"\x00" * 100) + b"\x16\x03"
        self.assertEqual(parsed(data + after), parsed(data))


class FastPathTests(SynchronousTestCase):
    """A first read holding a whole first record with the whole hello is parsed at once.

    The general path gives the same answers, only more slowly, so these tests make
    it fail to tell which reads take the fast one.
    """

    def general_path_fails(self) -> None:
        """Make the general path (the record walk) fail the test if it runs."""

        def fail(*_: object) -> None:
            raise AssertionError("the general path ran")

        self.patch(ClientHelloCollector, "_walk", fail)

    def test_recorded_hellos(self) -> None:
        """Every one-record recording, alone or with bytes after it, and kept."""
        wholes = {name: parsed(fixture(name)) for name in EXPECTED}
        self.general_path_fails()
        for name, whole in wholes.items():
            if whole.records > 1:
                continue
            data = fixture(name)
            collector = ClientHelloCollector(len(data))
            result = collector.feed(data)
            self.assertEqual(result, whole, name)
            self.assertIs(collector.result, result, name)
            self.assertIs(collector.feed(b"\x16"), result, name)
            self.assertIs(collector.finish(), result, name)
            self.assertEqual(collector.held, 0, name)
            after = data + record(0x17, b"\x00" * 10)
            self.assertEqual(parse_client_hello(after), whole, name)

    def test_edges(self) -> None:
        """The shortest first read, the largest record, a message before the record's end."""
        self.general_path_fails()
        self.assertEqual(
            unparsed(b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"),
            Unparsed(MALFORMED, "the ClientHello ends inside its version and random"),
        )
        unpadded = len(HelloSpec(extensions=[(0x0015, b"")]).message())
        padded = HelloSpec(extensions=[(0x0015, bytes(MAX_RECORD_LENGTH - unpadded))])
        self.assertEqual(len(padded.message()), MAX_RECORD_LENGTH)
        self.assertEqual(parsed(padded.wire()).length, MAX_RECORD_LENGTH - 4)
        message = HelloSpec().message()
        longer = frame(message + b"\x0b\x00\x00\x00", [MAX_RECORD_LENGTH])
        self.assertEqual(parsed(longer), parsed(HelloSpec().wire()))
        ssl3 = parsed(HelloSpec().wire(record_version=0x0300))
        self.assertEqual(ssl3.record_version, 0x0300)

    def test_what_the_general_path_answers(self) -> None:
        """Whole first records the fast path leaves alone get the general path's answers."""
        wire = HelloSpec().wire()
        self.assertEqual(
            unparsed(b"\x17" + wire[1:]),
            Unparsed(NOT_TLS, "first byte 0x17 is not a TLS handshake record (0x16)"),
        )
        self.assertEqual(
            unparsed(wire[:1] + b"\x02" + wire[2:]),
            Unparsed(NOT_TLS, "record version 0x02.. is not TLS (0x03..)"),
        )
        self.assertEqual(
            unparsed(wire[:5] + b"\x02" + wire[6:]),
            Unparsed(
                NOT_CLIENT_HELLO, "the first handshake message has type 2, not ClientHello (1)"
            ),
        )
        message = HelloSpec().message()
        too_long = frame(message + bytes(MAX_RECORD_LENGTH + 1 - len(message)), [99999])
        self.assertEqual(
            unparsed(too_long),
            Unparsed(MALFORMED, "a record of 16385 bytes is longer than TLS allows (16384)"),
        )
        self.assertEqual(
            unparsed(wire, len(wire) - 1),
            Unparsed(
                TOO_LARGE,
                f"a ClientHello of {len(message) - 4} bytes does not fit in {len(wire) - 1} bytes",
            ),
        )
        self.assertIsNone(parse_client_hello(wire[:-1]))
        # A whole hello in the second record (after an empty one) is its second.
        collector = ClientHelloCollector()
        self.assertIsNone(collector.feed(record(0x16, b"")))
        self.assertEqual(collector.feed(wire), replace(parsed(wire), records=2))

    def test_one_record_over_two_reads_is_parsed_in_place(self) -> None:
        """A hello whole in one record that took two reads is parsed where it is held."""
        wire = HelloSpec(extensions=[(0x0015, bytes(12000))]).wire()
        ClientHelloCollector().feed(wire)  # once first, as in test_one_read_is_parsed_in_place
        collector = ClientHelloCollector()
        self.assertIsNone(collector.feed(wire[:100]))
        result, top = feed_traced(collector, wire[100:])
        self.assertIsInstance(result, ClientHello)
        # The record is held once (about 12 kB); a second copy would double that.
        self.assertLess(top, 20000)


class ListCacheTests(SynchronousTestCase):
    """Lists of 16-bit values are kept by their bytes, shared, and bounded."""

    def setUp(self) -> None:
        """Start from an empty cache, and no layouts that would answer without it."""
        LISTS.clear()
        self.addCleanup(LISTS.clear)
        forget_layouts()
        self.addCleanup(forget_layouts)

    def test_shared(self) -> None:
        """Two hellos of one client share their lists, however the bytes came."""
        one = parsed(fixture("pyopenssl"))
        again = parsed(fixture("pyopenssl"))
        fragmented = parsed(fixture("pyopenssl-fragmented"))
        for hello in (again, fragmented):
            self.assertIs(hello.cipher_suites, one.cipher_suites)
            self.assertIs(hello.supported_groups, one.supported_groups)
            self.assertIs(hello.signature_algorithms, one.signature_algorithms)
            self.assertIs(hello.supported_versions, one.supported_versions)
        self.assertEqual(len(LISTS), 4)

    def test_short_lists_only(self) -> None:
        """Lists of fewer than MAX_LIST_ENTRIES values are kept, longer ones are not."""
        kept = list(range(MAX_LIST_ENTRIES - 1))
        parsed(HelloSpec(cipher_suites=kept, extensions=None).wire())
        self.assertEqual(list(LISTS.values()), [tuple(kept)])
        LISTS.clear()
        long = list(range(MAX_LIST_ENTRIES))
        self.assertEqual(
            parsed(HelloSpec(cipher_suites=long, extensions=None).wire()).cipher_suites,
            tuple(long),
        )
        self.assertEqual(LISTS, {})

    def test_bounded(self) -> None:
        """At most 256 lists are kept; the 257th makes the cache start again."""
        for value in range(256):
            parsed(HelloSpec(cipher_suites=[value], extensions=None).wire())
        self.assertEqual(len(LISTS), 256)
        hello = parsed(HelloSpec(cipher_suites=[256], extensions=None).wire())
        self.assertEqual(LISTS, {b"\x01\x00": (256,)})
        self.assertIs(LISTS[b"\x01\x00"], hello.cipher_suites)


# -- what the collector reports ---------------------------------------------------------


def unparsed(data: bytes, limit: int = MAX_COLLECT) -> Unparsed:
    """``data`` fed at once, which must be refused."""
    result = ClientHelloCollector(limit).feed(data)
    assert isinstance(result, Unparsed), result
    return result


class UnparsedTests(SynchronousTestCase):
    """Bytes that are not a ClientHello are refused with a reason, as early as possible."""

    def test_http(self) -> None:
        """A plaintext HTTP request is ``not_tls`` from its first byte."""
        collector = ClientHelloCollector()
        result = collector.feed(b"G")
        self.assertEqual(
            result,
            Unparsed(NOT_TLS, "first byte 0x47 ('G') is not a TLS handshake record (0x16)"),
        )
        self.assertIs(collector.feed(b"ET / HTTP/1.1\r\n"), result)

    def test_unprintable_first_byte(self) -> None:
        """A first byte that is not printable is shown as hex only."""
        self.assertEqual(
            unparsed(b"\x00\x00\x00\x00\x00\x00"),
            Unparsed(NOT_TLS, "first byte 0x00 is not a TLS handshake record (0x16)"),
        )
        self.assertEqual(
            unparsed(b"\x7f"),
            Unparsed(NOT_TLS, "first byte 0x7f is not a TLS handshake record (0x16)"),
        )
        self.assertEqual(unparsed(b"\x1f").reason, NOT_TLS)
        self.assertIn("(' ')", unparsed(b" ").detail)
        self.assertIn("('~')", unparsed(b"~").detail)

    def test_sslv2(self) -> None:
        """An SSL 2.0-style header (high bit set) is ``sslv2``."""
        self.assertEqual(
            unparsed(b"\x80\x2e\x01\x00\x02"),
            Unparsed(SSLV2, "first byte 0x80: an SSL 2.0-style record header"),
        )
        self.assertEqual(unparsed(b"\xff").reason, SSLV2)

    def test_record_version_not_tls(self) -> None:
        """A handshake record whose version is not 3.x is ``not_tls``, from two bytes."""
        self.assertEqual(
            unparsed(b"\x16\x02"),
            Unparsed(NOT_TLS, "record version 0x02.. is not TLS (0x03..)"),
        )
        self.assertEqual(unparsed(b"\x16\x04\x01\x00\x10").reason, NOT_TLS)
        self.assertIsNone(parse_client_hello(b"\x16\x03"))
        self.assertIsNone(parse_client_hello(b"\x16\x03\x01\x00"))

    def test_not_a_client_hello(self) -> None:
        """A ServerHello (type 2) is ``not_client_hello`` once its first byte is in."""
        self.assertIsNone(parse_client_hello(b"\x16\x03\x03\x00\x40"))
        self.assertEqual(
            unparsed(b"\x16\x03\x03\x00\x40\x02"),
            Unparsed(
                NOT_CLIENT_HELLO, "the first handshake message has type 2, not ClientHello (1)"
            ),
        )
        # Also when the type arrives in a later record than an empty first one.
        self.assertEqual(
            unparsed(record(0x16, b"") + record(0x16, b"\x0b\x00")).reason, NOT_CLIENT_HELLO
        )

    def test_record_too_long(self) -> None:
        """A record longer than 2^14 bytes is malformed as soon as its header is in."""
        self.assertEqual(
            unparsed(b"\x16\x03\x01\x40\x01"),
            Unparsed(MALFORMED, "a record of 16385 bytes is longer than TLS allows (16384)"),
        )
        self.assertIsNone(parse_client_hello(b"\x16\x03\x01\x40\x00"))

    def test_other_record_inside_the_hello(self) -> None:
        """An alert between two fragments of a hello is malformed."""
        message = HelloSpec().message()
        data = frame(message[:10], [10]) + record(0x15, b"\x02\x28") + frame(message[10:], [999])
        self.assertEqual(
            unparsed(data),
            Unparsed(MALFORMED, "a record of type 0x15 came inside the ClientHello"),
        )
        later = frame(message[:10], [10]) + b"\x16\x02\x00"
        self.assertEqual(
            unparsed(later), Unparsed(MALFORMED, "record version 0x02.. is not TLS (0x03..)")
        )
        self.assertEqual(
            unparsed(frame(message[:10], [10]) + b"\x17"),
            Unparsed(MALFORMED, "a record of type 0x17 came inside the ClientHello"),
        )

    def test_declared_length_too_large(self) -> None:
        """A hello that cannot fit in the limit is refused from its header, unbuffered."""
        collector = ClientHelloCollector()
        result = collector.feed(b"\x16\x03\x01\x40\x00\x01\x00\xff\xf0")
        self.assertEqual(
            result,
            Unparsed(TOO_LARGE, "a ClientHello of 65520 bytes does not fit in 65536 bytes"),
        )
        self.assertEqual(collector.held, 0)
        # Four records of at most 2^14 bytes carry it: the largest body that fits
        # leaves room for the handshake header and four record headers.
        fits = MAX_COLLECT - 4 - 4 * 5
        self.assertIsNone(
            parse_client_hello(b"\x16\x03\x01\x40\x00\x01" + fits.to_bytes(3, "big"))
        )
        too_big = (fits + 1).to_bytes(3, "big")
        self.assertEqual(unparsed(b"\x16\x03\x01\x40\x00\x01" + too_big).reason, TOO_LARGE)
        # With a smaller limit, records of the largest size still count their headers.
        self.assertIsNone(parse_client_hello(b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc"))
        self.assertEqual(
            unparsed(b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc", 16388).reason, TOO_LARGE
        )
        self.assertIsNone(
            ClientHelloCollector(16389).feed(b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc")
        )
        # A message of 16385 bytes needs two records, so 10 bytes of record headers.
        two_records = b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfd"
        self.assertEqual(unparsed(two_records, 16394).reason, TOO_LARGE)
        self.assertIsNone(ClientHelloCollector(16395).feed(two_records))
        # The length's top byte counts: 0x010000 is 65536 bytes.
        self.assertEqual(
            unparsed(b"\x16\x03\x01\x40\x00\x01\x01\x00\x00"),
            Unparsed(TOO_LARGE, "a ClientHello of 65536 bytes does not fit in 65536 bytes"),
        )

    def test_collects_at_most_the_limit(self) -> None:
        """Tiny records never finishing the hello stop at the limit, holding no more."""
        message = HelloSpec().message()
        data = frame(message, [1])
        limit = len(data) - 1
        collector = ClientHelloCollector(limit)
        result = collector.feed(data[:limit])
        self.assertEqual(
            result, Unparsed(TOO_LARGE, f"no complete ClientHello in the first {limit} bytes")
        )
        self.assertEqual(collector.held, 0)
        self.assertEqual(
            parsed(data),
            ClientHello(
                record_version=0x0301,
                legacy_version=0x0303,
                session_id_length=0,
                cipher_suites=(0x1301, 0xC02F),
                compression_methods=(0,),
                extensions=(),
                records=len(message),
                length=len(message) - 4,
            ),
        )
        self.assertIsInstance(ClientHelloCollector(len(data)).feed(data), ClientHello)
        # Fed in pieces, the bytes past the limit are never looked at.
        collector = ClientHelloCollector(limit)
        for index in range(0, len(data), 7):
            result = collector.feed(data[index : index + 7])
            self.assertLessEqual(collector.held, limit)
        self.assertEqual(
            result, Unparsed(TOO_LARGE, f"no complete ClientHello in the first {limit} bytes")
        )

    def test_bytes_past_the_limit_are_not_read(self) -> None:
        """A read that goes past the limit is cut there, even at a record boundary."""
        wire = HelloSpec().wire()
        first = frame(HelloSpec().message()[:10], [10])
        collector = ClientHelloCollector(len(first))
        self.assertEqual(collector.feed(first + b"G" + wire).reason, TOO_LARGE)  # type: ignore[union-attr]

    def test_held_bytes(self) -> None:
        """Only an unfinished record and the fragments of finished ones are held."""
        collector = ClientHelloCollector()
        self.assertIsNone(collector.feed(record(0x16, b"")))
        self.assertEqual(collector.held, 0)
        self.assertIsNone(collector.feed(b"\x16\x03\x01\x00\x04\x01"))
        self.assertEqual(collector.held, 6)
        self.assertIsNone(collector.feed(b"\x00\x00"))
        self.assertEqual(collector.held, 8)
        self.assertIsNone(collector.feed(b"\x30" + record(0x16, b"")))
        self.assertEqual(collector.held, 4)
        self.assertIsNone(collector.feed(b"\x16\x03"))
        self.assertEqual(collector.held, 6)

    def test_one_read_is_parsed_in_place(self) -> None:
        """A hello that arrives whole in one read is parsed without copying it."""
        spec = HelloSpec(extensions=[(0x0015, bytes(12000))])

        def peak(wire: bytes) -> int:
            # Once first, so that a coverage tracer's bookkeeping is not counted.
            ClientHelloCollector().feed(wire)
            result, top = feed_traced(ClientHelloCollector(), wire)
            self.assertIsInstance(result, ClientHello)
            return top

        self.assertLess(peak(spec.wire()), 4000)
        # Fragmented, the message is copied once: the measurement can tell.
        self.assertGreater(peak(spec.wire(record_size=9000)), 12000)

    def test_unfinished_record_is_held_once(self) -> None:
        """Each read of an unfinished record adds to what is held, never copies it."""
        wire = HelloSpec(extensions=[(0x0015, bytes(12000))]).wire()
        collector = ClientHelloCollector()
        self.assertIsNone(collector.feed(wire[:12000]))
        self.assertIsNone(collector.feed(wire[12000:12001]))  # the buffer grows room
        tracemalloc.start()
        try:
            self.assertIsNone(collector.feed(wire[12001:12002]))
            _, top = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(top, 4000)
        self.assertEqual(collector.held, 12002)
        self.assertIsInstance(collector.feed(wire[12002:]), ClientHello)

    def test_empty_records_until_the_limit(self) -> None:
        """A stream of empty handshake records is refused at 64 KiB."""
        empty = record(0x16, b"")
        collector = ClientHelloCollector()
        result = None
        for _ in range(MAX_COLLECT // len(empty) + 1):
            result = collector.feed(empty)
            self.assertLessEqual(collector.held, MAX_COLLECT)
        self.assertEqual(
            result, Unparsed(TOO_LARGE, "no complete ClientHello in the first 65536 bytes")
        )

    def test_huge_single_read(self) -> None:
        """One read far over the limit is looked at only up to the limit."""
        data = frame(message_of(bytes(20000)), [1])
        self.assertGreater(len(data), 100_000)
        collector = ClientHelloCollector()
        self.assertEqual(
            collector.feed(data),
            Unparsed(TOO_LARGE, "no complete ClientHello in the first 65536 bytes"),
        )
        self.assertEqual(collector.held, 0)

    def test_incomplete_at_the_end(self) -> None:
        """``finish`` turns an unfinished hello into ``incomplete``; a result stays."""
        collector = ClientHelloCollector()
        self.assertIsNone(collector.feed(HelloSpec().wire()[:20]))
        self.assertIsNone(collector.result)
        self.assertEqual(collector.held, 20)
        finished = collector.finish()
        self.assertEqual(
            finished, Unparsed(INCOMPLETE, "the stream ended after 20 bytes of a hello")
        )
        self.assertIs(collector.finish(), finished)
        self.assertIs(collector.result, finished)
        self.assertIs(collector.feed(HelloSpec().wire()), finished)
        self.assertEqual(collector.held, 0)
        done = ClientHelloCollector()
        hello = done.feed(HelloSpec().wire())
        self.assertIsInstance(hello, ClientHello)
        self.assertIs(done.finish(), hello)
        self.assertEqual(
            ClientHelloCollector().finish(),
            Unparsed(INCOMPLETE, "the stream ended after 0 bytes of a hello"),
        )

    def test_result_is_kept(self) -> None:
        """After a result, more bytes change nothing and nothing is held."""
        collector = ClientHelloCollector()
        self.assertIsNone(collector.feed(b""))
        wire = HelloSpec().wire()
        hello = collector.feed(wire[:-1] + b"")
        self.assertIsNone(hello)
        hello = collector.feed(wire[-1:] + b"\x17\x03\x03")
        self.assertIsInstance(hello, ClientHello)
        self.assertIs(collector.result, hello)
        self.assertIs(collector.feed(b"anything"), hello)
        self.assertEqual(collector.held, 0)

    def test_unparsed_record(self) -> None:
        """An Unparsed logs as its reason and detail."""
        self.assertEqual(
            Unparsed(MALFORMED, "x").as_record(), {"unparsed": "malformed", "detail": "x"}
        )


def malformed_detail(spec: HelloSpec | bytes) -> str:
    """The detail of a hello that must be refused as malformed."""
    wire = spec.wire() if isinstance(spec, HelloSpec) else frame(spec, [MAX_RECORD_LENGTH])
    result = unparsed(wire)
    assert result.reason == MALFORMED, result
    return result.detail


def message_of(body: bytes) -> bytes:
    """A handshake message around ``body``."""
    return b"\x01" + len(body).to_bytes(3, "big") + body


class MalformedTests(SynchronousTestCase):
    """A hello whose lengths do not add up is refused, saying where."""

    def test_cut_short(self) -> None:
        """A message that ends inside a field says which."""
        body = HelloSpec(session_id=b"\x01" * 8, extensions=[(0x0017, b"")]).body()
        # version 0-1, random 2-33, session id 34 + 35-42, suites 43-44 + 45-48,
        # compression 49 + 50, extensions length 51-52, one extension 53-56.
        where = {
            10: "version and random",
            34: "version and random",
            35: "session id",
            42: "session id",
            43: "cipher suites",
            44: "cipher suites",
            45: "cipher suites",
            48: "cipher suites",
            49: "compression methods",
            50: "compression methods",
            52: "extensions length",
        }
        for size, what in where.items():
            detail = malformed_detail(message_of(body[:size]))
            self.assertEqual(detail, f"the ClientHello ends inside its {what}", size)
        for size in (53, 56):
            detail = malformed_detail(message_of(body[:size]))
            self.assertEqual(detail, f"extensions of 4 bytes in the {size - 53} bytes left", size)
        # Cut right after the compression methods, it is a hello without extensions.
        self.assertEqual(parsed(frame(message_of(body[:51]), [999])).extensions, ())
        self.assertEqual(parsed(frame(message_of(body), [999])).extensions, (0x0017,))

    def test_session_id_too_long(self) -> None:
        """A session id over 32 bytes is malformed."""
        body = bytearray(HelloSpec(session_id=bytes(32)).body())
        body[34] = 33
        self.assertEqual(
            malformed_detail(message_of(bytes(body))), "session id of 33 bytes (at most 32)"
        )
        self.assertIsInstance(parsed(HelloSpec(session_id=bytes(32)).wire()), ClientHello)

    def test_odd_cipher_suites(self) -> None:
        """Cipher suites of an odd byte count are malformed."""
        body = u16(0x0303) + bytes(32) + b"\x00" + b"\x00\x03\x13\x01\x13" + b"\x01\x00"
        self.assertEqual(
            malformed_detail(message_of(body)), "cipher suites of 3 bytes (an odd number)"
        )

    def test_extensions_length_mismatch(self) -> None:
        """An extensions block that does not end with the message is malformed."""
        body = HelloSpec(extensions=[(0x0017, b"")]).body()
        self.assertEqual(
            malformed_detail(message_of(body + b"\x00")),
            "extensions of 4 bytes in the 5 bytes left",
        )
        self.assertEqual(
            malformed_detail(message_of(body + b"\x00\x00\x00\x00")),
            "extensions of 4 bytes in the 8 bytes left",
        )

    def test_extension_overruns(self) -> None:
        """An extension longer than what is left is malformed."""
        body = HelloSpec(extensions=None).body() + u16(5) + u16(0x0017) + u16(2) + b"\x00"
        self.assertEqual(
            malformed_detail(message_of(body)),
            "the ClientHello ends inside its extension 0x0017",
        )
        cut = HelloSpec(extensions=None).body() + u16(3) + u16(0x0017) + b"\x00"
        self.assertEqual(
            malformed_detail(message_of(cut)), "the ClientHello ends inside its extension header"
        )
        # The same with bytes after the message in its record (another message).
        for short, what in ((2, "extension header"), (4, "extension 0x0017")):
            body = (
                HelloSpec(extensions=None).body() + u16(short) + u16(0x0017) + u16(1)[: short - 2]
            )
            wire = frame(message_of(body) + b"\x0b\x00\x00\x01\x00", [MAX_RECORD_LENGTH])
            self.assertEqual(
                unparsed(wire), Unparsed(MALFORMED, f"the ClientHello ends inside its {what}")
            )

    def test_inner_lengths(self) -> None:
        """Each extension the parser reads must have consistent inner lengths."""
        cases = {
            (EXT_SERVER_NAME, b""): "server_name is too short for its length",
            (EXT_SERVER_NAME, b"\x00"): "server_name is too short for its length",
            (EXT_SERVER_NAME, b"\x00\x05\x00\x00\x01a"): "server_name says 5 bytes but has 4",
            (
                EXT_SERVER_NAME,
                b"\x00\x02\x00\x00",
            ): "the ClientHello ends inside its server_name entry",
            (
                EXT_SERVER_NAME,
                b"\x00\x04\x00\x00\x02a",
            ): "the ClientHello ends inside its server_name entry",
            (EXT_SUPPORTED_GROUPS, b"\x00\x03\x00\x17\x00"): "supported_groups has an odd length",
            (EXT_SUPPORTED_GROUPS, b"\x00\x04\x00\x17"): "supported_groups says 4 bytes but has 2",
            (
                EXT_SIGNATURE_ALGORITHMS,
                b"\x00",
            ): "signature_algorithms is too short for its length",
            (
                EXT_SIGNATURE_ALGORITHMS_CERT,
                b"\x00\x01\x04",
            ): "signature_algorithms_cert has an odd length",
            (EXT_SUPPORTED_VERSIONS, b""): "supported_versions is too short for its length",
            (EXT_SUPPORTED_VERSIONS, b"\x03\x03\x04\x03"): "supported_versions has an odd length",
            (EXT_SUPPORTED_VERSIONS, b"\x04\x03\x04"): "supported_versions says 4 bytes but has 2",
            (EXT_ALPN, b"\x00"): "ALPN is too short for its length",
            (EXT_ALPN, b"\x00\x03\x03h2"): "the ClientHello ends inside its ALPN protocol name",
            (
                EXT_KEY_SHARE,
                b"\x00\x03\x00\x1d\x00",
            ): "the ClientHello ends inside its key_share entry",
            (
                EXT_KEY_SHARE,
                b"\x00\x05\x00\x1d\x00\x02\x00",
            ): "the ClientHello ends inside its key_share entry",
            (EXT_KEY_SHARE, b"\x00\x01"): "key_share says 1 bytes but has 0",
        }
        for (kind, body), detail in cases.items():
            self.assertEqual(malformed_detail(HelloSpec(extensions=[(kind, body)])), detail, body)

    def test_unread_extensions_are_not_checked(self) -> None:
        """Extensions only flagged (PSK, early data, ECH, padding...) may hold anything."""
        hello = parsed(
            HelloSpec(
                extensions=[
                    (EXT_PRE_SHARED_KEY, b"\xff"),
                    (EXT_ENCRYPTED_CLIENT_HELLO, b"\x00"),
                    (0x0015, b"\x01"),
                ]
            ).wire()
        )
        self.assertTrue(hello.psk)
        self.assertTrue(hello.ech)
        self.assertFalse(hello.early_data)


# -- details of the summary ---------------------------------------------------------------


class SummaryTests(SynchronousTestCase):
    """What the summary says about unusual but valid hellos, and how it is logged."""

    def test_no_extensions_block(self) -> None:
        """A hello without extensions (SSL 3.0-era) has empty lists and no flags."""
        hello = parsed(
            HelloSpec(extensions=None, legacy_version=0x0300).wire(record_version=0x0300)
        )
        self.assertEqual(hello.extensions, ())
        self.assertEqual(hello.record_version, 0x0300)
        self.assertEqual(hello.as_record()["legacy_version"], "SSL 3.0")
        self.assertIsNone(hello.server_name)
        self.assertIsNone(hello.session_ticket)
        self.assertFalse(hello.grease or hello.psk or hello.early_data or hello.ech)

    def test_first_extension_of_a_kind_counts(self) -> None:
        """A repeated extension is listed twice; its first copy gives the values."""
        hello = parsed(
            HelloSpec(
                extensions=[
                    (EXT_SUPPORTED_GROUPS, u16_list([0x1D])),
                    (EXT_SUPPORTED_GROUPS, u16_list([0x17])),
                    (EXT_SUPPORTED_GROUPS, b"broken"),
                ]
            ).wire()
        )
        self.assertEqual(hello.supported_groups, (0x1D,))
        self.assertEqual(hello.extensions, (EXT_SUPPORTED_GROUPS,) * 3)
        # Also for the server name, which a first copy without a host_name leaves None.
        for first, name in ((b"first.example", b"first.example"), (None, None)):
            entries = [(0, first)] if first is not None else [(1, b"other")]
            hello = parsed(
                HelloSpec(
                    extensions=[
                        (EXT_SERVER_NAME, sni_body(entries)),
                        (EXT_SERVER_NAME, sni_body([(0, b"second.example")])),
                        (EXT_SERVER_NAME, b"broken"),
                    ]
                ).wire()
            )
            self.assertEqual(hello.server_name, name)

    def test_first_host_name_counts(self) -> None:
        """The SNI is the first entry of type host_name, whatever precedes it."""
        body = sni_body([(1, b"other"), (0, b"first.example"), (0, b"second.example")])
        self.assertEqual(
            parsed(HelloSpec(extensions=[(0, body)]).wire()).server_name, b"first.example"
        )
        no_name = parsed(HelloSpec(extensions=[(0, sni_body([(2, b"x")]))]).wire())
        self.assertIsNone(no_name.server_name)
        self.assertIsNone(no_name.as_record()["sni"])
        empty = parsed(HelloSpec(extensions=[(0, sni_body([(0, b"")]))]).wire())
        self.assertEqual(empty.as_record()["sni"], "")

    def test_grease_anywhere(self) -> None:
        """A GREASE value in any list sets ``grease``."""
        places = {
            "cipher_suites": lambda g: HelloSpec(cipher_suites=[g]),
            "extensions": lambda g: HelloSpec(extensions=[(g, b"")]),
            "supported_versions": lambda g: HelloSpec(
                extensions=[(EXT_SUPPORTED_VERSIONS, u16_list([g], 1))]
            ),
            "supported_groups": lambda g: HelloSpec(
                extensions=[(EXT_SUPPORTED_GROUPS, u16_list([g]))]
            ),
            "key_share_groups": lambda g: HelloSpec(
                extensions=[(EXT_KEY_SHARE, key_share_body([(g, b"\x00")]))]
            ),
            "signature_algorithms": lambda g: HelloSpec(
                extensions=[(EXT_SIGNATURE_ALGORITHMS, u16_list([g]))]
            ),
            "signature_algorithms_cert": lambda g: HelloSpec(
                extensions=[(EXT_SIGNATURE_ALGORITHMS_CERT, u16_list([g]))]
            ),
        }
        for place, build in places.items():
            self.assertTrue(parsed(build(0x2A2A).wire()).grease, place)
            self.assertFalse(parsed(build(0x2A2B).wire()).grease, place)

    def test_is_grease(self) -> None:
        """GREASE is exactly the 16 values 0x0a0a, 0x1a1a, ... 0xfafa."""
        self.assertEqual([v for v in range(0x10000) if is_grease(v)], list(GREASE_VALUES))

    def test_session_ticket_length(self) -> None:
        """``session_ticket`` is None without the extension, else the ticket's size."""
        self.assertEqual(
            parsed(HelloSpec(extensions=[(EXT_SESSION_TICKET, b"")]).wire()).session_ticket, 0
        )
        self.assertEqual(
            parsed(HelloSpec(extensions=[(EXT_SESSION_TICKET, b"t" * 9)]).wire()).session_ticket, 9
        )

    def test_names(self) -> None:
        """Known values have IANA names, others show as four-digit hex."""
        hello = parsed(
            HelloSpec(
                cipher_suites=[0x1301, 0x00FF, 0x5600, 0x1234],
                extensions=[
                    (EXT_SUPPORTED_GROUPS, u16_list([0x11EC, 0x001D, 0x0100, 0x4321])),
                    (EXT_SIGNATURE_ALGORITHMS, u16_list([0x0807, 0x0403, 0x0001])),
                    (0xFF01, b"\x00"),
                    (0x0BAD, b""),
                ],
                compression_methods=b"\x00\x01\x40\x02",
            ).wire()
        )
        record = hello.as_record()
        self.assertEqual(
            record["cipher_suites"],
            [
                "TLS_AES_128_GCM_SHA256",
                "TLS_EMPTY_RENEGOTIATION_INFO_SCSV",
                "TLS_FALLBACK_SCSV",
                "0x1234",
            ],
        )
        self.assertEqual(
            record["supported_groups"], ["X25519MLKEM768", "x25519", "ffdhe2048", "0x4321"]
        )
        self.assertEqual(
            record["signature_algorithms"], ["ed25519", "ecdsa_secp256r1_sha256", "0x0001"]
        )
        self.assertEqual(
            record["extensions"],
            ["supported_groups", "signature_algorithms", "renegotiation_info", "0x0bad"],
        )
        self.assertEqual(record["compression_methods"], ["null", "DEFLATE", "LZS", "0x0002"])
        self.assertEqual(name_of(0x0304, {}), "0x0304")

    def test_cipher_suite_names_are_openssl_standard_names(self) -> None:
        """Every suite OpenSSL knows has the standard (IANA) name OpenSSL gives it."""
        openssl = shutil.which("openssl")
        if openssl is None:
            msg = "openssl is not installed: no independent list of suite names"
            raise SkipTest(msg)
        tls13 = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
        tls13 += ":TLS_AES_128_CCM_SHA256:TLS_AES_128_CCM_8_SHA256"
        listing = subprocess.run(
            [
                openssl,
                "ciphers",
                "-V",
                "-stdname",
                "-ciphersuites",
                tls13,
                "ALL:COMPLEMENTOFALL:@SECLEVEL=0",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        standard = {
            int(high + low, 16): name
            for high, low, name in re.findall(
                r"^\s*0x([0-9A-F]{2}),0x([0-9A-F]{2}) - (\S+)\s+- ", listing, re.MULTILINE
            )
        }
        common = CIPHER_SUITE_NAMES.keys() & standard.keys()
        self.assertGreater(len(common), 50)
        self.assertEqual(
            {k: CIPHER_SUITE_NAMES[k] for k in common}, {k: standard[k] for k in common}
        )

    def test_lists_are_capped(self) -> None:
        """Each list keeps 64 entries; ``truncated`` gives the full length."""
        many = list(range(0x0100, 0x0100 + MAX_LIST_ENTRIES + 36))
        hello = parsed(
            HelloSpec(
                cipher_suites=many,
                compression_methods=bytes(range(MAX_LIST_ENTRIES + 1)),
                extensions=[
                    (EXT_SUPPORTED_VERSIONS, u16_list(many, 1)),
                    (EXT_SUPPORTED_GROUPS, u16_list(many)),
                    (EXT_KEY_SHARE, key_share_body([(group, b"k") for group in many])),
                    (EXT_SIGNATURE_ALGORITHMS, u16_list(many)),
                    (EXT_SIGNATURE_ALGORITHMS_CERT, u16_list(many)),
                    (EXT_ALPN, alpn_body([b"p%d" % i for i in range(70)])),
                    *[(0x7000 + i, b"") for i in range(65)],
                ],
            ).wire()
        )
        record = hello.as_record()
        capped = {
            "cipher_suites": 100,
            "compression_methods": 65,
            "supported_versions": 100,
            "supported_groups": 100,
            "key_share_groups": 100,
            "signature_algorithms": 100,
            "signature_algorithms_cert": 100,
            "alpn": 70,
            "extensions": 71,
        }
        self.assertEqual(record["truncated"], capped)
        for key in capped:
            entries = record[key]
            assert isinstance(entries, list)
            self.assertEqual(len(entries), MAX_LIST_ENTRIES, key)
        alpn = record["alpn"]
        assert isinstance(alpn, list)
        self.assertEqual(alpn[-1], "p63")
        self.assertEqual(len(hello.cipher_suites), 100)
        exactly = parsed(
            HelloSpec(
                cipher_suites=many[:MAX_LIST_ENTRIES],
                extensions=[(EXT_ALPN, alpn_body([b"p%d" % i for i in range(MAX_LIST_ENTRIES)]))],
            ).wire()
        ).as_record()
        self.assertEqual(exactly["truncated"], {})
        self.assertEqual(len(exactly["alpn"]), MAX_LIST_ENTRIES)  # type: ignore[arg-type]

    def test_many_cipher_suites(self) -> None:
        """A list of suites over 255 bytes (a two-byte length) is read whole."""
        suites = list(range(0x0100, 0x0100 + 200))
        self.assertEqual(
            parsed(HelloSpec(cipher_suites=suites).wire()).cipher_suites, tuple(suites)
        )
        # So are the lists in extensions, whose lengths are checked the same way.
        groups = parsed(HelloSpec(extensions=[(EXT_SUPPORTED_GROUPS, u16_list(suites))]).wire())
        self.assertEqual(groups.supported_groups, tuple(suites))
        self.assertEqual(
            malformed_detail(HelloSpec(extensions=[(EXT_SUPPORTED_GROUPS, b"\x01\x00\x00\x17")])),
            "supported_groups says 256 bytes but has 2",
        )

    def test_empty_lists(self) -> None:
        """No suites and no compression methods are reported as sent (OpenSSL refuses them)."""
        body = HelloSpec(cipher_suites=[], compression_methods=b"", extensions=None).body()
        hello = parsed(frame(message_of(body), [999]))
        self.assertEqual((hello.cipher_suites, hello.compression_methods), ((), ()))
        self.assertEqual(
            malformed_detail(message_of(body[:-1])),
            "the ClientHello ends inside its compression methods",
        )

    def test_larger_than_64k_with_a_larger_limit(self) -> None:
        """The limit is a parameter: a 70 KB hello parses when the limit allows it."""
        # Each vector has a 16-bit length: fill both the suites and the extensions.
        spec = HelloSpec(cipher_suites=[0x1301] * 30000, extensions=[(0x0015, bytes(10000))])
        message = spec.message()
        self.assertGreater(len(message), 1 << 16)
        wire = frame(message, [MAX_RECORD_LENGTH])
        self.assertEqual(unparsed(wire).reason, TOO_LARGE)
        hello = ClientHelloCollector(len(wire)).feed(wire)
        assert isinstance(hello, ClientHello)
        self.assertEqual((hello.records, hello.length), (5, len(message) - 4))

    def test_strings_are_safe(self) -> None:
        """Controls, DEL, C1 codes, bidi overrides and backslashes are escaped."""
        nasty = b"a\x1b[31mb\x00\x7f\xc2\x85\xe2\x80\xae\\z"
        hello = parsed(
            HelloSpec(
                extensions=[(0, sni_body([(0, nasty)])), (EXT_ALPN, alpn_body([b"h2\n", nasty]))]
            ).wire()
        )
        record = hello.as_record()
        expected = "a\\x1b[31mb\\x00\\x7f\\xc2\\x85\\xe2\\x80\\xae\\\\z"
        self.assertEqual(record["sni"], expected)
        self.assertEqual(record["alpn"], ["h2\\x0a", expected])
        self.assertEqual(safe_text(nasty), expected)
        text = json.dumps(record, ensure_ascii=False)
        self.assertTrue(text.isascii() and text.isprintable())
        self.assertEqual(
            safe_text(bytes(range(0x20, 0x7F))),
            bytes(range(0x20, 0x7F)).decode().replace("\\", "\\\\"),
        )

    def test_strings_are_capped(self) -> None:
        """A string keeps 255 characters, never half an escape; ``truncated`` gives bytes."""
        long_name = b"x" * 300
        hello = parsed(
            HelloSpec(
                extensions=[
                    (0, sni_body([(0, long_name)])),
                    (
                        EXT_ALPN,
                        alpn_body([b"y" * 253 + b"\x01", b"z" * 255, b"w" * 250 + b"\\\\\\"]),
                    ),
                ]
            ).wire()
        )
        record = hello.as_record()
        self.assertEqual(record["sni"], "x" * MAX_STRING_CHARS)
        self.assertEqual(record["alpn"], ["y" * 253, "z" * 255, "w" * 250 + "\\\\" * 2])
        self.assertEqual(record["truncated"], {"sni": 300, "alpn[0]": 254, "alpn[2]": 253})
        self.assertEqual(safe_text(b"\x01" * 100), "\\x01" * 63)


# -- properties ----------------------------------------------------------------------------


class PropertyTests(SynchronousTestCase):
    """Hypothesis: any bytes, any split, any framing."""

    @PROPERTY
    @given(st.data())
    def test_any_bytes_never_raise(self, data: st.DataObject) -> None:
        """Any bytes split anywhere: an answer, never an exception, never over the limit."""
        prefix = data.draw(
            st.sampled_from([b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x03\x00"])
        )
        stream = prefix + data.draw(st.binary(max_size=400))
        limit = data.draw(st.sampled_from([MAX_COLLECT, 64, 200, 1000]))
        collector = ClientHelloCollector(limit)
        first: ClientHello | Unparsed | None = None
        for piece in data.draw(split_points(stream)):
            result = collector.feed(piece)
            self.assertLessEqual(collector.held, limit)
            if first is not None:
                self.assertIs(result, first)
            first = result
        self.assertIsInstance(collector.finish(), (ClientHello, Unparsed))

    @PROPERTY
    @given(hellos(), st.data())
    def test_damaged_hellos_never_raise(self, generated: Generated, data: st.DataObject) -> None:
        """A valid hello with bytes changed, cut or added still gets an answer."""
        wire = bytearray(generated.wire(data.draw(st.integers(1, 300))))
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(wire)))
            action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            if action == "flip" and position < len(wire):
                wire[position] ^= data.draw(st.integers(1, 255))
            elif action == "cut":
                del wire[position : position + data.draw(st.integers(1, 8))]
            else:
                wire[position:position] = data.draw(st.binary(min_size=1, max_size=4))
        limit = data.draw(st.sampled_from([MAX_COLLECT, 100, 500]))
        collector = ClientHelloCollector(limit)
        for piece in data.draw(split_points(bytes(wire))):
            collector.feed(piece)
            self.assertLessEqual(collector.held, limit)
        self.assertIsInstance(collector.finish(), (ClientHello, Unparsed))

    @PROPERTY
    @given(hellos())
    def test_round_trip(self, generated: Generated) -> None:
        """A generated hello parses to exactly the fields it was built with."""
        hello = parsed(generated.wire())
        self.assertEqual(hello, generated.expected)
        self.assertEqual(hello.psk, EXT_PRE_SHARED_KEY in hello.extensions)
        self.assertEqual(hello.early_data, EXT_EARLY_DATA in hello.extensions)
        self.assertEqual(hello.ech, EXT_ENCRYPTED_CLIENT_HELLO in hello.extensions)
        lists = (
            hello.cipher_suites,
            hello.extensions,
            hello.supported_versions,
            hello.supported_groups,
            hello.key_share_groups,
            hello.signature_algorithms,
            hello.signature_algorithms_cert,
        )
        self.assertEqual(hello.grease, any(is_grease(v) for values in lists for v in values))
        json.dumps(hello.as_record())

    @PROPERTY
    @given(hellos(), st.data())
    def test_fragmentation_changes_nothing(
        self, generated: Generated, data: st.DataObject
    ) -> None:
        """Records of any sizes, read in any pieces, give the one-record result."""
        message = generated.spec.message()
        sizes = data.draw(
            st.lists(st.integers(0, 400), min_size=1, max_size=6).filter(lambda s: s[-1] > 0)
        )
        wire = frame(message, sizes, generated.record_version)
        records = _count_records(wire)
        expected = replace(generated.expected, records=records)
        self.assertEqual(feed_all(data.draw(split_points(wire))), expected)

    @PROPERTY
    @given(hellos(), st.data())
    def test_truncated_is_incomplete(self, generated: Generated, data: st.DataObject) -> None:
        """Every proper prefix of a valid hello, however split, is incomplete."""
        wire = generated.wire(data.draw(st.integers(1, 500)))
        cut = data.draw(st.integers(0, len(wire) - 1))
        collector = ClientHelloCollector()
        for piece in data.draw(split_points(wire[:cut])):
            self.assertIsNone(collector.feed(piece))
        self.assertEqual(collector.finish().reason, INCOMPLETE)  # type: ignore[union-attr]


def _count_records(wire: bytes) -> int:
    """How many records ``wire`` holds."""
    count = position = 0
    while position < len(wire):
        position += 5 + struct.unpack_from(">H", wire, position + 3)[0]
        count += 1
    return count
