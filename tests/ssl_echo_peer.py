"""A small TLS line-echo server for the client tests (stdlib ``ssl`` and ``selectors`` only).

Run as a script::

    python tests/ssl_echo_peer.py --cert SERVER.pem --key SERVER.key [--client-ca CA.pem]
        [--host 127.0.0.1] [--tls12-only] [--prefix TEXT] [--silent] [--out-limit BYTES]
        [--lifetime SECONDS] [--alpn PROTO]...

It listens on ``--host`` (default 127.0.0.1), port 0, and prints the port as the first
line of standard output.  It then prints one line per connection event:
``alpn <protocol>`` / ``alpn -`` after a handshake when ``--alpn`` (repeatable: the
protocols it selects from, in its order of preference) is given, ``client-cert <CN>`` /
``client-cert -`` after a handshake, ``handshake-failed <reason>``, ``closed``.  It exits
when standard input reaches end of file (its parent closed it) or after ``--lifetime``
seconds (default 60), whichever comes first.

Behaviour, like the secure-echo protocol: every LF-terminated line is echoed byte exact
(``--prefix`` prepends TEXT to each echoed line, to fake a wrong reply; ``--silent``
never answers); when the client sends close_notify or ends the stream, an unterminated
final line is echoed as it is, then the peer sends close_notify and closes.  While more
than ``--out-limit`` bytes of ciphertext wait to be sent, it stops reading the
connection (backpressure), so a client that does not read its replies stalls.

Single-threaded: one selector, TLS over memory BIOs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import socket
import ssl
import sys
import time

RECV_SIZE = 64 * 1024
LINGER_SECONDS = 2.0


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class _Conn:
    """One client connection: socket, TLS object, buffers and its state.

    States: ``open`` (echoing), ``closing`` (close_notify queued: close once everything is
    sent), ``failed`` (a fatal TLS error: send the alert, shut down our side, then read and
    discard until the client closes or ``LINGER_SECONDS`` pass, so the client reads the
    alert instead of a reset).
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, options: _Options) -> None:
        self.sock = sock
        self.options = options
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.net_out = bytearray()
        self.plain = bytearray()
        self.handshaken = False
        self.state = "open"
        self.write_shut = False
        self.linger_until = 0.0
        self.gone = False

    def interest(self, now: float) -> int:
        """Return the selector events wanted now; set ``gone`` when it should be closed."""
        events = selectors.EVENT_WRITE if self.net_out else 0
        if self.state == "open" and len(self.net_out) <= self.options.out_limit:
            events |= selectors.EVENT_READ
        elif self.state == "closing" and not self.net_out:
            self.gone = True
        elif self.state == "failed" and not self.net_out:
            if not self.write_shut:
                self.write_shut = True
                self.linger_until = now + LINGER_SECONDS
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self.gone = True
            events |= selectors.EVENT_READ
            if now >= self.linger_until:
                self.gone = True
        return events

    def collect(self) -> None:
        if self.outgoing.pending:
            self.net_out += self.outgoing.read()

    def send(self) -> None:
        try:
            sent = self.sock.send(self.net_out)
        except BlockingIOError:
            return
        del self.net_out[:sent]

    def receive(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        if self.state != "open":
            if not data:
                self.gone = True
            return
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        try:
            if not self.handshaken:
                self._handshake()
            if self.handshaken:
                self._read_plaintext()
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            _say(f"{'tls-error' if self.handshaken else 'handshake-failed'} {reason}")
            self.state = "failed"
        self.collect()

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return
        self.handshaken = True
        if self.options.alpn:
            _say(f"alpn {self.tls.selected_alpn_protocol() or '-'}")
        cert = self.tls.getpeercert() or {}
        subject = cert.get("subject", ())
        names = [
            str(attribute[1])
            for rdn in (subject if isinstance(subject, tuple) else ())
            for attribute in rdn
            if isinstance(attribute, tuple) and attribute[0] == "commonName"
        ]
        _say(f"client-cert {names[-1] if names else '-'}")

    def _read_plaintext(self) -> None:
        closing = False
        while True:
            try:
                data = self.tls.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                closing = True
                break
            if not data:
                closing = True
                break
            self.plain += data
        self._echo(final=closing)
        if closing:
            with contextlib.suppress(ssl.SSLError):  # close_notify is queued either way
                self.tls.unwrap()
            self.state = "closing"
            _say("closed")

    def _echo(self, *, final: bool) -> None:
        end = len(self.plain) if final else self.plain.rfind(b"\n") + 1
        if end <= 0:
            return
        chunk = bytes(self.plain[:end])
        del self.plain[:end]
        if self.options.silent:
            return
        if self.options.prefix:
            prefix = self.options.prefix
            chunk = b"".join(prefix + line for line in chunk.splitlines(keepends=True))
        self.tls.write(chunk)


class _Options(argparse.Namespace):
    cert: str
    key: str
    client_ca: str | None
    host: str
    tls12_only: bool
    prefix_text: str
    silent: bool
    out_limit: int
    lifetime: float
    alpn: list[str]

    @property
    def prefix(self) -> bytes:
        return self.prefix_text.encode()


def _context(options: _Options) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(options.cert, options.key)
    if options.client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=options.client_ca)
    if options.alpn:
        context.set_alpn_protocols(options.alpn)
    return context


class _Server:
    """The accept-and-echo loop over one selector."""

    def __init__(
        self, listener: socket.socket, context: ssl.SSLContext, options: _Options
    ) -> None:
        self.listener = listener
        self.context = context
        self.options = options
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)
        self.stdin_fd = sys.stdin.fileno()
        self.selector.register(self.stdin_fd, selectors.EVENT_READ)
        self.conns: dict[int, _Conn] = {}
        self.masks: dict[int, int] = {}

    def run(self) -> None:
        """Serve until standard input ends or the lifetime is over."""
        deadline = time.monotonic() + self.options.lifetime
        while (now := time.monotonic()) < deadline:
            self._update(now)
            for key, mask in self.selector.select(min(0.2, deadline - now)):
                if key.fd == self.stdin_fd:
                    if not os.read(self.stdin_fd, 4096):
                        return
                elif key.fileobj is self.listener:
                    self._accept()
                else:
                    self._service(self.conns[key.fd], mask)

    def _update(self, now: float) -> None:
        """Bring every connection's registration up to date; close the finished ones."""
        for fd, conn in list(self.conns.items()):
            events = 0 if conn.gone else conn.interest(now)
            if conn.gone:  # interest() may have just decided so
                events = 0
            if self.masks.get(fd, 0) != events:
                if fd in self.masks:
                    self.selector.unregister(fd)
                    del self.masks[fd]
                if events:
                    self.selector.register(fd, events)
                    self.masks[fd] = events
            if conn.gone:
                conn.sock.close()
                del self.conns[fd]

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self.conns[sock.fileno()] = _Conn(sock, self.context, self.options)

    @staticmethod
    def _service(conn: _Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ:
                conn.receive()
            if mask & selectors.EVENT_WRITE and conn.net_out:
                conn.send()
        except OSError as exc:
            _say(f"socket-error {exc.strerror or exc}")
            conn.gone = True


def main() -> None:
    """Parse the options, listen, print the port, serve until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-ca")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tls12-only", action="store_true")
    parser.add_argument("--prefix", dest="prefix_text", default="")
    parser.add_argument("--silent", action="store_true")
    parser.add_argument("--out-limit", type=int, default=256 * 1024)
    parser.add_argument("--lifetime", type=float, default=60.0)
    parser.add_argument("--alpn", action="append", default=[])
    options = parser.parse_args(namespace=_Options())
    context = _context(options)
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((options.host, 0))
        listener.listen(64)
        listener.setblocking(False)
        _say(str(listener.getsockname()[1]))
        _Server(listener, context, options).run()


if __name__ == "__main__":
    main()
