"""The lean Twisted TLS line echo: the design secure-echo is built on, minus its protections.

How fast can Twisted + pyOpenSSL echo lines on one core when nothing else is asked of
the server?  This peer answers that, so every benchmark run shows what the daemon's
protections (limits, timeouts, flow control, logging, the close guarantees) cost on
top of the same design.

The design, as measured for secure-echo itself:

* TLS is done inside the transport: :class:`LeanServer` is a ``tcp.Server`` subclass
  that runs a pyOpenSSL ``Connection`` over memory BIOs and replaces ``doRead``.
  No ``TLSMemoryBIOProtocol``, no protocol layer between the socket and the echo.
* OpenSSL is called through pyOpenSSL's private cffi handles (``OpenSSL.SSL._lib`` /
  ``_ffi``, the connection's ``_ssl``, ``_into_ssl``, ``_from_ssl``): status codes
  instead of ``WantReadError`` exceptions, no Python wrapper per call.
* One ``recv_into`` per readable event, into a buffer reused by every connection (the
  reactor is single-threaded), handed to ``BIO_write`` without a copy; plaintext and
  ciphertext go through two more shared buffers.
* Echo: everything up to the last newline of a read is encrypted in one ``SSL_write``;
  an unterminated remainder waits for the next read (and is echoed at end of input).
* Optimistic send: when Twisted's write buffer is empty the records are ``send()``-ed
  at once; only what the kernel does not take goes to ``FileDescriptor.write`` (which
  keeps the order and registers for writability).  Twisted's own write path costs two
  ``epoll_ctl`` per reply.

No protections: no connection limits, no handshake or idle timeout, no flow control
(a client that does not read makes the server buffer without bound), no logging, no
line-length bound.  The TLS settings are the daemon's that matter for speed: TLS 1.3
only, the same certificate, ``MODE_RELEASE_BUFFERS`` (free the record buffers of an
idle connection), OpenSSL's default stateless session tickets (resumable),
TCP_NODELAY.  Self-contained on purpose: it imports nothing of secure-echo.

Usage: ``python lean_twisted.py CERT KEY [--lifetime SECONDS]``.  Prints the bound port
on a line of its own, then serves on 127.0.0.1 until SIGTERM or the lifetime (default
1800 s) is over.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from typing import Any

from OpenSSL import SSL
from twisted.internet import main as _main
from twisted.internet import reactor, tcp
from twisted.internet.protocol import Factory, Protocol

try:
    _ffi: Any = SSL._ffi  # type: ignore[attr-defined]
    _lib: Any = SSL._lib  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - depends on the installed pyOpenSSL
    sys.exit("lean_twisted: this pyOpenSSL has no OpenSSL.SSL._lib/_ffi; the peer needs them")

#: Bytes one socket read asks for (Twisted's own ``bufferSize``).
READ_SIZE = 1 << 16
#: Room for plaintext and for outgoing ciphertext; larger than one read's worth.
BUFFER_SIZE = 1 << 17
#: Room one ``SSL_read`` needs: a whole record's plaintext (TLS caps it at 16 KiB).
RECORD_ROOM = 1 << 14

# The shared buffers.  Every connection uses them in turn: the reactor runs one
# ``doRead`` at a time, and nothing keeps a view of them past the call that filled it.
_incoming = _ffi.new("char[]", READ_SIZE)
_incoming_view = _ffi.buffer(_incoming)
_plain = _ffi.new("char[]", BUFFER_SIZE)
_outgoing = _ffi.new("char[]", BUFFER_SIZE)

_WANT_READ = _lib.SSL_ERROR_WANT_READ
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class LeanServer(tcp.Server):
    """A TCP connection that is also the TLS layer and the echo."""

    server: LeanPort

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = SSL.Connection(self.server.context, None)
        tls.set_accept_state()
        # Kept so the connection (and the SSL* it owns) lives as long as we do.
        self.tls = tls
        self.ssl = tls._ssl
        self.into_ssl = tls._into_ssl
        self.from_ssl = tls._from_ssl
        #: Plaintext after the last newline seen, waiting for the rest of its line.
        self.pending = b""

    def doRead(self) -> Any:
        """Read once, decrypt, echo the complete lines in one write, send at once."""
        try:
            count = self.socket.recv_into(_incoming_view, READ_SIZE)
        except OSError as error:
            return None if error.errno in _AGAIN else _main.CONNECTION_LOST
        if not count:
            # FIN without close_notify: answer what is left, then close.
            self._end_of_input()
            return None
        _lib.BIO_write(self.into_ssl, _incoming, count)
        data, status = self._decrypt()
        if data:
            if self.pending:
                data = self.pending + data
            end = data.rfind(b"\n") + 1
            if end:
                self.pending = data[end:] if end < len(data) else b""
                self._encrypt(data, end)
            else:
                self.pending = data
        if status == _WANT_READ:
            self._flush()
            return None
        if status == _ZERO_RETURN:
            self._end_of_input()
            return None
        # A broken stream or a failed handshake.  The error queue is per thread,
        # shared by every connection: leave nothing in it for the next one.
        _lib.ERR_clear_error()
        self._flush()  # the alert, if OpenSSL wrote one
        self.loseConnection()  # type: ignore[no-untyped-call]
        return None

    def _decrypt(self) -> tuple[bytes, int]:
        """``SSL_read`` until OpenSSL stops; the plaintext and ``SSL_get_error``'s status.

        The records' plaintext is laid end to end in the shared buffer and copied out
        once.  During the handshake this is what advances it (the server's flight and,
        once it completes, the session tickets land in the outgoing BIO).
        """
        ssl = self.ssl
        used = 0
        chunks: list[bytes] = []
        while True:
            if BUFFER_SIZE - used < RECORD_ROOM:
                chunks.append(_ffi.buffer(_plain, used)[:])
                used = 0
            got = _lib.SSL_read(ssl, _plain + used, BUFFER_SIZE - used)
            if got > 0:
                used += got
                continue
            status: int = _lib.SSL_get_error(ssl, got)
            if used:
                chunks.append(_ffi.buffer(_plain, used)[:])
            if not chunks:
                return b"", status
            return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), status

    def _encrypt(self, data: bytes, length: int) -> None:
        """``SSL_write`` the first ``length`` bytes of ``data`` (a memory BIO takes all)."""
        ssl = self.ssl
        written = _lib.SSL_write(ssl, data, length)
        if written == length:
            return
        view = memoryview(data)[:length]
        while written > 0:
            view = view[written:]
            if not view:
                return
            with _ffi.from_buffer(view) as rest:
                written = _lib.SSL_write(ssl, rest, len(view))
        _lib.ERR_clear_error()
        self.loseConnection()  # type: ignore[no-untyped-call]

    def _flush(self) -> None:
        """Move every waiting ciphertext byte to the socket, sending at once if we may."""
        source = self.from_ssl
        while True:
            count = _lib.BIO_read(source, _outgoing, BUFFER_SIZE)
            if count <= 0:
                return
            records = _ffi.buffer(_outgoing, count)
            if (
                not self._tempDataLen
                and self.offset == len(self.dataBuffer)
                and not self.disconnecting
            ):
                try:
                    sent = self.socket.send(records)
                except OSError:
                    sent = 0  # EAGAIN, or an error Twisted finds when it writes
                if sent < count:
                    self.write(records[sent:])  # type: ignore[no-untyped-call]
            else:
                self.write(records[:])  # type: ignore[no-untyped-call]
            if count < BUFFER_SIZE:
                return

    def _end_of_input(self) -> None:
        """The client is done: echo the unterminated rest, send close_notify, close."""
        if self.disconnecting:
            return
        if self.pending:
            pending, self.pending = self.pending, b""
            self._encrypt(pending, len(pending))
        _lib.SSL_shutdown(self.ssl)
        _lib.ERR_clear_error()
        self._flush()
        self.loseConnection()  # type: ignore[no-untyped-call]


class LeanPort(tcp.Port):
    """A TCP port whose connections are :class:`LeanServer`\\ s sharing one context."""

    transport = LeanServer

    def __init__(self, context: SSL.Context, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.context = context


def make_context(cert: str, key: str) -> SSL.Context:
    """TLS 1.3 only, the certificate chain and key, record buffers freed when idle."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.use_certificate_chain_file(cert)
    context.use_privatekey_file(key)
    context.check_privatekey()
    context.set_session_id(b"lean-twisted")
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return context


def main(argv: list[str]) -> int:
    """Listen, print the port, serve until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cert")
    parser.add_argument("key")
    parser.add_argument("--lifetime", type=float, default=1800.0)
    args = parser.parse_args(argv)
    port = LeanPort(
        make_context(args.cert, args.key),
        0,
        Factory.forProtocol(Protocol),
        backlog=1024,
        interface="127.0.0.1",
        reactor=reactor,
    )
    port.startListening()
    print(port.getHost().port, flush=True)  # type: ignore[no-untyped-call]
    reactor.callLater(args.lifetime, reactor.stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
