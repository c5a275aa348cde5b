"""Clients seen before: a known layout gives the parse's result without the parse.

:mod:`secure_echo.wire.clienthello` keeps, per kind of client, the ranges of a
hello's bytes the parser interprets and their values; a later hello with the same
bytes there is answered from the layout.  These tests show when a layout is learnt
and used, that it is bounded, and, above all, that it never changes a result: the
answer with layouts is the answer without them, for any hello, damaged or not.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.wire import clienthello
from secure_echo.wire.clienthello import (
    EXT_ALPN,
    EXT_KEY_SHARE,
    EXT_PRE_SHARED_KEY,
    EXT_SERVER_NAME,
    EXT_SESSION_TICKET,
    EXT_SUPPORTED_GROUPS,
    EXT_SUPPORTED_VERSIONS,
    MAX_LAYOUT_MESSAGE,
    ClientHello,
    ClientHelloCollector,
    Unparsed,
    forget_layouts,
)
from tests.test_clienthello import (
    PROPERTY,
    Generated,
    HelloSpec,
    alpn_body,
    fixture,
    hellos,
    key_share_body,
    record,
    sni_body,
    u16_list,
)


def feed(data: bytes) -> ClientHello | Unparsed | None:
    """``data`` as one connection's first read."""
    return ClientHelloCollector().feed(data)


def general(data: bytes) -> ClientHello | Unparsed | None:
    """``data`` read in two pieces: the general path, which never uses a layout."""
    collector = ClientHelloCollector()
    collector.feed(data[:1])
    return collector.feed(data[1:])


def spec(
    *,
    random: bytes = bytes(32),
    session_id: bytes = bytes(32),
    name: bytes = b"echo.example",
    key: bytes = bytes(32),
    ticket: bytes = b"",
    padding: bytes = bytes(7),
    psk: bytes = bytes(40),
    groups: tuple[int, ...] = (0x001D, 0x0017),
    alpn: tuple[bytes, ...] = (b"h2",),
) -> HelloSpec:
    """A TLS 1.3 hello with every kind of per-connection field, as real clients send."""
    return HelloSpec(
        cipher_suites=(0x1301, 0x1302, 0x00FF),
        random=random,
        session_id=session_id,
        extensions=[
            (EXT_SERVER_NAME, sni_body([(0, name)])),
            (0x000B, b"\x03\x00\x01\x02"),  # ec_point_formats: only listed
            (EXT_SUPPORTED_GROUPS, u16_list(groups)),
            (EXT_SESSION_TICKET, ticket),
            (EXT_ALPN, alpn_body(alpn)),
            (EXT_SUPPORTED_VERSIONS, u16_list([0x0304], 1)),
            (EXT_KEY_SHARE, key_share_body([(0x001D, key)])),
            (0x0015, padding),
            (EXT_PRE_SHARED_KEY, psk),
        ],
    )


class LayoutTests(SynchronousTestCase):
    """When a layout is learnt, when it answers, and what it answers."""

    def setUp(self) -> None:
        """Start with no layouts, and leave none behind."""
        forget_layouts()
        self.addCleanup(forget_layouts)

    def parse_fails(self) -> None:
        """Make the parser fail the test if it runs: only a layout may answer."""

        def fail(*_: object) -> None:
            raise AssertionError("the hello was parsed")

        self.patch(clienthello, "_parse_body", fail)

    def learn(self, data: bytes) -> ClientHello:
        """Feed ``data`` twice, which learns its layout; the hello it gives."""
        first = feed(data)
        self.assertEqual(clienthello._LAYOUTS, {})
        hello = feed(data)
        assert isinstance(hello, ClientHello)
        self.assertEqual(hello, first)
        self.assertEqual(sum(map(len, clienthello._LAYOUTS.values())), 1)
        return hello

    def test_recorded_clients(self) -> None:
        """Each one-record recording without GREASE is learnt, then answered from it."""
        learnt = 0
        for name in ("openssl-default", "openssl-sni", "curl", "java", "python-ssl", "node"):
            forget_layouts()
            hello = self.learn(fixture(name))
            with self.subTest(name=name):
                self.assertIs(feed(fixture(name)), hello)
            learnt += 1
        self.assertEqual(learnt, 6)

    def test_per_connection_bytes_change_nothing(self) -> None:
        """Random, session id, keys, ticket, unread bodies differ: the layout answers."""
        hello = self.learn(spec().wire())
        self.parse_fails()
        other = spec(
            random=b"\x01" * 32,
            session_id=b"\x02" * 32,
            key=b"\x03" * 32,
            padding=b"\x04" * 7,
            psk=b"\x05" * 40,
        ).wire()
        self.assertIs(feed(other), hello)

    def test_long_keys_change_nothing(self) -> None:
        """A post-quantum key share (1,216 bytes) and a classic one, new on each connection."""

        def hello(fill: int) -> bytes:
            shares = [(0x11EC, bytes([fill]) * 1216), (0x001D, bytes([fill]) * 32)]
            extensions = [
                (EXT_KEY_SHARE, key_share_body(shares)),
                (EXT_SUPPORTED_VERSIONS, u16_list([0x0304], 1)),
            ]
            return HelloSpec(extensions=extensions).wire()

        learnt = self.learn(hello(0))
        self.parse_fails()
        self.assertIs(feed(hello(0xA5)), learnt)

    def test_another_server_name_of_the_same_length(self) -> None:
        """The server name is read from its place; the hello seen before is unchanged."""
        hello = self.learn(spec().wire())
        self.parse_fails()
        other = feed(spec(name=b"ECHO.example").wire())
        self.assertEqual(other, replace(hello, server_name=b"ECHO.example"))
        self.assertEqual(hello.server_name, b"echo.example")
        self.assertIs(feed(spec(name=b"ECHO.example").wire()), other)

    def test_interpreted_bytes_are_parsed(self) -> None:
        """A listed value, a length or a header that differs: the hello is parsed."""
        self.learn(spec().wire())
        for changed in (
            spec(groups=(0x001D, 0x0018)),
            spec(alpn=(b"h3",)),
            spec(ticket=b"\x00"),
            spec(name=b"echo.example.org"),
            replace(spec(), cipher_suites=(0x1301, 0x1303, 0x00FF)),
            replace(spec(), legacy_version=0x0301),
        ):
            data = changed.wire()
            with self.subTest(changed=changed):
                self.assertEqual(feed(data), general(data))
                self.assertNotEqual(feed(data), feed(spec().wire()))
        wire = spec().wire()
        self.assertEqual(feed(wire[:1] + b"\x03\x03" + wire[3:]).record_version, 0x0303)  # type: ignore[union-attr]

    def test_every_byte_changed(self) -> None:
        """Each byte of a learnt hello changed in turn: the answer is the one without layouts.

        Recorded and built hellos, with lengths whose high byte is not 0 (more than
        127 cipher suites, a key share or a server name of 256 bytes or more).
        """
        many = replace(spec(), cipher_suites=tuple(range(0x0100, 0x0100 + 200))).wire()
        # Entries of 256 bytes or more, each followed by more entries and by
        # extensions the parser reads: a post-quantum key share, a long other name.
        long_entries = HelloSpec(
            extensions=[
                (EXT_KEY_SHARE, key_share_body([(0x11EC, bytes(1216)), (0x001D, bytes(32))])),
                (EXT_SERVER_NAME, sni_body([(1, bytes(300)), (0, b"echo.example")])),
                (EXT_SUPPORTED_VERSIONS, u16_list([0x0304], 1)),
            ]
        ).wire()
        wires = (spec().wire(), many, long_entries, fixture("curl"), fixture("java"))
        for wire in wires:
            for position in range(len(wire)):
                damaged = bytearray(wire)
                damaged[position] ^= 0x01
                forget_layouts()
                feed(wire)
                feed(wire)
                with_layouts = feed(bytes(damaged))
                forget_layouts()
                self.assertEqual(with_layouts, feed(bytes(damaged)), position)

    def test_bytes_after_the_hello(self) -> None:
        """What follows the message (early data, another record) is not the layout's."""
        ends_listed = HelloSpec(extensions=[(EXT_SUPPORTED_GROUPS, u16_list([0x001D]))])
        for built in (spec(), ends_listed):
            forget_layouts()
            hello = self.learn(built.wire())
            with self.subTest(built=built):
                self.assertIs(feed(built.wire() + record(0x17, b"\x00" * 10)), hello)

    def test_first_host_name_only(self) -> None:
        """Of several server names, the first host_name is the one read."""
        names = sni_body([(1, b"other"), (0, b"first.example"), (0, b"second.example")])
        base = HelloSpec(extensions=[(EXT_SERVER_NAME, names)])
        self.learn(base.wire())
        self.parse_fails()
        names = sni_body([(1, b"OTHER"), (0, b"FIRST.example"), (0, b"SECOND.example")])
        hello = feed(HelloSpec(extensions=[(EXT_SERVER_NAME, names)]).wire())
        self.assertEqual(hello.server_name, b"FIRST.example")  # type: ignore[union-attr]

    def test_later_copies_of_an_extension_are_unread(self) -> None:
        """A second key_share or ALPN counts for nothing, so its bytes may differ."""
        base = spec().extensions
        assert base is not None
        extra = [(EXT_ALPN, alpn_body([b"x1"])), (EXT_KEY_SHARE, key_share_body([(1, b"k")]))]
        hello = self.learn(HelloSpec(extensions=[*base, *extra]).wire())
        self.parse_fails()
        extra = [(EXT_ALPN, alpn_body([b"y2"])), (EXT_KEY_SHARE, key_share_body([(2, b"K")]))]
        self.assertIs(feed(HelloSpec(extensions=[*base, *extra]).wire()), hello)

    def test_only_two_alike_in_a_row(self) -> None:
        """A hello unlike the one before it (same length) is not learnt."""
        feed(spec(groups=(0x001D, 0x0017)).wire())
        feed(spec(groups=(0x001D, 0x0018)).wire())
        feed(spec(groups=(0x001D, 0x0017)).wire())
        self.assertEqual(clienthello._LAYOUTS, {})

    def test_grease_is_never_learnt(self) -> None:
        """GREASE values change on every connection: no layout for such a client."""
        for _ in range(3):
            feed(spec(groups=(0x0A0A, 0x001D)).wire())
        chrome = fixture("curl-cffi-chrome")
        for _ in range(3):
            feed(chrome)
        self.assertEqual(clienthello._LAYOUTS, {})

    def test_general_path_neither_learns_nor_uses(self) -> None:
        """Hellos read in pieces are always parsed, and teach nothing."""
        data = spec().wire()
        general(data)
        general(data)
        self.assertEqual(clienthello._LAYOUTS, {})
        hello = self.learn(data)
        result = general(data)
        self.assertEqual(result, hello)
        self.assertIsNot(result, hello)

    def test_bounded(self) -> None:
        """At most four layouts per length: the oldest goes first."""
        for suite in range(6):
            data = replace(spec(), cipher_suites=(0x1301, suite)).wire()
            feed(data)
            feed(data)
        lengths = clienthello._LAYOUTS
        self.assertEqual([len(layouts) for layouts in lengths.values()], [4])
        kept = [layout.hello.cipher_suites for layout in next(iter(lengths.values()))]
        self.assertEqual(kept, [(0x1301, suite) for suite in (2, 3, 4, 5)])
        newest = replace(spec(), cipher_suites=(0x1301, 5)).wire()
        self.parse_fails()
        self.assertEqual(feed(newest).cipher_suites, (0x1301, 5))  # type: ignore[union-attr]
        self.assertEqual(feed(newest).cipher_suites, (0x1301, 5))  # type: ignore[union-attr]

    def test_layouts_bounded(self) -> None:
        """The 65th layout makes the table start again, with that one."""
        for padding in range(65):
            data = spec(padding=bytes(padding)).wire()
            feed(data)
            feed(data)
            self.assertEqual(sum(map(len, clienthello._LAYOUTS.values())), padding % 64 + 1)
            self.assertEqual(len(clienthello._LATEST), padding % 64 + 1)

    def test_small_hellos_only(self) -> None:
        """A message of up to MAX_LAYOUT_MESSAGE bytes is learnt; a longer one is not."""
        unpadded = len(spec(padding=b"").message())
        largest = spec(padding=bytes(MAX_LAYOUT_MESSAGE - unpadded)).wire()
        self.learn(largest)
        forget_layouts()
        longer = spec(padding=bytes(MAX_LAYOUT_MESSAGE - unpadded + 1)).wire()
        for _ in range(3):
            self.assertEqual(feed(longer).length, MAX_LAYOUT_MESSAGE - 3)  # type: ignore[union-attr]
        self.assertEqual((clienthello._LAYOUTS, clienthello._LATEST), ({}, {}))


class NoChangeTests(SynchronousTestCase):
    """Hypothesis: with layouts or without, every answer is the same."""

    def setUp(self) -> None:
        """Start with no layouts, and leave none behind."""
        forget_layouts()
        self.addCleanup(forget_layouts)

    @PROPERTY
    @given(hellos(with_grease=False), st.data())
    def test_any_damage(self, generated: Generated, data: st.DataObject) -> None:
        """A learnt hello with any bytes changed is answered as without layouts.

        Half the changes fall in the random, which a layout must ignore; the others
        anywhere.
        """
        forget_layouts()  # setUp runs once for all examples
        wire = generated.wire()
        feed(wire)
        hello = feed(wire)
        self.assertEqual(hello, generated.expected)
        self.assertEqual(len(clienthello._LAYOUTS), 1)
        damaged = bytearray(wire)
        anywhere = st.integers(0, len(damaged) - 1)
        for _ in range(data.draw(st.integers(1, 3))):
            position = data.draw(st.one_of(st.integers(11, 42), anywhere))
            damaged[position] ^= data.draw(st.integers(1, 255))
        with_layouts = feed(bytes(damaged))
        forget_layouts()
        self.assertEqual(with_layouts, feed(bytes(damaged)))

    @PROPERTY
    @given(hellos(with_grease=False), st.data())
    def test_per_connection_fields(self, generated: Generated, data: st.DataObject) -> None:
        """Another random and session id: the layout answers, with the same hello."""
        forget_layouts()
        wire = generated.wire()
        feed(wire)
        hello = feed(wire)
        spec = generated.spec
        size = len(spec.session_id)
        other = replace(
            spec,
            random=data.draw(st.binary(min_size=32, max_size=32)),
            session_id=data.draw(st.binary(min_size=size, max_size=size)),
        )
        self.assertIs(feed(other.wire(record_version=generated.record_version)), hello)

    @PROPERTY
    @given(hellos(), hellos())
    def test_another_hello(self, learnt: Generated, other: Generated) -> None:
        """Any other hello, of whatever length, is answered as without layouts."""
        forget_layouts()
        feed(learnt.wire())
        feed(learnt.wire())
        self.assertEqual(feed(other.wire()), other.expected)
