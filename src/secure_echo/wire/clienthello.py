"""The TLS ClientHello a client sends first: a pure, bounded, incremental parser.

People point TLS clients at secure-echo to learn what those clients do, so the
server reads what each client *offered*, not only what OpenSSL negotiated.  The TLS
transport has the client's first bytes as they arrive; it feeds them to a
:class:`ClientHelloCollector`, which reports one of three things:

* ``None``: incomplete, feed more;
* a :class:`ClientHello`: the parsed summary (:meth:`ClientHello.as_record` gives the
  JSON-ready form for the log);
* an :class:`Unparsed`: the bytes are not a ClientHello this parser can read, with a
  reason token and a short detail.  The parser is never in the way: OpenSSL still
  decides the handshake as before.

Wire format (RFC 8446 sections 4.1.2 and 5.1; RFC 5246 for the TLS 1.2 form)::

    record      = type:1 (0x16 handshake) version:2 (0x03xx) length:2 fragment
                  ; length <= 2^14; a ClientHello may span several records, and
                  ; nothing but handshake records may come between its fragments
    handshake   = msg_type:1 (0x01) length:3 body
    body        = legacy_version:2 random:32
                  session_id<0..32>          ; 1-byte length
                  cipher_suites<2..2^16-2>   ; 2-byte length, 2 bytes each
                  compression_methods<1..255>; 1-byte length
                  [ extensions<0..2^16-1> ]  ; 2-byte length; absent in old clients
    extension   = type:2 length:2 data

Contract of :class:`ClientHelloCollector`:

* ``feed(data)`` may be called with the stream split anywhere.  Once it has returned
  a result it returns the same result forever and holds nothing.
* It never looks past the first :data:`MAX_COLLECT` bytes of the stream and never
  holds more than that: what it keeps is the unfinished record plus the handshake
  bytes of finished ones, both taken from those first bytes.  A ClientHello that
  does not end within them is :data:`TOO_LARGE`.
* It never raises, whatever the bytes.
* Cost: a ClientHello that arrives whole in one read (the usual case) is parsed in
  place, with no buffering and no copy of the message, by a fast path that gives
  what the general one would; from a client seen before it is not parsed at all but
  matched against that client's layout ("clients seen before" below), which gives
  the same result.  Otherwise every byte is copied at most twice (into the
  unfinished record, then into the handshake buffer).  This runs for every
  connection: about a microsecond for a known client, a few for a new one (the
  comment above :func:`_parse_body` says how).

The parser checks lengths, not values: an empty cipher list, an unknown version or
a repeated extension is reported as sent (the first extension of a kind gives the
values), and OpenSSL judges it.  Summary lists keep what the client sent, in its
order, GREASE values included (:func:`is_grease`); :meth:`ClientHello.as_record`
caps them for the log.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

#: The collector stops at this many bytes of the stream (records and their headers).
MAX_COLLECT: Final = 64 * 1024
#: :meth:`ClientHello.as_record` keeps at most this many entries of each list.
MAX_LIST_ENTRIES: Final = 64
#: ... and at most this many characters of each client-controlled string (SNI, ALPN
#: values), counted after escaping.
MAX_STRING_CHARS: Final = 255

#: Reason tokens of :class:`Unparsed`.
NOT_TLS: Final = "not_tls"
SSLV2: Final = "sslv2"
NOT_CLIENT_HELLO: Final = "not_client_hello"
MALFORMED: Final = "malformed"
TOO_LARGE: Final = "too_large"
INCOMPLETE: Final = "incomplete"

#: Record content type and handshake type this parser reads.
HANDSHAKE_RECORD: Final = 0x16
CLIENT_HELLO_TYPE: Final = 0x01
#: Largest record fragment TLS allows (RFC 8446 section 5.1).
MAX_RECORD_LENGTH: Final = 2**14

#: Extension types this parser reads (IANA "TLS ExtensionType Values").
EXT_SERVER_NAME: Final = 0x0000
EXT_SUPPORTED_GROUPS: Final = 0x000A
EXT_SIGNATURE_ALGORITHMS: Final = 0x000D
EXT_ALPN: Final = 0x0010
EXT_SESSION_TICKET: Final = 0x0023
EXT_PRE_SHARED_KEY: Final = 0x0029
EXT_EARLY_DATA: Final = 0x002A
EXT_SUPPORTED_VERSIONS: Final = 0x002B
EXT_SIGNATURE_ALGORITHMS_CERT: Final = 0x0032
EXT_KEY_SHARE: Final = 0x0033
EXT_ENCRYPTED_CLIENT_HELLO: Final = 0xFE0D

_RECORD_HEADER: Final = 5
_HANDSHAKE_HEADER: Final = 4
#: A record header and the handshake header after it: content type, version,
#: length; message type and 3-byte length, read as one 32-bit value.
_HEADERS: Final = struct.Struct(">BHHI")
_RANDOM: Final = 32
_MAX_SESSION_ID: Final = 32
_SNI_HOST_NAME: Final = 0


#: The 16 GREASE values of RFC 8701: 0x0a0a, 0x1a1a, ... 0xfafa.
GREASE: Final = frozenset(0x0A0A + 0x1010 * index for index in range(16))


def is_grease(value: int) -> bool:
    """Whether a 16-bit value is GREASE (RFC 8701): ``0x?a?a`` with equal bytes."""
    return value in GREASE


@dataclass(frozen=True, slots=True)
class Unparsed:
    """The client's first bytes are not a ClientHello this parser reads.

    ``reason`` is one of the tokens :data:`NOT_TLS`, :data:`SSLV2`,
    :data:`NOT_CLIENT_HELLO`, :data:`MALFORMED`, :data:`TOO_LARGE`,
    :data:`INCOMPLETE`; ``detail`` says what exactly, in a few words.  Neither holds
    client bytes beyond numbers and at most one printable ASCII character, so both
    are safe to log.
    """

    reason: str
    detail: str

    def as_record(self) -> dict[str, str]:
        """The JSON-ready form: ``{"unparsed": reason, "detail": detail}``."""
        return {"unparsed": self.reason, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a client offered in its ClientHello, as sent (GREASE included).

    Numbers are the wire values.  ``server_name`` is the first ``host_name`` entry
    of the server_name extension (raw bytes, ``None`` without one); ``alpn`` the
    protocol names, raw.  Lists are empty when their extension is absent.
    ``session_ticket`` is ``None`` without the extension, else the length of the
    ticket offered (0: the client supports tickets but has none).  ``records`` is
    how many TLS records carried the message; ``length`` is the handshake body's
    length in bytes.
    """

    record_version: int
    legacy_version: int
    session_id_length: int
    cipher_suites: tuple[int, ...]
    compression_methods: tuple[int, ...]
    extensions: tuple[int, ...]
    supported_versions: tuple[int, ...] = ()
    supported_groups: tuple[int, ...] = ()
    key_share_groups: tuple[int, ...] = ()
    signature_algorithms: tuple[int, ...] = ()
    signature_algorithms_cert: tuple[int, ...] = ()
    alpn: tuple[bytes, ...] = ()
    server_name: bytes | None = None
    session_ticket: int | None = None
    records: int = 1
    length: int = 0

    @property
    def psk(self) -> bool:
        """The client offered a pre-shared key (resumption or external PSK)."""
        return EXT_PRE_SHARED_KEY in self.extensions

    @property
    def early_data(self) -> bool:
        """The client announced 0-RTT early data."""
        return EXT_EARLY_DATA in self.extensions

    @property
    def ech(self) -> bool:
        """The client sent the encrypted_client_hello extension (real or GREASE)."""
        return EXT_ENCRYPTED_CLIENT_HELLO in self.extensions

    @property
    def grease(self) -> bool:
        """Any GREASE value among versions, suites, extensions, groups or schemes."""
        lists = (
            self.supported_versions,
            self.cipher_suites,
            self.extensions,
            self.supported_groups,
            self.key_share_groups,
            self.signature_algorithms,
            self.signature_algorithms_cert,
        )
        return any(not GREASE.isdisjoint(values) for values in lists)

    def as_record(self) -> dict[str, object]:
        """The JSON-ready summary for the log.

        Versions, suites, groups, schemes, extensions and compression methods are
        IANA names where known, else ``0x1234`` hex.  Each list keeps at most
        :data:`MAX_LIST_ENTRIES` entries and each client string at most
        :data:`MAX_STRING_CHARS` characters (:func:`safe_text`); ``truncated`` names
        every field that was cut, with its full length (entries, or bytes for a
        string).
        """
        truncated: dict[str, int] = {}

        def names(key: str, values: tuple[int, ...], table: Mapping[int, str]) -> list[str]:
            if len(values) > MAX_LIST_ENTRIES:
                truncated[key] = len(values)
            return [name_of(value, table) for value in values[:MAX_LIST_ENTRIES]]

        def text(key: str, raw: bytes) -> str:
            escaped, whole = _escape(raw)
            if not whole:
                truncated[key] = len(raw)
            return escaped

        alpn = self.alpn
        if len(alpn) > MAX_LIST_ENTRIES:
            truncated["alpn"] = len(alpn)
        record: dict[str, object] = {
            "record_version": name_of(self.record_version, VERSION_NAMES),
            "legacy_version": name_of(self.legacy_version, VERSION_NAMES),
            "supported_versions": names(
                "supported_versions", self.supported_versions, VERSION_NAMES
            ),
            "cipher_suites": names("cipher_suites", self.cipher_suites, CIPHER_SUITE_NAMES),
            "supported_groups": names("supported_groups", self.supported_groups, GROUP_NAMES),
            "key_share_groups": names("key_share_groups", self.key_share_groups, GROUP_NAMES),
            "signature_algorithms": names(
                "signature_algorithms", self.signature_algorithms, SIGNATURE_SCHEME_NAMES
            ),
            "signature_algorithms_cert": names(
                "signature_algorithms_cert",
                self.signature_algorithms_cert,
                SIGNATURE_SCHEME_NAMES,
            ),
            "alpn": [
                text(f"alpn[{index}]", value)
                for index, value in enumerate(alpn[:MAX_LIST_ENTRIES])
            ],
            "sni": None if self.server_name is None else text("sni", self.server_name),
            "extensions": names("extensions", self.extensions, EXTENSION_NAMES),
            "compression_methods": names(
                "compression_methods", self.compression_methods, COMPRESSION_NAMES
            ),
            "session_id_length": self.session_id_length,
            "grease": self.grease,
            "psk": self.psk,
            "early_data": self.early_data,
            "session_ticket": self.session_ticket,
            "ech": self.ech,
            "records": self.records,
            "length": self.length,
        }
        record["truncated"] = truncated
        return record


def name_of(value: int, table: Mapping[int, str]) -> str:
    """The name of a 16-bit wire value, or its hex form (``0x0a0a``)."""
    name = table.get(value)
    return f"0x{value:04x}" if name is None else name


def _escape(raw: bytes) -> tuple[str, bool]:
    """Escape ``raw`` for a log line, cut at :data:`MAX_STRING_CHARS` characters.

    Printable ASCII stays, a backslash doubles, every other byte (controls, DEL,
    C1 codes, and each byte of a non-ASCII sequence such as a bidi override) becomes
    ``\\xNN``: the result is printable ASCII, so no byte of it can move a terminal's
    cursor or reorder text.  An escape is never cut in half.  The flag is False when
    the string was cut.
    """
    out: list[str] = []
    size = 0
    for byte in raw:
        piece = _ESCAPES[byte]
        size += len(piece)
        if size > MAX_STRING_CHARS:
            return "".join(out), False
        out.append(piece)
    return "".join(out), True


#: Byte -> its log-safe text.
_ESCAPES: Final = tuple(
    "\\\\" if byte == 0x5C else chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"  # noqa: PLR2004 - backslash, printable ASCII
    for byte in range(256)
)


def safe_text(raw: bytes) -> str:
    """Client bytes (an SNI, an ALPN value) as log-safe text; see :func:`_escape`."""
    return _escape(raw)[0]


# -- the collector ----------------------------------------------------------------


class _Refused(Exception):  # noqa: N818 - internal signal, never escapes the module
    """Raised inside the parser with its :class:`Unparsed` as the only argument."""


def _refused(reason: str, detail: str) -> _Refused:
    return _Refused(Unparsed(reason, detail))


def _malformed(detail: str) -> _Refused:
    return _refused(MALFORMED, detail)


def _ends_inside(what: str) -> _Refused:
    return _malformed(f"the ClientHello ends inside its {what}")


class ClientHelloCollector:
    """Collect and parse a connection's ClientHello; see the module docstring.

    ``limit`` is how many bytes of the stream it looks at (default
    :data:`MAX_COLLECT`).

    One is made for every connection and usually fed once, with the whole hello:
    that case allocates nothing but the result.  The buffers start as empty bytes
    and become bytearrays only when a record is left unfinished or a hello spans
    records.
    """

    _record_version: int

    __slots__ = (
        "_fragments",
        "_limit",
        "_pending",
        "_record_version",
        "_records",
        "_result",
        "_seen",
    )

    def __init__(self, limit: int = MAX_COLLECT) -> None:
        self._limit = limit
        self._seen = 0
        # Bytes of a record not yet complete (its header included).
        self._pending: bytes | bytearray = b""
        # Handshake bytes of the complete records so far (fragmented hellos only).
        self._fragments: bytes | bytearray = b""
        self._records = 0
        # _record_version is set by the first complete record header, before any
        # record counts in _records.
        self._result: ClientHello | Unparsed | None = None

    @property
    def result(self) -> ClientHello | Unparsed | None:
        """The result so far; ``None`` while incomplete."""
        return self._result

    @property
    def held(self) -> int:
        """Bytes held now (never more than the limit; 0 once there is a result)."""
        return len(self._pending) + len(self._fragments)

    def feed(self, data: bytes) -> ClientHello | Unparsed | None:
        """Consume the next bytes of the stream; return the result, or ``None``."""
        result = self._result
        if result is not None:
            return result
        if not self._seen and len(data) >= _HEADERS.size:
            # The usual first read: one record holding the whole hello, parsed
            # in place, or not parsed at all when its client's layout is known
            # (see "clients seen before").  Anything else takes the general path
            # below, which gives the same result for these bytes, only more slowly.
            content_type, version, length, handshake = _HEADERS.unpack_from(data)
            message = _HANDSHAKE_HEADER + (handshake & 0xFFFFFF)
            if (
                content_type == HANDSHAKE_RECORD
                and version >> 8 == 0x03  # noqa: PLR2004 - TLS and SSL 3.0 records are 3.x
                and handshake >> 24 == CLIENT_HELLO_TYPE
                and message <= length <= MAX_RECORD_LENGTH
                and _RECORD_HEADER + length <= len(data)
                and _RECORD_HEADER + length <= self._limit
            ):
                result = self._result = _one_record(data, version, message)
                return result
        # Slicing within its length returns ``data`` itself: no copy unless the
        # read goes past the limit.
        chunk = data[: self._limit - self._seen]
        self._seen += len(chunk)
        try:
            if self._pending:
                self._pending += chunk
                result = self._walk(self._pending)
            else:
                result = self._walk(chunk)
        except _Refused as error:
            result = error.args[0]
        if result is None and self._seen >= self._limit:
            result = Unparsed(
                TOO_LARGE, f"no complete ClientHello in the first {self._limit} bytes"
            )
        if result is not None:
            self._done(result)
        return result

    def finish(self) -> ClientHello | Unparsed:
        """The result at the end of the stream: an incomplete hello is Unparsed."""
        if self._result is None:
            self._done(
                Unparsed(INCOMPLETE, f"the stream ended after {self._seen} bytes of a hello")
            )
        assert self._result is not None
        return self._result

    def _done(self, result: ClientHello | Unparsed) -> None:
        self._result = result
        self._pending = self._fragments = b""

    def _walk(self, buf: bytes | bytearray) -> ClientHello | Unparsed | None:
        """Consume the complete records in ``buf``; keep the rest pending."""
        position = 0
        end = len(buf)
        while end - position >= _RECORD_HEADER:
            self._check_record_header(buf, position)
            length = buf[position + 3] << 8 | buf[position + 4]
            start = position + _RECORD_HEADER
            if end - start < length:
                if not self._records:
                    self._check_handshake_header(buf, start, end)
                self._keep(buf, position)
                return None
            self._records += 1
            position = start + length
            if not self._fragments:
                whole = self._whole_message(buf, start, position)
                if whole is not None:
                    return whole
                self._fragments = bytearray()
            self._fragments += memoryview(buf)[start:position]
            message = self._check_handshake_header(self._fragments, 0, len(self._fragments))
            if message is not None and len(self._fragments) >= message:
                return _parse_body(
                    self._fragments,
                    _HANDSHAKE_HEADER,
                    message,
                    self._record_version,
                    self._records,
                )
        if position < end:
            self._check_record_header(buf, position, end - position)
        self._keep(buf, position)
        return None

    def _keep(self, buf: bytes | bytearray, position: int) -> None:
        """Hold ``buf[position:]``, the start of a record not yet complete."""
        pending = self._pending
        if isinstance(pending, bytearray) and buf is pending:
            del pending[:position]
        else:
            # Nothing is pending when ``buf`` is a new read.
            self._pending = bytearray(memoryview(buf)[position:])

    def _whole_message(self, buf: bytes | bytearray, start: int, end: int) -> ClientHello | None:
        """The hello parsed in place when the record at ``start`` holds all of it."""
        message = self._check_handshake_header(buf, start, end)
        if message is None or end - start < message:
            return None
        return _parse_body(
            buf, start + _HANDSHAKE_HEADER, start + message, self._record_version, self._records
        )

    def _check_record_header(
        self, buf: bytes | bytearray, position: int, available: int = _RECORD_HEADER
    ) -> None:
        """Refuse a record header that is not a TLS handshake record.

        On the stream's first record that means the client does not speak TLS
        (:data:`NOT_TLS`, :data:`SSLV2`); on a later one, a malformed hello.
        """
        first = not self._records
        content_type = buf[position]
        if content_type != HANDSHAKE_RECORD:
            if first:
                raise _refused(*_not_tls(content_type))
            msg = f"a record of type 0x{content_type:02x} came inside the ClientHello"
            raise _malformed(msg)
        if available < 2:  # noqa: PLR2004 - the version's first byte
            return
        if buf[position + 1] != 0x03:  # noqa: PLR2004 - TLS and SSL 3.0 records are 3.x
            msg = f"record version 0x{buf[position + 1]:02x}.. is not TLS (0x03..)"
            raise _refused(NOT_TLS if first else MALFORMED, msg)
        if available < _RECORD_HEADER:
            return
        if first:
            self._record_version = buf[position + 1] << 8 | buf[position + 2]
        length = buf[position + 3] << 8 | buf[position + 4]
        if length > MAX_RECORD_LENGTH:
            msg = f"a record of {length} bytes is longer than TLS allows ({MAX_RECORD_LENGTH})"
            raise _malformed(msg)

    def _check_handshake_header(self, buf: bytes | bytearray, start: int, end: int) -> int | None:
        """The whole message's length, once its header is in ``buf[start:end]``.

        Refuses a message that is not a ClientHello, or one too long to fit in the
        limit, as soon as enough of its header is there to tell.
        """
        if end <= start:
            return None
        if buf[start] != CLIENT_HELLO_TYPE:
            msg = f"the first handshake message has type {buf[start]}, not ClientHello (1)"
            raise _refused(NOT_CLIENT_HELLO, msg)
        if end - start < _HANDSHAKE_HEADER:
            return None
        body = buf[start + 1] << 16 | buf[start + 2] << 8 | buf[start + 3]
        message = _HANDSHAKE_HEADER + body
        records = -(-message // MAX_RECORD_LENGTH)
        if message + records * _RECORD_HEADER > self._limit:
            msg = f"a ClientHello of {body} bytes does not fit in {self._limit} bytes"
            raise _refused(TOO_LARGE, msg)
        return message


def _one_record(data: bytes, version: int, message: int) -> ClientHello | Unparsed:
    """The hello of ``message`` bytes whole in the first record of the first read.

    From its client's layout when one matches (see "clients seen before"), else parsed
    in place.
    """
    layouts = _LAYOUTS.get(message)
    if layouts is not None:
        for layout in layouts:
            if layout.kept(data) == layout.values:
                return layout.hello_in(data)
    end = _RECORD_HEADER + message
    try:
        hello = _parse_body(data, _HEADERS.size, end, version, 1)
    except _Refused as error:
        refused: Unparsed = error.args[0]
        return refused
    _remember(data, end, hello)
    return hello


def _not_tls(first: int) -> tuple[str, str]:
    """Reason and detail for a stream whose first byte is not a handshake record."""
    if first & 0x80:
        return SSLV2, f"first byte 0x{first:02x}: an SSL 2.0-style record header"
    shown = f" ({chr(first)!r})" if 0x20 <= first < 0x7F else ""  # noqa: PLR2004 - printable
    return NOT_TLS, f"first byte 0x{first:02x}{shown} is not a TLS handshake record (0x16)"


def parse_client_hello(data: bytes) -> ClientHello | Unparsed | None:
    """Parse a ClientHello from a stream's first bytes at once (``None``: incomplete)."""
    return ClientHelloCollector().feed(data)


# -- the message -----------------------------------------------------------------
#
# The parser runs once per connection, on the handshake's path, so it is written
# for what CPython makes cheap: one pass over the body with the bounds checks
# inline (a call costs more than a check), headers read by a prepared struct,
# lists of 16-bit values found in a cache of recent ones, the fields kept in locals
# and the result filled in as a draft.  Each length is checked where it is read,
# so the error reported is the first inconsistency in wire order.


#: An extension's type and length; a key share's group and length.
_TWO_U16: Final = struct.Struct(">HH")


#: Lists of 16-bit values (suites, groups, schemes, versions) by their bytes.
#: Clients of one kind send the same lists on every connection, and finding a
#: tuple here costs less than unpacking it again, which makes an int object of
#: each value.  Only lists of fewer than :data:`MAX_LIST_ENTRIES` values are kept,
#: and at most :data:`_LISTS_KEPT` of them (some hundreds of kilobytes at worst);
#: when that many are, all are forgotten.
_LISTS: Final[dict[bytes, tuple[int, ...]]] = {}
_LISTS_KEPT: Final = 256


def _unpack_u16s(raw: bytes) -> tuple[int, ...]:
    """The big-endian 16-bit values in ``raw`` (of even length), kept if short.

    Called as ``_LISTS.get(raw) or _unpack_u16s(raw)``: an empty list, found but
    falsy, is unpacked again, which costs next to nothing.
    """
    count = len(raw) >> 1
    values: tuple[int, ...] = struct.unpack(f">{count}H", raw)
    if count < MAX_LIST_ENTRIES:
        if len(_LISTS) >= _LISTS_KEPT:
            _LISTS.clear()
        _LISTS[raw] = values
    return values


class _Draft:
    """A :class:`ClientHello` being filled in: the same slots, none of the freezing.

    A frozen dataclass sets each field through ``object.__setattr__``, which for
    sixteen fields costs more than the rest of a typical parse.  The parser sets a
    draft's fields as plain slots instead and then makes it a ClientHello, which
    their identical layout allows; from then on it is frozen like any other.
    """

    __slots__ = ClientHello.__slots__


def _parse_body(  # noqa: C901, PLR0912, PLR0915 - one pass, see the section comment
    buf: bytes | bytearray, position: int, end: int, record_version: int, records: int
) -> ClientHello:
    """Parse the ClientHello body in ``buf[position:end]``.

    Nothing outside that range counts.  Of each extension kind :data:`_READ`
    lists, the first copy is read and its lengths checked; later copies and other
    kinds are only listed.
    """
    length = end - position
    if length < 2 + _RANDOM + 1:
        raise _ends_inside("version and random")
    legacy_version = buf[position] << 8 | buf[position + 1]
    position += 2 + _RANDOM
    session_id_length = buf[position]
    if session_id_length > _MAX_SESSION_ID:
        msg = f"session id of {session_id_length} bytes (at most {_MAX_SESSION_ID})"
        raise _malformed(msg)
    position += 1 + session_id_length
    if position > end:
        raise _ends_inside("session id")
    if end - position < 2:  # noqa: PLR2004 - the 2-byte length
        raise _ends_inside("cipher suites")
    size = buf[position] << 8 | buf[position + 1]
    position += 2
    if end - position < size:
        raise _ends_inside("cipher suites")
    if size % 2:
        msg = f"cipher suites of {size} bytes (an odd number)"
        raise _malformed(msg)
    raw = buf[position : position + size]
    position += size
    if isinstance(raw, bytearray):  # a hello in pieces: unhashable
        raw = bytes(raw)
    cipher_suites = _LISTS.get(raw) or _unpack_u16s(raw)
    if position >= end:
        raise _ends_inside("compression methods")
    size = buf[position]
    position += 1
    if end - position < size:
        raise _ends_inside("compression methods")
    if size == 1:  # the usual case (null only): no slice
        compression_methods: tuple[int, ...] = (buf[position],)
    else:
        compression_methods = tuple(buf[position : position + size])
    position += size
    types: list[int] = []
    # None until the first extension of the kind is read.
    supported_versions: tuple[int, ...] | None = None
    supported_groups: tuple[int, ...] | None = None
    key_share_groups: tuple[int, ...] | None = None
    signature_algorithms: tuple[int, ...] | None = None
    signature_algorithms_cert: tuple[int, ...] | None = None
    alpn: tuple[bytes, ...] | None = None
    server_name: bytes | None = None
    server_names = 0  # how many server_name extensions (the name may be None)
    session_ticket: int | None = None
    if position < end:
        if end - position < 2:  # noqa: PLR2004 - the 2-byte length
            raise _ends_inside("extensions length")
        size = buf[position] << 8 | buf[position + 1]
        position += 2
        if end - position != size:
            msg = f"extensions of {size} bytes in the {end - position} bytes left"
            raise _malformed(msg)
        append = types.append
        header = _TWO_U16.unpack_from
        read = _READ
        while position < end:
            # No check that the header fits before ``end``: one that does not is
            # refused below, its bytes past ``end`` (when ``buf`` goes on) unused.
            try:
                kind, size = header(buf, position)
            except struct.error:  # ``buf`` ends first
                raise _ends_inside("extension header") from None
            start = position + 4
            position = start + size
            if position > end:
                if start > end:
                    raise _ends_inside("extension header")
                raise _ends_inside(f"extension 0x{kind:04x}")
            append(kind)
            if kind not in read:
                continue
            if kind == EXT_KEY_SHARE:
                if key_share_groups is None:
                    key_share_groups = _read_key_share(buf, start, position)
            elif kind == EXT_SUPPORTED_VERSIONS:
                if supported_versions is None:
                    supported_versions = _u16_list(buf, start, position, 1, "supported_versions")
            elif kind == EXT_SUPPORTED_GROUPS:
                if supported_groups is None:
                    supported_groups = _u16_list(buf, start, position, 2, "supported_groups")
            elif kind == EXT_SIGNATURE_ALGORITHMS:
                if signature_algorithms is None:
                    signature_algorithms = _u16_list(
                        buf, start, position, 2, "signature_algorithms"
                    )
            elif kind == EXT_SESSION_TICKET:
                if session_ticket is None:
                    session_ticket = position - start
            elif kind == EXT_SERVER_NAME:
                server_names += 1
                if server_names == 1:
                    server_name = _read_server_name(buf, start, position)
            elif kind == EXT_ALPN:
                if alpn is None:
                    alpn = _read_alpn(buf, start, position)
            elif signature_algorithms_cert is None:  # EXT_SIGNATURE_ALGORITHMS_CERT
                signature_algorithms_cert = _u16_list(
                    buf, start, position, 2, "signature_algorithms_cert"
                )
    hello: Any = _Draft()
    hello.record_version = record_version
    hello.legacy_version = legacy_version
    hello.session_id_length = session_id_length
    hello.cipher_suites = cipher_suites
    hello.compression_methods = compression_methods
    hello.extensions = tuple(types)
    hello.supported_versions = supported_versions or ()
    hello.supported_groups = supported_groups or ()
    hello.key_share_groups = key_share_groups or ()
    hello.signature_algorithms = signature_algorithms or ()
    hello.signature_algorithms_cert = signature_algorithms_cert or ()
    hello.alpn = alpn or ()
    hello.server_name = server_name
    hello.session_ticket = session_ticket
    hello.records = records
    hello.length = length
    hello.__class__ = ClientHello
    parsed: ClientHello = hello
    return parsed


#: The extension kinds :func:`_parse_body` reads.
_READ: Final = frozenset(
    {
        EXT_SERVER_NAME,
        EXT_SUPPORTED_GROUPS,
        EXT_SIGNATURE_ALGORITHMS,
        EXT_ALPN,
        EXT_SESSION_TICKET,
        EXT_SUPPORTED_VERSIONS,
        EXT_SIGNATURE_ALGORITHMS_CERT,
        EXT_KEY_SHARE,
    }
)


def _vector(buf: bytes | bytearray, start: int, end: int, what: str) -> int:
    """The start of a vector whose 2-byte length must fill ``buf[start:end]``."""
    available = end - start - 2
    if available < 0:
        msg = f"{what} is too short for its length"
        raise _malformed(msg)
    size = buf[start] << 8 | buf[start + 1]
    if available != size:
        msg = f"{what} says {size} bytes but has {available}"
        raise _malformed(msg)
    return start + 2


def _u16_list(
    buf: bytes | bytearray, start: int, end: int, prefix: int, what: str
) -> tuple[int, ...]:
    """A list of 16-bit values with a ``prefix``-byte length filling ``buf[start:end]``."""
    available = end - start - prefix
    if available < 0:
        msg = f"{what} is too short for its length"
        raise _malformed(msg)
    size = buf[start] if prefix == 1 else buf[start] << 8 | buf[start + 1]
    if available != size:
        msg = f"{what} says {size} bytes but has {available}"
        raise _malformed(msg)
    if size % 2:
        msg = f"{what} has an odd length"
        raise _malformed(msg)
    start += prefix
    raw = buf[start : start + size]
    if isinstance(raw, bytearray):  # a hello in pieces: unhashable
        raw = bytes(raw)
    return _LISTS.get(raw) or _unpack_u16s(raw)


def _read_server_name(buf: bytes | bytearray, start: int, end: int) -> bytes | None:
    """The first host_name entry of a server_name extension, or ``None``."""
    position = _vector(buf, start, end, "server_name")
    name = None
    while position < end:
        if end - position < 3:  # noqa: PLR2004 - type and length
            raise _ends_inside("server_name entry")
        kind = buf[position]
        start = position + 3
        position = start + (buf[position + 1] << 8 | buf[position + 2])
        if position > end:
            raise _ends_inside("server_name entry")
        if kind == _SNI_HOST_NAME and name is None:
            name = bytes(buf[start:position])
    return name


def _read_alpn(buf: bytes | bytearray, start: int, end: int) -> tuple[bytes, ...]:
    """The protocol names of an ALPN extension."""
    position = _vector(buf, start, end, "ALPN")
    names = []
    while position < end:
        start = position + 1
        position = start + buf[position]
        if position > end:
            raise _ends_inside("ALPN protocol name")
        names.append(bytes(buf[start:position]))
    return tuple(names)


def _read_key_share(buf: bytes | bytearray, start: int, end: int) -> tuple[int, ...]:
    """The groups of a ClientHello key_share extension's entries."""
    position = _vector(buf, start, end, "key_share")
    groups = []
    while position < end:
        if end - position < 4:  # noqa: PLR2004 - group and length
            raise _ends_inside("key_share entry")
        group, size = _TWO_U16.unpack_from(buf, position)
        groups.append(group)
        position += 4 + size
        if position > end:
            raise _ends_inside("key_share entry")
    return tuple(groups)


# -- clients seen before -----------------------------------------------------------
#
# A client of one kind sends the same ClientHello on every connection but for bytes
# this parser never interprets: the random, the session id, each key share's key,
# a ticket, the bodies of the extensions it only lists (a pre_shared_key's
# identities and binders, padding, ECH...) and of later copies of an extension, and
# the server name, which it copies out without interpreting it.  What it does
# interpret (headers, every length and type, every listed value) sits at the same
# offsets with the same values in every hello of that kind.
#
# So the fast path keeps a *layout* of such a client: the ranges of the bytes the
# parser interprets, and their values.  A later one-record hello of the same
# message length whose bytes in those ranges are the same parses, by the same
# deterministic parser, to the same ClientHello but for the server name, which is
# read from its place.  Checking that is a few slices compared in C instead of a
# walk in Python.  A layout can only save work, never change a result: the tests
# compare both paths on generated and damaged hellos.
#
# A layout is learnt from the second of two hellos of one message length in a row
# that parse alike, so clients whose hellos differ on every connection (GREASE
# values, shuffled extensions) never fill the table with layouts nobody meets
# again; and hellos with GREASE values are not learnt at all.


class _Layout:
    """What one client's hellos share: the interpreted bytes, and the hello they give."""

    __slots__ = ("hello", "kept", "name", "values")

    def __init__(
        self,
        kept: Callable[[bytes], object],
        values: object,
        name: slice | None,
        hello: ClientHello,
    ) -> None:
        #: Takes the interpreted ranges out of a hello's bytes ...
        self.kept = kept
        #: ... which must equal these for the layout to apply.
        self.values = values
        #: Where the server name's bytes are (``None``: the hello has none).
        self.name = name
        #: The hello the layout gives, with the server name seen last.
        self.hello = hello

    def hello_in(self, data: bytes) -> ClientHello:
        """The ClientHello of ``data``, whose interpreted bytes match the layout."""
        hello = self.hello
        name = self.name
        if name is not None:
            server_name = bytes(data[name])
            if server_name != hello.server_name:
                hello = self.hello = replace(hello, server_name=server_name)
        return hello


#: Layouts by the length of the handshake message they describe.
_LAYOUTS: Final[dict[int, list[_Layout]]] = {}
#: Only hellos of at most this many bytes are learnt (real clients send 200 to 2,000;
#: a hybrid post-quantum key share is about 1,200).
MAX_LAYOUT_MESSAGE: Final = 4096
#: At most this many layouts are kept, at most _LAYOUTS_PER_LENGTH per length; when
#: that many are, all are forgotten.  With the size bound, what layouts and the
#: latest hellos hold stays within a few megabytes whatever clients send, and is a
#: few tens of kilobytes for real ones.
_LAYOUTS_KEPT: Final = 64
_LAYOUTS_PER_LENGTH: Final = 4
#: The latest hello the fast path parsed, by message length (at most
#: _LAYOUTS_KEPT lengths, then all forgotten).
_LATEST: Final[dict[int, ClientHello]] = {}


def forget_layouts() -> None:
    """Forget every layout learnt (for tests that count what the parser does)."""
    _LAYOUTS.clear()
    _LATEST.clear()


def _remember(data: bytes, end: int, hello: ClientHello) -> None:
    """Learn the layout of ``data[:end]`` if the hello before it parsed alike."""
    message = end - _RECORD_HEADER
    if message > MAX_LAYOUT_MESSAGE:
        return
    latest = _LATEST.get(message)
    if latest is None or latest != hello or hello.grease:
        if len(_LATEST) >= _LAYOUTS_KEPT:
            _LATEST.clear()
        _LATEST[message] = hello
        return
    opaque, name = _opaque_ranges(data, end)
    slices = []
    position = 0
    for start, stop in opaque:
        if stop > start:  # an empty range hides nothing
            if start > position:
                slices.append(slice(position, start))
            position = stop
    if end > position:
        slices.append(slice(position, end))
    kept = operator.itemgetter(*slices)
    if sum(map(len, _LAYOUTS.values())) >= _LAYOUTS_KEPT:
        _LAYOUTS.clear()
    layouts = _LAYOUTS.setdefault(message, [])
    if len(layouts) >= _LAYOUTS_PER_LENGTH:
        del layouts[0]
    layouts.append(_Layout(kept, kept(data), name, hello))


def _opaque_ranges(data: bytes, end: int) -> tuple[list[tuple[int, int]], slice | None]:
    """The ranges of ``data[:end]``, a hello just parsed, that the parser does not interpret.

    In increasing order; and where the server name is (one of them), if anywhere.
    Every length and type, and everything :func:`_parse_body` reads as a value,
    stays outside them.
    """
    position = _RECORD_HEADER + _HANDSHAKE_HEADER + 2
    ranges = [(position, position + _RANDOM)]
    position += _RANDOM
    ranges.append((position + 1, position + 1 + data[position]))
    position += 1 + data[position]
    position += 2 + (data[position] << 8 | data[position + 1])
    position += 1 + data[position]
    name = None
    if position >= end:
        return ranges, name
    position += 2
    read: set[int] = set()
    while position < end:
        kind, size = _TWO_U16.unpack_from(data, position)
        start = position + 4
        position = start + size
        if kind not in _READ or kind in read:
            ranges.append((start, position))
            continue
        read.add(kind)
        if kind == EXT_SESSION_TICKET:
            ranges.append((start, position))
        elif kind == EXT_KEY_SHARE:
            entry = start + 2
            while entry < position:
                key = data[entry + 2] << 8 | data[entry + 3]
                ranges.append((entry + 4, entry + 4 + key))
                entry += 4 + key
        elif kind == EXT_SERVER_NAME:
            entry = start + 2
            while entry < position:
                begin = entry + 3
                entry = begin + (data[entry + 1] << 8 | data[entry + 2])
                # The first host_name is copied out; the other names are only skipped.
                if data[begin - 3] == _SNI_HOST_NAME and name is None:
                    name = slice(begin, entry)
                ranges.append((begin, entry))
    return ranges, name


# -- names (IANA TLS registries; a static subset of what clients send) ---------------


VERSION_NAMES: Final = {
    0x0002: "SSL 2.0",
    0x0300: "SSL 3.0",
    0x0301: "TLS 1.0",
    0x0302: "TLS 1.1",
    0x0303: "TLS 1.2",
    0x0304: "TLS 1.3",
    0xFEFF: "DTLS 1.0",
    0xFEFD: "DTLS 1.2",
    0xFEFC: "DTLS 1.3",
}

CIPHER_SUITE_NAMES: Final = {
    0x0004: "TLS_RSA_WITH_RC4_128_MD5",
    0x0005: "TLS_RSA_WITH_RC4_128_SHA",
    0x000A: "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    0x0013: "TLS_DHE_DSS_WITH_3DES_EDE_CBC_SHA",
    0x0016: "TLS_DHE_RSA_WITH_3DES_EDE_CBC_SHA",
    0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA",
    0x0032: "TLS_DHE_DSS_WITH_AES_128_CBC_SHA",
    0x0033: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA",
    0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA",
    0x0038: "TLS_DHE_DSS_WITH_AES_256_CBC_SHA",
    0x0039: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA",
    0x003C: "TLS_RSA_WITH_AES_128_CBC_SHA256",
    0x003D: "TLS_RSA_WITH_AES_256_CBC_SHA256",
    0x0040: "TLS_DHE_DSS_WITH_AES_128_CBC_SHA256",
    0x0067: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256",
    0x006A: "TLS_DHE_DSS_WITH_AES_256_CBC_SHA256",
    0x006B: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256",
    0x009C: "TLS_RSA_WITH_AES_128_GCM_SHA256",
    0x009D: "TLS_RSA_WITH_AES_256_GCM_SHA384",
    0x009E: "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    0x009F: "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    0x00A2: "TLS_DHE_DSS_WITH_AES_128_GCM_SHA256",
    0x00A3: "TLS_DHE_DSS_WITH_AES_256_GCM_SHA384",
    0x00FF: "TLS_EMPTY_RENEGOTIATION_INFO_SCSV",
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0x1304: "TLS_AES_128_CCM_SHA256",
    0x1305: "TLS_AES_128_CCM_8_SHA256",
    0x5600: "TLS_FALLBACK_SCSV",
    0xC004: "TLS_ECDH_ECDSA_WITH_AES_128_CBC_SHA",
    0xC005: "TLS_ECDH_ECDSA_WITH_AES_256_CBC_SHA",
    0xC008: "TLS_ECDHE_ECDSA_WITH_3DES_EDE_CBC_SHA",
    0xC009: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    0xC00A: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    0xC00E: "TLS_ECDH_RSA_WITH_AES_128_CBC_SHA",
    0xC00F: "TLS_ECDH_RSA_WITH_AES_256_CBC_SHA",
    0xC012: "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    0xC023: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    0xC024: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
    0xC025: "TLS_ECDH_ECDSA_WITH_AES_128_CBC_SHA256",
    0xC026: "TLS_ECDH_ECDSA_WITH_AES_256_CBC_SHA384",
    0xC027: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    0xC028: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
    0xC029: "TLS_ECDH_RSA_WITH_AES_128_CBC_SHA256",
    0xC02A: "TLS_ECDH_RSA_WITH_AES_256_CBC_SHA384",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02D: "TLS_ECDH_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02E: "TLS_ECDH_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xC031: "TLS_ECDH_RSA_WITH_AES_128_GCM_SHA256",
    0xC032: "TLS_ECDH_RSA_WITH_AES_256_GCM_SHA384",
    0xC050: "TLS_RSA_WITH_ARIA_128_GCM_SHA256",
    0xC051: "TLS_RSA_WITH_ARIA_256_GCM_SHA384",
    0xC052: "TLS_DHE_RSA_WITH_ARIA_128_GCM_SHA256",
    0xC053: "TLS_DHE_RSA_WITH_ARIA_256_GCM_SHA384",
    0xC056: "TLS_DHE_DSS_WITH_ARIA_128_GCM_SHA256",
    0xC057: "TLS_DHE_DSS_WITH_ARIA_256_GCM_SHA384",
    0xC05C: "TLS_ECDHE_ECDSA_WITH_ARIA_128_GCM_SHA256",
    0xC05D: "TLS_ECDHE_ECDSA_WITH_ARIA_256_GCM_SHA384",
    0xC060: "TLS_ECDHE_RSA_WITH_ARIA_128_GCM_SHA256",
    0xC061: "TLS_ECDHE_RSA_WITH_ARIA_256_GCM_SHA384",
    0xC09C: "TLS_RSA_WITH_AES_128_CCM",
    0xC09D: "TLS_RSA_WITH_AES_256_CCM",
    0xC09E: "TLS_DHE_RSA_WITH_AES_128_CCM",
    0xC09F: "TLS_DHE_RSA_WITH_AES_256_CCM",
    0xC0A0: "TLS_RSA_WITH_AES_128_CCM_8",
    0xC0A1: "TLS_RSA_WITH_AES_256_CCM_8",
    0xC0A2: "TLS_DHE_RSA_WITH_AES_128_CCM_8",
    0xC0A3: "TLS_DHE_RSA_WITH_AES_256_CCM_8",
    0xC0AC: "TLS_ECDHE_ECDSA_WITH_AES_128_CCM",
    0xC0AD: "TLS_ECDHE_ECDSA_WITH_AES_256_CCM",
    0xC0AE: "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
    0xC0AF: "TLS_ECDHE_ECDSA_WITH_AES_256_CCM_8",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCAA: "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}

GROUP_NAMES: Final = {
    0x0015: "secp224r1",
    0x0016: "secp256k1",
    0x0017: "secp256r1",
    0x0018: "secp384r1",
    0x0019: "secp521r1",
    0x001A: "brainpoolP256r1",
    0x001B: "brainpoolP384r1",
    0x001C: "brainpoolP512r1",
    0x001D: "x25519",
    0x001E: "x448",
    0x001F: "brainpoolP256r1tls13",
    0x0020: "brainpoolP384r1tls13",
    0x0021: "brainpoolP512r1tls13",
    0x0029: "curveSM2",
    0x0100: "ffdhe2048",
    0x0101: "ffdhe3072",
    0x0102: "ffdhe4096",
    0x0103: "ffdhe6144",
    0x0104: "ffdhe8192",
    0x0200: "MLKEM512",
    0x0201: "MLKEM768",
    0x0202: "MLKEM1024",
    0x11EB: "SecP256r1MLKEM768",
    0x11EC: "X25519MLKEM768",
    0x11ED: "SecP384r1MLKEM1024",
    0x11EE: "curveSM2MLKEM768",
    0x6399: "X25519Kyber768Draft00",
}

SIGNATURE_SCHEME_NAMES: Final = {
    0x0201: "rsa_pkcs1_sha1",
    0x0202: "dsa_sha1",
    0x0203: "ecdsa_sha1",
    0x0301: "rsa_pkcs1_sha224",
    0x0302: "dsa_sha224",
    0x0303: "ecdsa_sha224",
    0x0401: "rsa_pkcs1_sha256",
    0x0402: "dsa_sha256",
    0x0403: "ecdsa_secp256r1_sha256",
    0x0501: "rsa_pkcs1_sha384",
    0x0502: "dsa_sha384",
    0x0503: "ecdsa_secp384r1_sha384",
    0x0601: "rsa_pkcs1_sha512",
    0x0602: "dsa_sha512",
    0x0603: "ecdsa_secp521r1_sha512",
    0x0708: "sm2sig_sm3",
    0x0804: "rsa_pss_rsae_sha256",
    0x0805: "rsa_pss_rsae_sha384",
    0x0806: "rsa_pss_rsae_sha512",
    0x0807: "ed25519",
    0x0808: "ed448",
    0x0809: "rsa_pss_pss_sha256",
    0x080A: "rsa_pss_pss_sha384",
    0x080B: "rsa_pss_pss_sha512",
    0x081A: "ecdsa_brainpoolP256r1tls13_sha256",
    0x081B: "ecdsa_brainpoolP384r1tls13_sha384",
    0x081C: "ecdsa_brainpoolP512r1tls13_sha512",
    0x0904: "mldsa44",
    0x0905: "mldsa65",
    0x0906: "mldsa87",
}

EXTENSION_NAMES: Final = {
    0x0000: "server_name",
    0x0001: "max_fragment_length",
    0x0005: "status_request",
    0x000A: "supported_groups",
    0x000B: "ec_point_formats",
    0x000D: "signature_algorithms",
    0x000E: "use_srtp",
    0x000F: "heartbeat",
    0x0010: "application_layer_protocol_negotiation",
    0x0011: "status_request_v2",
    0x0012: "signed_certificate_timestamp",
    0x0013: "client_certificate_type",
    0x0014: "server_certificate_type",
    0x0015: "padding",
    0x0016: "encrypt_then_mac",
    0x0017: "extended_master_secret",
    0x001B: "compress_certificate",
    0x001C: "record_size_limit",
    0x0022: "delegated_credential",
    0x0023: "session_ticket",
    0x0029: "pre_shared_key",
    0x002A: "early_data",
    0x002B: "supported_versions",
    0x002C: "cookie",
    0x002D: "psk_key_exchange_modes",
    0x002F: "certificate_authorities",
    0x0030: "oid_filters",
    0x0031: "post_handshake_auth",
    0x0032: "signature_algorithms_cert",
    0x0033: "key_share",
    0x0039: "quic_transport_parameters",
    0x3374: "next_protocol_negotiation",
    0x4469: "application_settings_old",
    0x44CD: "application_settings",
    0xFD00: "ech_outer_extensions",
    0xFE0D: "encrypted_client_hello",
    0xFF01: "renegotiation_info",
}

COMPRESSION_NAMES: Final = {
    0: "null",
    1: "DEFLATE",
    64: "LZS",
}
