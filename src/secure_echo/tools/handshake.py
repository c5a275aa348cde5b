"""What the plaintext part of a TLS handshake says: the groups offered and the one chosen.

Python's ``ssl`` before 3.15 cannot tell which key-exchange group a connection used, nor
which groups it offered.  The client runs TLS over memory BIOs, so it holds every byte
of the handshake; this module reads those bytes, as a packet capture would.  It is pure:
bytes in, facts out, no I/O, no ``ssl``.

What is read, and from where:

* The client's offer: the first ClientHello's ``supported_groups`` (10), ``key_share``
  (51) and ALPN (16) extensions.
* The server's choice: in TLS 1.3, the ``key_share`` of the ServerHello, which is in the
  clear (a HelloRetryRequest, a ServerHello with the special random of RFC 8446 §4.1.3,
  is noted and skipped; the ServerHello after it names the group); in TLS 1.2, the
  named curve of an ECDHE ServerKeyExchange, which is in the clear before the server's
  ChangeCipherSpec.  Nothing after that point is read: it may be encrypted.

Rules: a parser never raises and never reads past what it was given; a stream cut short
or malformed gives ``None`` (or what was complete before the damage), never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

# The names the daemon's records use (OpenSSL's spelling), so both say the same.
from secure_echo.wire.clienthello import GROUP_NAMES, is_grease

if TYPE_CHECKING:
    from collections.abc import Iterator

_RECORD_HEADER = 5
_CHANGE_CIPHER_SPEC = 20
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_HELLO = 2
_SERVER_KEY_EXCHANGE = 12
_SERVER_HELLO_DONE = 14
_EXT_SUPPORTED_GROUPS = 10
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_EXT_KEY_SHARE = 51
_TLS13 = 0x0304
_NAMED_CURVE = 3
#: The ServerHello random that marks a HelloRetryRequest (RFC 8446 §4.1.3).
HELLO_RETRY_RANDOM = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)

#: The groups whose key exchange resists a quantum computer (ML-KEM, alone or hybrid).
POST_QUANTUM: frozenset[int] = frozenset({0x0200, 0x0201, 0x0202, 0x11EB, 0x11EC, 0x11ED, 0x6399})


def group_name(code: int) -> str:
    """Name a group: OpenSSL's name, ``GREASE`` for RFC 8701 values, else ``0x1234``."""
    if code in GROUP_NAMES:
        return GROUP_NAMES[code]
    if is_grease(code):
        return "GREASE"
    return f"0x{code:04x}"


@dataclass(frozen=True)
class ClientOffer:
    """What the first ClientHello offered."""

    groups: tuple[int, ...]
    key_shares: tuple[int, ...]
    alpn: tuple[bytes, ...]


@dataclass(frozen=True)
class ServerChoice:
    """The key-exchange group the server chose, and whether it asked for a retry first.

    ``group`` is ``None`` when the plaintext names none (a TLS 1.2 key exchange that is
    not ECDHE, a resumed session, or a stream cut short).
    """

    group: int | None
    retried: bool


class _ShortError(Exception):
    """The bytes ended, or a length pointed past them."""


class _Reader:
    """A cursor over one buffer; every read checks the bounds."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise _ShortError
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    @property
    def left(self) -> int:
        return len(self.data) - self.offset


def _records(stream: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield ``(content type, fragment)`` for each complete record at the start of ``stream``."""
    offset = 0
    while offset + _RECORD_HEADER <= len(stream):
        length = int.from_bytes(stream[offset + 3 : offset + 5], "big")
        end = offset + _RECORD_HEADER + length
        if end > len(stream):
            return
        yield stream[offset], stream[offset + _RECORD_HEADER : end]
        offset = end


def _messages(stream: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield handshake messages ``(type, body)`` from the leading plaintext records.

    A ChangeCipherSpec record is reported as ``(20, b"")`` so the reader can decide
    whether what follows is still plaintext; any other content type ends the stream.
    """
    pending = bytearray()
    for content_type, fragment in _records(stream):
        if content_type == _CHANGE_CIPHER_SPEC:
            yield _CHANGE_CIPHER_SPEC, b""
            continue
        if content_type != _HANDSHAKE:
            return
        pending += fragment
        while len(pending) >= 4:  # noqa: PLR2004 - type (1) + length (3)
            length = int.from_bytes(pending[1:4], "big")
            if len(pending) < 4 + length:
                break
            yield pending[0], bytes(pending[4 : 4 + length])
            del pending[: 4 + length]


def _extensions(reader: _Reader) -> dict[int, bytes]:
    """Read an extensions block (absent at the very end of a hello: empty)."""
    if not reader.left:
        return {}
    block = _Reader(reader.vector(2))
    found: dict[int, bytes] = {}
    while block.left:
        kind = block.number(2)
        found.setdefault(kind, block.vector(2))
    return found


def _u16_list(data: bytes) -> tuple[int, ...]:
    return tuple(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data) - 1, 2))


def parse_client_offer(stream: bytes) -> ClientOffer | None:
    """Read the first ClientHello in ``stream`` (what the client sent); ``None`` if absent."""
    try:
        for kind, body in _messages(stream):
            if kind != _CLIENT_HELLO:
                return None
            return _client_offer(_Reader(body))
    except _ShortError:
        return None
    return None


def _client_offer(hello: _Reader) -> ClientOffer:
    hello.take(2 + 32)  # legacy_version, random
    hello.vector(1)  # legacy_session_id
    hello.vector(2)  # cipher_suites
    hello.vector(1)  # legacy_compression_methods
    extensions = _extensions(hello)
    groups = _u16_list(_Reader(extensions.get(_EXT_SUPPORTED_GROUPS, b"\0\0")).vector(2))
    shares: list[int] = []
    if _EXT_KEY_SHARE in extensions:
        entries = _Reader(_Reader(extensions[_EXT_KEY_SHARE]).vector(2))
        while entries.left:
            shares.append(entries.number(2))
            entries.vector(2)
    protocols: list[bytes] = []
    if _EXT_ALPN in extensions:
        names = _Reader(_Reader(extensions[_EXT_ALPN]).vector(2))
        while names.left:
            protocols.append(names.vector(1))
    return ClientOffer(groups=groups, key_shares=tuple(shares), alpn=tuple(protocols))


@dataclass(frozen=True)
class _ServerHello:
    retry: bool
    tls13: bool
    key_share: int | None


def _server_hello(body: bytes) -> _ServerHello:
    hello = _Reader(body)
    hello.take(2)  # legacy_version
    random = hello.take(32)
    hello.vector(1)  # legacy_session_id_echo
    hello.take(2 + 1)  # cipher_suite, legacy_compression_method
    extensions = _extensions(hello)
    versions = extensions.get(_EXT_SUPPORTED_VERSIONS, b"")
    tls13 = len(versions) == 2 and int.from_bytes(versions, "big") == _TLS13  # noqa: PLR2004
    share = extensions.get(_EXT_KEY_SHARE)
    group = _Reader(share).number(2) if share is not None else None
    return _ServerHello(retry=random == HELLO_RETRY_RANDOM, tls13=tls13, key_share=group)


def parse_server_choice(stream: bytes, *, ecdhe: bool) -> ServerChoice | None:
    """Read the group the server chose from what it sent; ``None`` without a ServerHello.

    ``ecdhe`` says whether the negotiated TLS 1.2 cipher suite uses ECDHE; only then is a
    ServerKeyExchange read as naming a curve (a finite-field one starts with the prime's
    length, which can look like the ECDHE marker).  TLS 1.3 ignores it.
    """
    state = _ServerScan(ecdhe=ecdhe)
    try:
        for kind, body in _messages(stream):
            if state.read(kind, body):
                break
    except _ShortError:
        pass
    return state.choice()


class _ServerScan:
    """The walk through the server's plaintext messages, one message at a time."""

    def __init__(self, *, ecdhe: bool) -> None:
        self.ecdhe = ecdhe
        self.retried = False
        self.hello: _ServerHello | None = None
        self.group: int | None = None

    def read(self, kind: int, body: bytes) -> bool:
        """Take one message; return whether the scan is over."""
        if kind == _CHANGE_CIPHER_SPEC:
            # Only the compatibility CCS after a HelloRetryRequest is followed by more
            # plaintext; after any other, what follows may be encrypted.
            return not (self.retried and self.hello is None)
        if kind == _SERVER_HELLO and self.hello is None:
            parsed = _server_hello(body)
            if parsed.retry:
                self.retried = True
                return False
            self.hello = parsed
            self.group = parsed.key_share if parsed.tls13 else None
            return parsed.tls13
        if kind == _SERVER_KEY_EXCHANGE and self.hello is not None:
            params = _Reader(body)
            if self.ecdhe and params.number(1) == _NAMED_CURVE:
                self.group = params.number(2)
            return True
        return kind == _SERVER_HELLO_DONE

    def choice(self) -> ServerChoice | None:
        if self.hello is None:
            return None
        return ServerChoice(group=self.group, retried=self.retried)
