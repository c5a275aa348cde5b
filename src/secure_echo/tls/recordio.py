"""Plaintext in, ciphertext out: one TLS connection's memory-BIO I/O, made cheap.

The transport calls three things per socket read: put ciphertext into the
connection, take out every plaintext byte it yields, take out every ciphertext
byte waiting to be sent.  Through pyOpenSSL's public methods each ``recv`` ends in
a ``WantReadError`` exception, each ``bio_read`` allocates its buffer, and each
call passes through Python wrappers; on a line server that is a large share of the
CPU per line.

:class:`FastRecordIO` calls OpenSSL directly through the cffi handles pyOpenSSL
keeps on the connection (``_ssl``, ``_into_ssl``, ``_from_ssl``; private API, so
confined to this module): status codes instead of exceptions, and one shared
buffer (the reactor is single-threaded).  Errors are still raised as pyOpenSSL's
own exceptions, with OpenSSL's reason, by handing the failed call's result to
pyOpenSSL's error conversion.  :class:`PublicRecordIO` does the same through the
public API; :func:`record_io` picks the fast one when the private handles exist.
Both behave identically; the test suite runs the transport over each.
"""

from __future__ import annotations

from typing import Any, Final, NoReturn, Protocol

from OpenSSL import SSL

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - depends on the installed pyOpenSSL
    _ffi = _lib = None

_NEEDED: Final = (
    "SSL_do_handshake",
    "SSL_read",
    "SSL_write",
    "SSL_get_error",
    "SSL_set_bio",
    "SSL_clear_mode",
    "BIO_read",
    "BIO_write",
    "BIO_new",
    "BIO_s_mem",
    "BIO_free",
    "BIO_get_mem_data",
)
#: Whether the private handles are there (checked once, at import).
FAST_AVAILABLE: Final = _lib is not None and all(hasattr(_lib, name) for name in _NEEDED)

#: The shared buffer: larger than any single read the transport asks for.
_BUFFER_SIZE: Final = 1 << 17
_buffer: Any = _ffi.new("char[]", _BUFFER_SIZE) if FAST_AVAILABLE else None
#: Room one SSL_read needs: a whole record's plaintext (TLS caps it at 16 KiB).
_RECORD_ROOM: Final = 1 << 14
#: Bytes asked of one public-API read.
_PUBLIC_READ: Final = 65536
#: Bytes one socket read asks for (Twisted's own ``bufferSize``).
READ_SIZE: Final = 65536
#: Where the stream transport reads into (:mod:`secure_echo.tls.stream`), so that
#: OpenSSL takes the bytes from there: shared, as the reactor runs one read at a time.
_input: Any = _ffi.new("char[]", READ_SIZE) if FAST_AVAILABLE else None


def read_view() -> memoryview | None:
    """The input buffer as a writable view, for ``recv_into`` (None without it)."""
    return None if _input is None else memoryview(_ffi.buffer(_input))


def input_bytes(count: int) -> bytes:
    """The first ``count`` bytes of the input buffer, copied."""
    return bytes(_ffi.buffer(_input, count))


class RecordIO(Protocol):
    """The three operations of the transport's hot path."""

    def feed(self, data: bytes) -> None:
        """Give the connection ciphertext received from the client."""

    def feed_input(self, count: int) -> None:
        """Give the connection the first ``count`` bytes of the shared input buffer."""

    def handshake(self) -> bool:
        """Advance the handshake: True once done, False while it wants more input.

        Raises ``SSL.Error`` (OpenSSL's reason in it) when the handshake failed.
        """
        ...

    def read(self) -> tuple[list[bytes], bool, SSL.Error | None]:
        """Return the plaintext, whether close_notify came, and what broke the stream.

        The error (OpenSSL's reason in it) is None unless the stream broke after
        the plaintext returned with it.
        """
        ...

    def write(self, data: bytes) -> None:
        """Encrypt ``data``; raises ``SSL.Error`` on failure."""

    def pending_out(self) -> bytes | memoryview:
        """Every ciphertext byte waiting to be sent (``b""`` if none).

        A ``memoryview`` is only valid until the next call into the record I/O.
        """
        ...

    def release(self) -> bool:
        """Free the memory BIOs' buffers if both are empty; True if it did."""
        ...


class FastRecordIO:
    """:class:`RecordIO` through OpenSSL directly (see the module docstring)."""

    __slots__ = ("_connection", "_from", "_into", "_ssl")

    def __init__(self, connection: SSL.Connection) -> None:
        self._connection = connection
        self._ssl = connection._ssl
        self._into = connection._into_ssl
        self._from = connection._from_ssl
        # pyOpenSSL turns on partial writes for every connection: one SSL_write
        # then encrypts one 16 KiB record, and a 32 KiB batch of replies takes
        # three calls.  Into a memory BIO, which never refuses bytes, a write is
        # whole or an error: one call.
        _lib.SSL_clear_mode(self._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)

    def feed(self, data: bytes) -> None:
        """Write to the incoming memory BIO (it takes everything)."""
        _lib.BIO_write(self._into, data, len(data))

    def feed_input(self, count: int) -> None:
        """Write the input buffer's first ``count`` bytes to the incoming memory BIO."""
        _lib.BIO_write(self._into, _input, count)

    def handshake(self) -> bool:
        """SSL_do_handshake: a status code, not pyOpenSSL's ``WantReadError``."""
        ssl = self._ssl
        result = _lib.SSL_do_handshake(ssl)
        if result == 1:
            return True
        if _lib.SSL_get_error(ssl, result) != _lib.SSL_ERROR_WANT_READ:
            self._fail(result)
        return False

    def read(self) -> tuple[list[bytes], bool, SSL.Error | None]:
        """SSL_read until OpenSSL wants more input; no exception on the way.

        The records' plaintext is laid end to end in the shared buffer and copied
        out once, so a read of several records is one ``bytes``, not a join.
        """
        ssl = self._ssl
        buffer = _buffer
        chunks: list[bytes] = []
        used = 0
        while True:
            if _BUFFER_SIZE - used < _RECORD_ROOM:
                chunks.append(_ffi.buffer(buffer, used)[:])
                used = 0
            count = _lib.SSL_read(ssl, buffer + used, _BUFFER_SIZE - used)
            if count > 0:
                used += count
                continue
            if used:
                chunks.append(_ffi.buffer(buffer, used)[:])
            error = _lib.SSL_get_error(ssl, count)
            if error == _lib.SSL_ERROR_WANT_READ:
                return chunks, False, None
            if error == _lib.SSL_ERROR_ZERO_RETURN:
                return chunks, True, None
            try:
                self._fail(count)
            except SSL.Error as failure:
                return chunks, False, failure

    def write(self, data: bytes) -> None:
        """SSL_write all of ``data`` in one call (partial writes are off, see above)."""
        if not data:
            return
        sent = _lib.SSL_write(self._ssl, data, len(data))
        if sent != len(data):
            self._fail(sent)

    def pending_out(self) -> bytes | memoryview:
        """BIO_read the outgoing memory BIO until it is empty.

        When it all fits in the shared buffer (the usual case) the answer is a view
        of that buffer, not a copy: valid until the next call into this module, so
        the caller sends it at once (and copies what the socket does not take).
        """
        source = self._from
        buffer = _buffer
        count = _lib.BIO_read(source, buffer, _BUFFER_SIZE)
        if count <= 0:
            return b""
        if count < _BUFFER_SIZE:
            return memoryview(_ffi.buffer(buffer, count))
        out = [_ffi.buffer(buffer, count)[:]]
        while count == _BUFFER_SIZE:
            count = _lib.BIO_read(source, buffer, _BUFFER_SIZE)
            if count <= 0:
                break
            out.append(_ffi.buffer(buffer, count)[:])
        return b"".join(out)

    def release(self) -> bool:
        """Give the connection fresh, empty memory BIOs; OpenSSL frees the old ones.

        A memory BIO never shrinks: it keeps the capacity of the most it ever
        held, and after the handshake that is the server's flight (certificate
        chain, session tickets) and the client's, about 1.5 KiB a connection for
        as long as it stays open.  Only when both are empty (nothing is lost);
        False otherwise, or if OpenSSL has no memory for new ones.
        """
        if _lib.BIO_get_mem_data(self._into, _ffi.NULL) or _lib.BIO_get_mem_data(
            self._from, _ffi.NULL
        ):
            return False
        into = _lib.BIO_new(_lib.BIO_s_mem())
        out = _lib.BIO_new(_lib.BIO_s_mem())
        if _ffi.NULL in (into, out):  # pragma: no cover - out of memory
            for bio in (into, out):
                if bio != _ffi.NULL:
                    _lib.BIO_free(bio)
            return False
        # Both are new: SSL_set_bio frees both old ones.  pyOpenSSL's own methods
        # (bio_write, bio_shutdown) go through the connection's attributes.
        _lib.SSL_set_bio(self._ssl, into, out)
        connection = self._connection
        self._into = connection._into_ssl = into
        self._from = connection._from_ssl = out
        return True

    def _fail(self, result: int) -> NoReturn:
        """Raise pyOpenSSL's exception for a failed call's ``result``."""
        self._connection._raise_ssl_error(self._ssl, result)
        raise SSL.Error([("secure-echo", "", f"TLS call failed ({result})")])  # pragma: no cover


class PublicRecordIO:
    """:class:`RecordIO` through pyOpenSSL's public methods."""

    __slots__ = ("_connection",)

    def __init__(self, connection: SSL.Connection) -> None:
        self._connection = connection

    def feed(self, data: bytes) -> None:
        """Write to the incoming memory BIO."""
        self._connection.bio_write(data)

    def feed_input(self, count: int) -> None:
        """Write the input buffer's first ``count`` bytes to the incoming memory BIO."""
        self._connection.bio_write(input_bytes(count))

    def handshake(self) -> bool:
        """``do_handshake``, its ``WantReadError`` turned into False."""
        try:
            self._connection.do_handshake()
        except SSL.WantReadError:
            return False
        return True

    def read(self) -> tuple[list[bytes], bool, SSL.Error | None]:
        """Recv until ``WantReadError`` (or close_notify, or an error)."""
        chunks: list[bytes] = []
        while True:
            try:
                chunks.append(self._connection.recv(_PUBLIC_READ))
            except SSL.WantReadError:
                return chunks, False, None
            except SSL.ZeroReturnError:
                return chunks, True, None
            except SSL.Error as failure:
                return chunks, False, failure

    def write(self, data: bytes) -> None:
        """Encrypt all of ``data``."""
        self._connection.sendall(data)

    def release(self) -> bool:
        """The public API cannot replace the memory BIOs: nothing is freed."""
        return False

    def pending_out(self) -> bytes:
        """Read the outgoing memory BIO until it is empty."""
        out: list[bytes] = []
        while True:
            try:
                chunk = self._connection.bio_read(_PUBLIC_READ)
            except SSL.WantReadError:
                break
            out.append(chunk)
            if len(chunk) < _PUBLIC_READ:
                break
        return b"".join(out)


#: Which implementation :func:`record_io` builds (tests switch it).
use_fast = FAST_AVAILABLE


def record_io(connection: SSL.Connection) -> FastRecordIO | PublicRecordIO:
    """The record I/O for ``connection``: the fast one where possible."""
    if use_fast:
        return FastRecordIO(connection)
    return PublicRecordIO(connection)
