"""Client-controlled text made safe to write into a log line.

A client chooses its SNI and ALPN names, the names in its certificate and, behind
a PROXY balancer, the address (or UNIX path) the balancer reports.  Written as
they came, a newline would forge a log record, an escape sequence would drive
the terminal that shows the log, and a bidi override would make the text read
otherwise than it is.  :func:`printable` escapes every C0 and C1 control
character, DEL, and the Unicode format characters that reorder or hide text,
as ``\\xNN`` or ``\\uNNNN``; everything else, including non-ASCII letters, is
kept, so names stay readable.
"""

from __future__ import annotations

import re
from typing import Final

#: C0 controls, DEL, C1 controls; bidi embeddings, overrides and isolates, the
#: directional marks, the zero-width characters, line and paragraph separators.
_UNSAFE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"  # noqa: PLR2004


def printable(text: str) -> str:
    """``text`` with every character that could forge or disguise a log line escaped."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)


def printable_bytes(raw: bytes) -> str:
    """Client bytes meant as text: UTF-8 where they are, escaped where not or unsafe."""
    return printable(raw.decode("utf-8", "backslashreplace"))
