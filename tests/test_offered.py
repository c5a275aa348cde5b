"""The record's ``client_hello`` and JA4 fields: cached per kind of client, never stale.

:mod:`secure_echo.tls.offered` builds the part of the summary one kind of client
shares once and adds each connection's own fields.  Whatever the cache does, the
result must equal the summary built from scratch for that very hello.
"""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given, settings
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.edge.text import printable_bytes
from secure_echo.tls import offered
from secure_echo.wire.clienthello import MAX_LAYOUT_MESSAGE, ClientHello, Unparsed
from secure_echo.wire.ja4 import fingerprints
from tests.test_clienthello import FIXTURES, Generated, fixture, hellos, parsed


def from_scratch(hello: ClientHello) -> dict[str, object]:
    """The record's ``client_hello`` for ``hello``, with no cache in the way."""
    return json.loads(json.dumps(hello.as_record()))  # type: ignore[no-any-return]


class SummaryTests(SynchronousTestCase):
    """``summarise`` gives what ``as_record`` and ``fingerprints`` give."""

    def setUp(self) -> None:
        for cache in (offered._kinds, offered._summaries):
            cache.clear()
            self.addCleanup(cache.clear)

    def check(self, hello: ClientHello) -> None:
        raw, ja4, ja4_r = offered.summarise(hello)
        self.assertEqual(raw.value(), from_scratch(hello))
        marks = fingerprints(hello)
        self.assertEqual((ja4, ja4_r), (marks.ja4, marks.ja4_r))

    def test_recorded_clients(self) -> None:
        """Each recorded client's summary, first from the cache's miss, then its hit."""
        names = sorted(path.stem for path in FIXTURES.glob("*.bin"))
        self.assertGreater(len(names), 10)
        for name in names:
            hello = parsed(fixture(name))
            self.check(hello)
            self.check(hello)

    @settings(max_examples=200, deadline=None)
    @given(hellos())
    def test_generated(self, generated: Generated) -> None:
        """Any valid hello: the cached summary equals the one built from scratch."""
        self.check(generated.expected)

    def test_one_kind_many_connections(self) -> None:
        """Hellos differing only in per-connection fields share a kind, not their fields."""
        hello = parsed(fixture("openssl-sni"))
        assert hello.server_name is not None
        other = dataclasses.replace(
            hello,
            server_name=b"other.example\x1b[31m",
            session_id_length=0,
            session_ticket=7,
            length=hello.length + 1,
        )
        for each in (hello, other):
            self.check(each)
        self.assertEqual(len(offered._kinds), 1)
        fields = offered.offered(offered.summarise(other)[0])
        self.assertEqual(fields["sni"], printable_bytes(b"other.example\x1b[31m"))
        self.assertEqual(fields["session_ticket"], 7)
        # Without a server name at all the JA4 differs: another kind.
        self.check(dataclasses.replace(hello, server_name=None))
        self.assertEqual(len(offered._kinds), 2)

    def test_cache_is_bounded(self) -> None:
        """Past CACHE_SIZE kinds the oldest is forgotten; summaries stay right."""
        self.patch(offered, "CACHE_SIZE", 3)
        base = parsed(fixture("openssl-default"))
        kinds = [dataclasses.replace(base, cipher_suites=(0x1301 + n,)) for n in range(5)]
        for hello in kinds:
            self.check(hello)
        self.assertEqual(len(offered._kinds), 3)
        offered._summaries.clear()
        self.check(kinds[0])
        self.assertEqual(len(offered._kinds), 3)

    def test_one_hello_summed_up_once(self) -> None:
        """The same ClientHello object gets the same summary; an equal one, an equal one."""
        hello = parsed(fixture("openssl-sni"))
        first = offered.summarise(hello)
        self.assertIs(offered.summarise(hello), first)
        equal = dataclasses.replace(hello)
        second = offered.summarise(equal)
        self.assertIsNot(second, first)
        self.assertEqual(second[0].value(), first[0].value())
        self.assertEqual(second[1:], first[1:])

    def test_summaries_are_the_hellos_own(self) -> None:
        """A summary kept under a hello's id is given only to that very hello."""
        hello = parsed(fixture("openssl-sni"))
        other = parsed(fixture("curl"))
        offered._summaries[id(hello)] = (other, offered.summarise(other))
        self.check(hello)

    def test_summaries_are_bounded(self) -> None:
        """Past SUMMARIES_KEPT hellos the summaries kept start again."""
        self.patch(offered, "SUMMARIES_KEPT", 3)
        base = parsed(fixture("openssl-default"))
        for length in range(4):
            self.check(dataclasses.replace(base, length=length))
            self.assertEqual(len(offered._summaries), length % 3 + 1)

    def test_large_hellos_are_not_kept(self) -> None:
        """A hello too large for a layout is never handed out twice: not kept."""
        base = parsed(fixture("openssl-default"))
        self.check(dataclasses.replace(base, length=MAX_LAYOUT_MESSAGE))
        self.assertEqual(len(offered._summaries), 1)
        self.check(dataclasses.replace(base, length=MAX_LAYOUT_MESSAGE + 1))
        self.assertEqual(len(offered._summaries), 1)

    def test_unparsed(self) -> None:
        """An unparsed hello is its reason and detail, with no fingerprint."""
        raw, ja4, ja4_r = offered.summarise(Unparsed("not_tls", "first byte 0x47"))
        self.assertEqual(raw.value(), {"unparsed": "not_tls", "detail": "first byte 0x47"})
        self.assertEqual((ja4, ja4_r), (None, None))
        # Compact and in key order, as every record's text; nothing for the metrics.
        self.assertEqual(raw.text, '{"detail":"first byte 0x47","unparsed":"not_tls"}')
        self.assertEqual((raw.versions, raw.key_shares), ((), ()))
