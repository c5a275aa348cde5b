"""What each client offered, as its record shows it: the ClientHello summary and JA4.

The connection feeds the client's first bytes to a
:class:`~secure_echo.wire.clienthello.ClientHelloCollector` until it has the
ClientHello (or knows it cannot read one); :func:`summarise` turns the result into
what the records carry: ``client_hello`` (an object, as
:meth:`~secure_echo.wire.clienthello.ClientHello.as_record` describes it) and
``ja4``, ``ja4_r``.

Cost matters here: this runs for every connection, on the handshake's path.  Most
connections come from few kinds of client (one browser build, one library, one
load balancer), and everything but a handful of fields is the same for all of one
kind.  So the JSON text of that part and the fingerprints are made once per kind
(an LRU cache keyed by what they depend on) and the record carries the text as
it is (:class:`RawJSON`), which the JSON log writes without encoding it again.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Final

from secure_echo.wire.clienthello import (
    GROUP_NAMES,
    MAX_LAYOUT_MESSAGE,
    VERSION_NAMES,
    ClientHello,
    Unparsed,
    is_grease,
    name_of,
)
from secure_echo.wire.clienthello import _escape as escape
from secure_echo.wire.ja4 import fingerprints

if TYPE_CHECKING:
    from collections.abc import Mapping

#: Kinds of client remembered (each entry: a few kilobytes of text).
CACHE_SIZE: Final = 512
#: ClientHello objects whose summary is kept (see ``_summaries``).
SUMMARIES_KEPT: Final = 64
#: Fields of :meth:`ClientHello.as_record` that differ between connections of one
#: kind of client; the rest are the kind's.
_PER_CONNECTION: Final = ("sni", "session_ticket", "session_id_length", "length", "truncated")


class RawJSON:
    """A record field whose value is JSON text already (written as it is).

    The text is ``head + tail``, joined only when the record is written: the head
    is the text shared by one kind of client, so a connection that stays open
    holds its own few fields, not a copy of the whole (about a kilobyte each).
    ``versions`` and ``key_shares`` are the offered TLS versions and key-share
    groups, by name, for the metrics (which count them, never the whole object).
    """

    __slots__ = ("_head", "_tail", "key_shares", "versions")

    def __init__(
        self,
        head: str,
        versions: tuple[str, ...],
        key_shares: tuple[str, ...],
        tail: str = "",
    ) -> None:
        self._head = head
        self._tail = tail
        self.versions = versions
        self.key_shares = key_shares

    @property
    def text(self) -> str:
        """The whole JSON text."""
        return self._head + self._tail

    def value(self) -> object:
        """The decoded value (for the info reply, and tests)."""
        return json.loads(self.text)


class _Kind:
    """What all connections of one kind of client share in their record."""

    __slots__ = ("ja4", "ja4_r", "key_shares", "text", "truncated", "versions")

    def __init__(self, hello: ClientHello) -> None:
        record = hello.as_record()
        shared = {key: value for key, value in record.items() if key not in _PER_CONNECTION}
        #: The shared fields as JSON, without the closing brace, and a comma after.
        self.text = json.dumps(shared, separators=(",", ":"), sort_keys=True)[:-1] + ","
        truncated = record["truncated"]
        self.truncated: dict[str, int] = truncated if isinstance(truncated, dict) else {}
        marks = fingerprints(hello)
        self.ja4 = marks.ja4
        self.ja4_r = marks.ja4_r
        versions = hello.supported_versions or (hello.legacy_version,)
        self.versions = tuple(name_of(v, VERSION_NAMES) for v in versions if not is_grease(v))
        self.key_shares = tuple(
            name_of(g, GROUP_NAMES) for g in hello.key_share_groups if not is_grease(g)
        )


#: The kinds seen, by :func:`_key`; the oldest is forgotten past CACHE_SIZE.
_kinds: dict[tuple[object, ...], _Kind] = {}


def _key(hello: ClientHello) -> tuple[object, ...]:
    """What the kind of ``hello`` depends on: every field but the per-connection ones.

    A plain tuple (hashed in C), not a second :class:`ClientHello`.  JA4 depends on
    whether a server name was sent, not on which.
    """
    return (
        hello.record_version,
        hello.legacy_version,
        hello.cipher_suites,
        hello.compression_methods,
        hello.extensions,
        hello.supported_versions,
        hello.supported_groups,
        hello.key_share_groups,
        hello.signature_algorithms,
        hello.signature_algorithms_cert,
        hello.alpn,
        hello.server_name is not None,
        hello.records,
    )


def _kind_of(hello: ClientHello) -> _Kind:
    key = _key(hello)
    kind = _kinds.get(key)
    if kind is None:
        if len(_kinds) >= CACHE_SIZE:
            del _kinds[next(iter(_kinds))]
        kind = _kinds[key] = _Kind(_kind_hello(hello))
    return kind


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _kind_hello(hello: ClientHello) -> ClientHello:
    """``hello`` with what differs between connections of one client cleared."""
    return replace(
        hello,
        session_id_length=0,
        server_name=b"" if hello.server_name is not None else None,
        session_ticket=None,
        length=0,
    )


#: The record's ``client_hello``, ``ja4`` and ``ja4_r``.
Summary = tuple[RawJSON, str | None, str | None]


#: What :func:`summarise` gave for a recent ClientHello, by the hello's ``id`` (the
#: hello is kept with it, so the id is not reused meanwhile).  The parser hands out
#: the same ClientHello object for every connection of a client whose layout it
#: knows (:mod:`secure_echo.wire.clienthello`), and a ClientHello never changes, so
#: neither does its summary.  Only hellos small enough to have a layout are kept
#: (others are never handed out twice), at most SUMMARIES_KEPT, then all forgotten.
_summaries: dict[int, tuple[ClientHello, Summary]] = {}


def summarise(result: ClientHello | Unparsed) -> Summary:
    """The record's ``client_hello``, ``ja4`` and ``ja4_r`` for a collector's result."""
    if isinstance(result, Unparsed):
        text = json.dumps(result.as_record(), separators=(",", ":"), sort_keys=True)
        return RawJSON(text, (), ()), None, None
    known = _summaries.get(id(result))
    if known is not None and known[0] is result:
        return known[1]
    summary = _summary(result)
    if result.length <= MAX_LAYOUT_MESSAGE:
        if len(_summaries) >= SUMMARIES_KEPT:
            _summaries.clear()
        _summaries[id(result)] = (result, summary)
    return summary


def _summary(result: ClientHello) -> Summary:
    """:func:`summarise` for a hello not summed up before."""
    kind = _kind_of(result)
    truncated = kind.truncated
    sni = "null"
    if result.server_name is not None:
        name, whole = escape(result.server_name)
        sni = json.dumps(name)
        if not whole:
            truncated = {**truncated, "sni": len(result.server_name)}
    ticket = result.session_ticket
    # The per-connection fields, in sorted key order, as json.dumps would write them.
    tail = (
        f'"length":{result.length},"session_id_length":{result.session_id_length},'
        f'"session_ticket":{"null" if ticket is None else ticket},"sni":{sni},'
        f'"truncated":{_dumps(truncated) if truncated else "{}"}}}'
    )
    return RawJSON(kind.text, kind.versions, kind.key_shares, tail), kind.ja4, kind.ja4_r


def offered(value: object) -> Mapping[str, object]:
    """A record's ``client_hello`` as a mapping, whichever form it has reached us in.

    In this process it is a :class:`RawJSON`; relayed from a worker process, a
    decoded object.
    """
    if isinstance(value, RawJSON):
        decoded = value.value()
        return decoded if isinstance(decoded, dict) else {}
    return value if isinstance(value, dict) else {}
