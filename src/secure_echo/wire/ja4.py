"""JA4, FoxIO's TLS client fingerprint, from a parsed :class:`ClientHello`.

JA4 is computed as FoxIO's specification (``technical_details/JA4.md`` in
FoxIO-LLC/ja4) states it::

    JA4    = a "_" b "_" c                       e.g. t13d1516h2_8daaf6152771_e5627efa2ab1
    a      = "t"                                 ; TLS over TCP (secure-echo has no QUIC/DTLS)
             version                             ; highest non-GREASE supported_versions
                                                 ; value, else legacy_version: 13 12 11 10
                                                 ; s3 s2 d1 d2 d3, anything else 00
             ("d" / "i")                         ; server_name extension present or not
             2DIGIT 2DIGIT                       ; non-GREASE cipher suites and extensions,
                                                 ; capped at 99 (SNI and ALPN count)
             alpn                                ; first and last character of the first
                                                 ; ALPN value; "00" without one
    b      = sha12(sorted non-GREASE cipher suites as 4-digit hex, comma-separated)
    c      = sha12(sorted non-GREASE extensions without SNI (0000) and ALPN (0010)
                   [ "_" signature_algorithms in their order, GREASE removed ])
    sha12  = first 12 hex digits of SHA-256, or "000000000000" for an empty list

The ALPN rule for odd bytes follows the specification's text: if the first or last
byte of the first ALPN value is not an ASCII letter or digit, the two characters are
the first and last hex digit of the whole value (``0xab 0xcd`` gives ``ad``).  Some
implementations, FoxIO's own Python and Rust ones among them, still print ``99`` for
non-ASCII bytes (FoxIO-LLC/ja4 issue 326); real clients' ALPN values are letters and
digits at both ends, where every implementation agrees.

The raw forms show the lists instead of their hashes: ``ja4_r`` sorted as above,
``ja4_ro`` in the client's order with SNI and ALPN kept; ``ja4_o`` hashes the
original order.  As in FoxIO's published values, the ``c`` hash of ``ja4_o`` is
``000000000000`` whenever the sorted list (without SNI and ALPN) is empty.

Pure and cheap: four SHA-256 of strings of a few hundred bytes, once per connection.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from secure_echo.wire.clienthello import EXT_ALPN, EXT_SERVER_NAME, GREASE

if TYPE_CHECKING:
    from secure_echo.wire.clienthello import ClientHello

#: Extensions JA4's first part shows, left out of its extension hash.
_IN_PART_A: Final = frozenset({EXT_SERVER_NAME, EXT_ALPN})
#: The hash of an empty list.
EMPTY_HASH: Final = "000000000000"
#: The counts in JA4's first part have two digits.
MAX_COUNT: Final = 99

#: Version value -> the two characters JA4 prints for it (unknown: "00").
VERSION_CODES: Final = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}


@dataclass(frozen=True, slots=True)
class JA4:
    """The four JA4 forms of one ClientHello."""

    ja4: str
    ja4_r: str
    ja4_o: str
    ja4_ro: str

    def as_record(self) -> dict[str, str]:
        """The JSON-ready form: ``{"ja4": ..., "ja4_r": ..., "ja4_o": ..., "ja4_ro": ...}``."""
        return {"ja4": self.ja4, "ja4_r": self.ja4_r, "ja4_o": self.ja4_o, "ja4_ro": self.ja4_ro}


def version_code(hello: ClientHello) -> str:
    """JA4's version: the highest non-GREASE supported version, else the legacy one."""
    offered = [v for v in hello.supported_versions if v not in GREASE]
    version = max(offered) if offered else hello.legacy_version
    return VERSION_CODES.get(version, "00")


def _alphanumeric(byte: int) -> bool:
    return 0x30 <= byte <= 0x39 or 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A  # noqa: PLR2004 - 0-9 A-Z a-z


def alpn_code(hello: ClientHello) -> str:
    """JA4's two ALPN characters: first and last of the first value (see module)."""
    if not hello.alpn or not hello.alpn[0]:
        return "00"
    value = hello.alpn[0]
    first, last = value[0], value[-1]
    if _alphanumeric(first) and _alphanumeric(last):
        return chr(first) + chr(last)
    return f"{first >> 4:x}{last & 0x0F:x}"


def _count(values: list[int]) -> str:
    return f"{min(len(values), MAX_COUNT):02d}"


def _hex_list(values: list[int]) -> str:
    """``0a0a,1301``: four lowercase hex digits per value, comma-separated."""
    return struct.pack(f">{len(values)}H", *values).hex(",", 2)


def _sha12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fingerprints(hello: ClientHello) -> JA4:
    """All four JA4 forms of ``hello``."""
    ciphers = [c for c in hello.cipher_suites if c not in GREASE]
    extensions = [e for e in hello.extensions if e not in GREASE]
    algorithms = [a for a in hello.signature_algorithms if a not in GREASE]
    sni = "d" if EXT_SERVER_NAME in extensions else "i"
    part_a = f"t{version_code(hello)}{sni}{_count(ciphers)}{_count(extensions)}{alpn_code(hello)}"
    sorted_ciphers = _hex_list(sorted(ciphers))
    original_ciphers = _hex_list(ciphers)
    sorted_extensions = _hex_list(sorted(e for e in extensions if e not in _IN_PART_A))
    original_extensions = _hex_list(extensions)
    tail = f"_{_hex_list(algorithms)}" if algorithms else ""
    cipher_hash = _sha12(sorted_ciphers) if ciphers else EMPTY_HASH
    original_cipher_hash = _sha12(original_ciphers) if ciphers else EMPTY_HASH
    if sorted_extensions:
        extension_hash = _sha12(sorted_extensions + tail)
        original_extension_hash = _sha12(original_extensions + tail)
    else:
        extension_hash = original_extension_hash = EMPTY_HASH
    return JA4(
        ja4=f"{part_a}_{cipher_hash}_{extension_hash}",
        ja4_r=f"{part_a}_{sorted_ciphers}_{sorted_extensions}{tail}",
        ja4_o=f"{part_a}_{original_cipher_hash}_{original_extension_hash}",
        ja4_ro=f"{part_a}_{original_ciphers}_{original_extensions}{tail}",
    )


def ja4(hello: ClientHello) -> str:
    """The JA4 fingerprint of ``hello`` (``t13d1516h2_8daaf6152771_e5627efa2ab1``)."""
    return fingerprints(hello).ja4
