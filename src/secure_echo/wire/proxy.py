"""The PROXY protocol (v1 and v2) in front of TLS: a pure parser and a Twisted reader.

A load balancer that passes TCP through (haproxy ``send-proxy-v2``, AWS NLB, ...)
tells us who its client really is in a header it sends before anything else.  The
order on the wire is therefore PROXY header, then TLS, then our line protocol.
Twisted's own ``haproxy:`` wrapper is not used: it drops a header split across
reads, has no deadline and no trusted-source list, and puts the header inside TLS
when combined with ``ssl:`` (twisted#9041, twisted#12501).

Wire format (haproxy's ``proxy-protocol.txt``, version 2 of the text)::

    v1 = "PROXY" SP ( "TCP4" SP ip4 SP ip4 SP port SP port
                    / "TCP6" SP ip6 SP ip6 SP port SP port
                    / "UNKNOWN" *( any byte but CR/LF ) ) CRLF   ; at most 107 bytes
    v2 = signature           ; 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
         ver_cmd             ; 0x2_ : version 2; command 0 LOCAL, 1 PROXY
         fam                 ; 0x00 UNSPEC, 0x11 TCP4, 0x21 TCP6, 0x31 UNIX (stream);
                             ; 0x12 / 0x22 / 0x32 are UDP and UNIX datagram
         len                 ; 2 bytes, big-endian: bytes that follow (0..65535)
         addresses           ; 12 (TCP4), 36 (TCP6), 216 (UNIX) or 0 (UNSPEC) bytes
         *tlv                ; type (1), length (2, big-endian), value

The parser (:func:`parse_header`, :func:`looks_like_proxy`, the builders) knows
nothing of Twisted: bytes in, a :class:`ProxyHeader` or a
:class:`ProxyProtocolError` out, ``None`` while more bytes are needed.  It never
holds more than a header's worth: 107 bytes for v1, 16 + the declared length
(at most 65551) for v2.

The reader that uses this parser in front of TLS is
:mod:`secure_echo.edge.proxyreader`; the client builds headers with the builders
below.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable


# -- the parser ----------------------------------------------------------------------

#: The 12 bytes every v2 header starts with.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: What every v1 header starts with.
V1_PREFIX: Final = b"PROXY "
#: Longest v1 header, CRLF included.
V1_MAX_LENGTH: Final = 107
#: Fixed part of a v2 header: signature, ver_cmd, fam, len.
V2_FIXED_LENGTH: Final = 16
#: Longest v2 header: the fixed part plus the largest declared length.
V2_MAX_LENGTH: Final = V2_FIXED_LENGTH + 0xFFFF

#: Reason tokens (the ``reason`` field of ``proxy_rejected``).
PROXY_MALFORMED: Final = "proxy_malformed"
PROXY_MISSING: Final = "proxy_missing"
PROXY_TIMEOUT: Final = "proxy_timeout"
PROXY_UNTRUSTED: Final = "proxy_untrusted"

#: Commands.
PROXY: Final = "PROXY"
LOCAL: Final = "LOCAL"

#: v2 TLV types.
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30
#: Sub-TLV types inside ``PP2_TYPE_SSL``.
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_SUBTYPE_SSL_GROUP: Final = 0x26
PP2_SUBTYPE_SSL_SIG_SCHEME: Final = 0x27
PP2_SUBTYPE_SSL_CLIENT_CERT: Final = 0x28
#: Bits of the SSL TLV's ``client`` byte.
PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

TLV_NAMES: Final = {
    PP2_TYPE_ALPN: "ALPN",
    PP2_TYPE_AUTHORITY: "AUTHORITY",
    PP2_TYPE_CRC32C: "CRC32C",
    PP2_TYPE_NOOP: "NOOP",
    PP2_TYPE_UNIQUE_ID: "UNIQUE_ID",
    PP2_TYPE_SSL: "SSL",
    PP2_TYPE_NETNS: "NETNS",
}
SSL_SUBTYPE_NAMES: Final = {
    PP2_SUBTYPE_SSL_VERSION: "SSL_VERSION",
    PP2_SUBTYPE_SSL_CN: "SSL_CN",
    PP2_SUBTYPE_SSL_CIPHER: "SSL_CIPHER",
    PP2_SUBTYPE_SSL_SIG_ALG: "SSL_SIG_ALG",
    PP2_SUBTYPE_SSL_KEY_ALG: "SSL_KEY_ALG",
    PP2_SUBTYPE_SSL_GROUP: "SSL_GROUP",
    PP2_SUBTYPE_SSL_SIG_SCHEME: "SSL_SIG_SCHEME",
    PP2_SUBTYPE_SSL_CLIENT_CERT: "SSL_CLIENT_CERT",
}

#: The spec caps a UNIQUE_ID at 128 bytes.
_UNIQUE_ID_MAX: Final = 128
#: v2 ``fam`` byte -> (family name, address block length).  Every other value is
#: invalid; the datagram ones are recognised only to name them in the error.
_V2_FAMILIES: Final = {
    0x00: ("UNSPEC", 0),
    0x11: ("TCP4", 12),
    0x21: ("TCP6", 36),
    0x31: ("UNIX", 216),
    0x12: ("UDP4", 12),
    0x22: ("UDP6", 36),
    0x32: ("UNIX_DGRAM", 216),
}
_UNIX_PATH_LENGTH: Final = 108
_MAX_PORT: Final = 0xFFFF
_PORT_DIGITS: Final = 5
_V1_TCP_FIELDS: Final = 6
_TLS_HANDSHAKE: Final = 0x16


class ProxyProtocolError(ValueError):
    """A connection's first bytes are not an acceptable PROXY header.

    ``reason`` is a token (``proxy_malformed``, ``proxy_missing``), ``text`` says
    what exactly was wrong.
    """

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(reason, text)
        self.reason = reason
        self.text = text

    def __str__(self) -> str:
        return f"{self.reason}: {self.text}"


@dataclass(frozen=True)
class TLV:
    """One v2 TLV: its type, raw value and name (``ALPN``, ``SSL_CN``, ``0x42``...).

    ``ssl`` is set on an SSL TLV only.
    """

    type: int
    value: bytes
    name: str
    ssl: SSLInfo | None = None


@dataclass(frozen=True)
class SSLInfo:
    """The SSL TLV: how the client spoke TLS to the balancer.

    ``client`` holds the ``PP2_CLIENT_*`` bits; ``verify`` is 0 when the client
    presented a certificate that the balancer verified.
    """

    client: int
    verify: int
    tlvs: tuple[TLV, ...]

    def value(self, subtype: int) -> bytes | None:
        """The value of the first sub-TLV of ``subtype``, if present."""
        return next((t.value for t in self.tlvs if t.type == subtype), None)


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY header.

    ``family`` is ``TCP4``, ``TCP6``, ``UNIX``, ``UNSPEC`` (v2) or ``UNKNOWN`` (v1).
    ``source``/``destination`` are ``(host, port)`` for a PROXY command over
    TCP4/TCP6 and ``None`` otherwise (LOCAL, UNKNOWN, UNSPEC, UNIX); for UNIX the
    paths are in ``source_path``/``destination_path``.  ``consumed`` is the
    header's length: the connection's data starts after it.
    """

    version: int
    command: str
    family: str
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    consumed: int
    tlvs: tuple[TLV, ...] = ()
    source_path: bytes | None = None
    destination_path: bytes | None = None

    def tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of ``tlv_type``, if present."""
        return next((t.value for t in self.tlvs if t.type == tlv_type), None)

    @property
    def ssl(self) -> SSLInfo | None:
        """The SSL TLV, if the balancer sent one."""
        return next((t.ssl for t in self.tlvs if t.ssl is not None), None)


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for index in range(256):
        crc = index
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _make_crc32c_table()


def crc32c(data: bytes | bytearray) -> int:
    """CRC-32C (Castagnoli), as the CRC32C TLV carries it.

    Pure Python, about 1 µs a byte: a v2 header is at most 64 KiB and only trusted
    balancers get this far.
    """
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def looks_like_proxy(prefix: bytes | bytearray) -> bool | None:
    """Whether ``prefix`` starts a PROXY header; ``None`` if too short to tell.

    True once it holds ``PROXY`` + space or the whole v2 signature, False as soon
    as it differs from both.  The answer is never ``None`` for 12 bytes or more.
    """
    for signature in (V1_PREFIX, V2_SIGNATURE):
        size = min(len(prefix), len(signature))
        if prefix[:size] == signature[:size]:
            return True if size == len(signature) else None
    return False


def _describe_start(data: bytes | bytearray) -> str:
    if data[0] == _TLS_HANDSHAKE:
        return "a TLS handshake record (0x16): the client did not come through the balancer"
    return f"they start with {bytes(data[:8])!r}"


def parse_header(buffer: bytes | bytearray) -> ProxyHeader | None:
    """Parse the PROXY header at the start of ``buffer``.

    Returns ``None`` while ``buffer`` is a valid but incomplete start of a header,
    the header otherwise (``consumed`` says where the connection's data starts).
    Raises :class:`ProxyProtocolError`: ``proxy_missing`` if ``buffer`` does not
    start like a header, ``proxy_malformed`` if the header is invalid.  Cost is
    O(1) per call while a v2 header is incomplete, so calling it on every read is
    linear overall.
    """
    looks = looks_like_proxy(buffer)
    if looks is None:
        return None
    if not looks:
        raise ProxyProtocolError(
            PROXY_MISSING, f"the first bytes are not a PROXY header: {_describe_start(buffer)}"
        )
    if buffer[:1] == b"P":
        return _parse_v1(buffer)
    return _parse_v2(buffer)


def _malformed(text: str) -> ProxyProtocolError:
    return ProxyProtocolError(PROXY_MALFORMED, text)


def _parse_v1(buffer: bytes | bytearray) -> ProxyHeader | None:
    end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if buffer.find(b"\n", 0, V1_MAX_LENGTH) >= 0:
            msg = "v1 header line ends in LF without CR"
            raise _malformed(msg)
        if len(buffer) >= V1_MAX_LENGTH:
            msg = f"v1 header has no CRLF within {V1_MAX_LENGTH} bytes"
            raise _malformed(msg)
        return None
    try:
        line = bytes(buffer[:end]).decode("ascii")
    except UnicodeDecodeError:
        msg = "v1 header is not ASCII"
        raise _malformed(msg) from None
    consumed = end + 2
    fields = line.split(" ")
    family = fields[1]
    if family == "UNKNOWN":
        return ProxyHeader(1, PROXY, "UNKNOWN", None, None, consumed)
    if family not in {"TCP4", "TCP6"}:
        msg = f"v1 protocol {family[:16]!r} is not TCP4, TCP6 or UNKNOWN"
        raise _malformed(msg)
    if len(fields) != _V1_TCP_FIELDS:
        msg = f"v1 {family} header needs 6 space-separated fields, got {len(fields)}"
        raise _malformed(msg)
    source = _v1_host(fields[2], family), _v1_port(fields[4])
    destination = _v1_host(fields[3], family), _v1_port(fields[5])
    return ProxyHeader(1, PROXY, family, source, destination, consumed)


def _v1_host(text: str, family: str) -> str:
    try:
        if family == "TCP4":
            return str(ipaddress.IPv4Address(text))
        if "%" in text:  # a scope zone means nothing on another host
            raise ValueError(text)  # noqa: TRY301 - one error path for all bad addresses
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        msg = f"v1 {family} address {text[:45]!r} is not valid"
        raise _malformed(msg) from None


def _v1_port(text: str) -> int:
    valid = (
        text.isascii()
        and text.isdigit()
        and len(text) <= _PORT_DIGITS
        and (text == "0" or not text.startswith("0"))
    )
    if not valid or int(text) > _MAX_PORT:
        msg = f"v1 port {text[:8]!r} is not a decimal number 0..65535"
        raise _malformed(msg)
    return int(text)


def _parse_v2(buffer: bytes | bytearray) -> ProxyHeader | None:
    if len(buffer) < V2_FIXED_LENGTH:
        return None
    ver_cmd, fam = buffer[12], buffer[13]
    if ver_cmd >> 4 != 2:  # noqa: PLR2004 - the version nibble
        msg = f"v2 header has version {ver_cmd >> 4}, not 2"
        raise _malformed(msg)
    commands = {0: LOCAL, 1: PROXY}
    command = commands.get(ver_cmd & 0x0F)
    if command is None:
        msg = f"v2 command {ver_cmd & 0x0F} is neither LOCAL (0) nor PROXY (1)"
        raise _malformed(msg)
    known = _V2_FAMILIES.get(fam)
    if known is None:
        msg = f"v2 address family/transport byte 0x{fam:02x} is not defined"
        raise _malformed(msg)
    family, address_length = known
    length = int.from_bytes(buffer[14:16], "big")
    total = V2_FIXED_LENGTH + length
    if len(buffer) < total:
        return None
    if length < address_length:
        msg = f"v2 length {length} is shorter than the {family} addresses ({address_length})"
        raise _malformed(msg)
    header = bytes(buffer[:total])
    tlv_start = V2_FIXED_LENGTH + address_length
    tlvs, crc_offsets = _parse_tlvs(header, tlv_start)
    _check_crc(header, crc_offsets)
    if command == LOCAL or family == "UNSPEC":
        # LOCAL: the balancer's own connection (a health check); the address
        # block is skipped.  UNSPEC: the balancer does not know the addresses.
        return ProxyHeader(2, command, family, None, None, total, tlvs)
    if family in {"UDP4", "UDP6", "UNIX_DGRAM"}:
        msg = f"v2 header describes a {family} datagram flow; this is a stream listener"
        raise _malformed(msg)
    block = header[V2_FIXED_LENGTH:tlv_start]
    if family == "UNIX":
        source_path = _unix_path(block[:_UNIX_PATH_LENGTH])
        destination_path = _unix_path(block[_UNIX_PATH_LENGTH:])
        return ProxyHeader(
            2, command, family, None, None, total, tlvs, source_path, destination_path
        )
    size = 4 if family == "TCP4" else 16
    ip_class = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    source = (
        str(ip_class(block[:size])),
        int.from_bytes(block[2 * size : 2 * size + 2], "big"),
    )
    destination = (
        str(ip_class(block[size : 2 * size])),
        int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big"),
    )
    return ProxyHeader(2, command, family, source, destination, total, tlvs)


def _unix_path(raw: bytes) -> bytes:
    """A NUL-padded ``sun_path``; an abstract name keeps its leading NUL."""
    if raw[:1] == b"\x00":
        return b"\x00" + raw[1:].rstrip(b"\x00")
    return raw.split(b"\x00", 1)[0]


def _tlv_name(tlv_type: int, names: dict[int, str]) -> str:
    name = names.get(tlv_type)
    if name is not None:
        return name
    if 0xE0 <= tlv_type <= 0xEF:  # noqa: PLR2004 - the spec's custom range
        return f"CUSTOM_0x{tlv_type:02X}"
    if 0xF0 <= tlv_type <= 0xF7:  # noqa: PLR2004 - the spec's experimental range
        return f"EXPERIMENT_0x{tlv_type:02X}"
    return f"0x{tlv_type:02X}"


def _split_tlvs(
    data: bytes, start: int, end: int, names: dict[int, str]
) -> list[tuple[int, int, str]]:
    """(type, offset of the value, name) for each TLV in ``data[start:end]``."""
    found: list[tuple[int, int, str]] = []
    position = start
    while position < end:
        if end - position < 3:  # noqa: PLR2004 - type and length
            msg = f"v2 TLV at offset {position} is cut short ({end - position} bytes left)"
            raise _malformed(msg)
        tlv_type = data[position]
        size = int.from_bytes(data[position + 1 : position + 3], "big")
        name = _tlv_name(tlv_type, names)
        position += 3
        if position + size > end:
            msg = (
                f"v2 TLV {name} declares {size} bytes but only {end - position} remain "
                "in the header"
            )
            raise _malformed(msg)
        found.append((tlv_type, position, name))
        position += size
    return found


def _parse_tlvs(header: bytes, start: int) -> tuple[tuple[TLV, ...], list[int]]:
    """The TLVs of a complete v2 header, and the offsets of CRC32C values in it."""
    tlvs: list[TLV] = []
    crc_offsets: list[int] = []
    end = len(header)
    for tlv_type, offset, name in _split_tlvs(header, start, end, TLV_NAMES):
        size = int.from_bytes(header[offset - 2 : offset], "big")
        value = header[offset : offset + size]
        ssl = None
        if tlv_type == PP2_TYPE_CRC32C:
            if size != 4:  # noqa: PLR2004 - a CRC-32 is four bytes
                msg = f"v2 CRC32C TLV has {size} bytes, not 4"
                raise _malformed(msg)
            crc_offsets.append(offset)
        elif tlv_type == PP2_TYPE_UNIQUE_ID and size > _UNIQUE_ID_MAX:
            msg = f"v2 UNIQUE_ID TLV has {size} bytes, more than {_UNIQUE_ID_MAX}"
            raise _malformed(msg)
        elif tlv_type == PP2_TYPE_SSL:
            ssl = _parse_ssl(value)
        tlvs.append(TLV(tlv_type, value, name, ssl))
    if len(crc_offsets) > 1:
        msg = "v2 header has more than one CRC32C TLV"
        raise _malformed(msg)
    return tuple(tlvs), crc_offsets


def _parse_ssl(value: bytes) -> SSLInfo:
    if len(value) < 5:  # noqa: PLR2004 - client (1) and verify (4)
        msg = f"v2 SSL TLV has {len(value)} bytes, fewer than the 5 of client and verify"
        raise _malformed(msg)
    subs = []
    for tlv_type, offset, name in _split_tlvs(value, 5, len(value), SSL_SUBTYPE_NAMES):
        size = int.from_bytes(value[offset - 2 : offset], "big")
        subs.append(TLV(tlv_type, value[offset : offset + size], name))
    return SSLInfo(value[0], int.from_bytes(value[1:5], "big"), tuple(subs))


def _check_crc(header: bytes, crc_offsets: list[int]) -> None:
    for offset in crc_offsets:
        expected = int.from_bytes(header[offset : offset + 4], "big")
        zeroed = header[:offset] + b"\x00\x00\x00\x00" + header[offset + 4 :]
        actual = crc32c(zeroed)
        if actual != expected:
            msg = f"v2 CRC32C mismatch: header says 0x{expected:08x}, computed 0x{actual:08x}"
            raise _malformed(msg)


# -- building headers (the client's --proxy-v2, tests) -----------------------------


def encode_tlvs(tlvs: Iterable[tuple[int, bytes]]) -> bytes:
    """Encode ``(type, value)`` pairs as v2 TLVs (also usable for SSL sub-TLVs)."""
    out = bytearray()
    for tlv_type, value in tlvs:
        if not 0 <= tlv_type <= 0xFF or len(value) > 0xFFFF:  # noqa: PLR2004 - u8 type
            msg = f"TLV type {tlv_type} or its {len(value)}-byte value does not fit"
            raise ValueError(msg)
        out += bytes([tlv_type]) + len(value).to_bytes(2, "big") + value
    return bytes(out)


def ssl_tlv(client: int, verify: int, subtlvs: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """The value of an SSL TLV: ``client`` bits, ``verify`` result and sub-TLVs."""
    return bytes([client]) + verify.to_bytes(4, "big") + encode_tlvs(subtlvs)


Endpoint = tuple[str, int] | bytes


def build_v2_header(
    source: Endpoint | None = None,
    destination: Endpoint | None = None,
    *,
    command: Literal["PROXY", "LOCAL"] = "PROXY",
    tlvs: Iterable[tuple[int, bytes]] = (),
    crc: bool = False,
) -> bytes:
    """A v2 header for ``source`` -> ``destination``.

    Endpoints are ``(ip, port)`` (both of one IP version) or ``bytes`` UNIX paths;
    ``None`` for both gives the UNSPEC family.  ``crc`` appends a CRC32C TLV over
    the whole header.  Raises ``ValueError`` for endpoints that do not fit.
    """
    block, fam = _v2_addresses(source, destination)
    body = block + encode_tlvs(tlvs)
    if crc:
        body += encode_tlvs([(PP2_TYPE_CRC32C, b"\x00\x00\x00\x00")])
    if len(body) > 0xFFFF:  # noqa: PLR2004 - the length field is 16 bits
        msg = f"v2 header body of {len(body)} bytes exceeds 65535"
        raise ValueError(msg)
    ver_cmd = 0x21 if command == PROXY else 0x20
    header = V2_SIGNATURE + bytes([ver_cmd, fam]) + len(body).to_bytes(2, "big") + body
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


def _v2_addresses(source: Endpoint | None, destination: Endpoint | None) -> tuple[bytes, int]:
    if source is None and destination is None:
        return b"", 0x00
    if isinstance(source, bytes) and isinstance(destination, bytes):
        if max(len(source), len(destination)) > _UNIX_PATH_LENGTH:
            msg = f"UNIX paths are at most {_UNIX_PATH_LENGTH} bytes"
            raise ValueError(msg)
        pad = _UNIX_PATH_LENGTH
        return source.ljust(pad, b"\x00") + destination.ljust(pad, b"\x00"), 0x31
    if isinstance(source, tuple) and isinstance(destination, tuple):
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        if src.version != dst.version:
            msg = f"source {src} and destination {dst} are of different IP versions"
            raise ValueError(msg)
        ports = source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
        return src.packed + dst.packed + ports, 0x11 if src.version == 4 else 0x21  # noqa: PLR2004
    msg = "source and destination must both be (ip, port), both UNIX paths, or both None"
    raise ValueError(msg)


def build_v1_header(
    source: tuple[str, int] | None = None, destination: tuple[str, int] | None = None
) -> bytes:
    """A v1 header; ``None`` for both gives ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = "TCP4" if src.version == 4 else "TCP6"  # noqa: PLR2004 - IP version
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")
