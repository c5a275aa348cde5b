"""``secure-echo-client``: talk to a secure-echo server over verified TLS.

Usage::

    secure-echo-client HOST:PORT [--ca CA.pem | --insecure] [--cert CERT.pem --key KEY.pem]
                       [--servername NAME] [--timeout SECONDS] [--tls13-only]
                       [--alpn PROTO]... [-v] [--proxy-v2 [--proxy-source IP:PORT]]
    secure-echo-client check HOST:PORT [same options]
    secure-echo-client info HOST:PORT [same options] [--info-line TEXT] [--raw]
    secure-echo-client --version

``HOST`` is a DNS name, an IPv4 address or a bracketed IPv6 address (``[::1]:8443``).

Echo mode copies standard input to the server line by line (LF-terminated, byte exact; a
final line without LF is sent as it is) and the server's replies to standard output, byte
exact.  ``check`` sends one random nonce line, expects the same line back and prints
``OK <round trip of the nonce line> ms <TLS version> <cipher>``, e.g.
``OK 3.1 ms TLSv1.3 TLS_AES_128_GCM_SHA256``.  ``info`` sends the ``--info-line`` text
as one line and prints the server's answer, one JSON object saying how the server sees
the connection (peer, TLS version, cipher, client certificate, ...), pretty-printed, or
with ``--raw`` byte exact as received.  The server answers it only when started with
``--info-line`` set to the same text; it has no default, so this client's default,
``INFO``, is the example in ``contrib/secure-echo.toml``.  A server without it echoes
the line back, which ``info`` reports as
``the server echoed the info line; start it with --info-line INFO``.

``--proxy-v2`` sends a PROXY protocol v2 header (``PROXY``, ``TCP4``/``TCP6``) before
the TLS handshake, as a TCP load balancer would, to test a server started with
``--proxy-protocol``.  The header names this client's own address as the source and
the server's as the destination; ``--proxy-source IP:PORT`` claims another source (a
server that trusts this client as a proxy then logs that address).  IPv4-mapped IPv6
addresses are sent as IPv4.

Exit status:

* 0: echo: all input answered and the connection closed; check: the nonce came back;
  info: a JSON object came back.
* 1: check: the server answered with another line; info: the server echoed the info
  line or answered with something that is not a JSON object; echo: standard input or
  output failed.
* 2: TLS or connection failure: name resolution, refused, reset, timeout, certificate
  verification, handshake failure or alert, or a server that closed before answering
  (as a server that requires a PROXY header does with a client that sends none).
* 64: bad usage (EX_USAGE), including an unreadable or unusable ``--ca``, ``--cert`` or
  ``--key``, and a ``--proxy-source`` of another IP version than the connection.
* 70: internal error (a bug; reported as one line like the rest).
* 130: interrupted.

Every failure is exactly one line on standard error, ``secure-echo-client: ...``.  No
tracebacks.

TLS policy: TLS 1.2 minimum (``--tls13-only``: 1.3).  The certificate must chain to
``--ca`` alone if given, else to the system trust store (OpenSSL's default paths, as
``ssl.create_default_context()`` loads them; ``SSL_CERT_FILE``/``SSL_CERT_DIR`` move
them), and must name ``--servername`` or else ``HOST``; an IP literal is checked against
the certificate's IP address entries.  A verification failure against the system store
says so and suggests ``--ca``.  ``--insecure`` checks nothing and says so in one
warning line on standard error before connecting.  ``--alpn PROTO`` (repeatable) offers
those protocols in that order.  Key-exchange groups are OpenSSL's defaults, never
narrowed: the client offers the post-quantum X25519MLKEM768 exactly when the OpenSSL
that Python's ``ssl`` uses does by default (3.5 and later); Python before 3.15 has no
way to add a group to that list.

``-v``/``--verbose`` prints, after the handshake and before any data, what was
negotiated and the server's certificate chain to standard error, each line starting
``* `` (:mod:`secure_echo.tools.report` says what and from where); standard output
is unchanged.  ``--version`` prints secure-echo's version, Python's and OpenSSL's.

I/O model.  Rules the loop keeps:

1. One thread, one selector.  TLS runs in an :class:`ssl.SSLObject` over memory BIOs that
   only the loop touches, so no record is ever read and written from two threads and
   readiness is that of the real socket (no plaintext hides inside an ``SSLSocket``).
2. The socket is read whenever it is readable and the server has not closed.  Replies are
   therefore always drained, so a server that stops reading while its output backs up is
   never waited on by a client that stopped reading: no deadlock.
3. Pipelining is bounded by a :class:`LineLedger`: every LF-terminated line sent is owed
   exactly one LF-terminated reply line.  New input is sent only while the bytes of
   unanswered lines stay under :data:`MAX_IN_FLIGHT`, except that a single line longer
   than the bound is always sent to its end (the server cannot answer before it sees the
   LF).  Standard input is read only while less than :data:`CHUNK` bytes wait to be sent
   and ciphertext is not backed up, so memory is bounded whatever the input size.
4. Half-close: once standard input has ended, everything is sent and every LF-terminated
   line is answered, the client sends close_notify (no TCP FIN) and keeps reading.  The
   server then echoes a final unterminated line and closes; the client exits when it sees
   the server's close_notify or end of stream.  Waiting for the answers before
   close_notify means a server never has to answer lines that arrived together with it.
5. Timeouts: connect plus handshake share one ``--timeout`` deadline; afterwards, while a
   reply, a send or the server's close is awaited, ``--timeout`` seconds without socket
   progress is a failure.  Waiting for standard input has no timeout.
6. A PROXY header is queued as the first bytes of the connection once TCP is up, before
   the first handshake record is made, and is sent with it under the handshake's
   deadline.  The header is plaintext outside TLS, so it never touches the TLS object.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import math
import os
import platform
import re
import secrets
import selectors
import shlex
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import secure_echo

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

PROG = "secure-echo-client"

EXIT_OK = 0
#: check: wrong reply; info: no JSON object; echo: standard input or output failed.
EXIT_WRONG_REPLY = 1
EXIT_LOCAL_IO = 1
EXIT_CONNECTION = 2
EXIT_USAGE = 64
EXIT_SOFTWARE = 70
EXIT_INTERRUPTED = 130

DEFAULT_TIMEOUT = 10.0
#: Bytes of sent-but-unanswered lines allowed before sending pauses.
MAX_IN_FLIGHT = 256 * 1024
#: Unit of reading standard input and of handing plaintext to TLS.
CHUNK = 64 * 1024
#: Ciphertext waiting for the socket above which no new plaintext is encrypted.
NET_HIGH_WATER = 64 * 1024
RECV_SIZE = 64 * 1024
MAX_PORT = 65535
#: What ``info`` sends without ``--info-line``.  The server has no default info line;
#: this is the example in ``contrib/secure-echo.toml``.
DEFAULT_INFO_LINE = "INFO"
#: Longest ``info`` reply accepted (the server's JSON line is well under 2 KiB).
MAX_INFO_REPLY = 64 * 1024
#: Bytes of each direction of the handshake kept for ``-v`` (a ClientHello and a
#: TLS 1.2 server flight with its chain fit; anything past this is not needed).
HANDSHAKE_RECORD_LIMIT = 64 * 1024
#: ALPN protocol names are 1 to 255 bytes (RFC 7301).
MAX_ALPN = 255
#: Appended to a verification failure when no ``--ca`` was given.
SYSTEM_STORE_HINT = (
    "(checked against the system trust store; give --ca CA.pem to trust a private CA)"
)
INSECURE_WARNING = (
    "warning: --insecure: the server's certificate is not verified, so anyone on the "
    "path can pose as the server"
)

_PORT = re.compile(r"[0-9]{1,5}")
_SSL_TEXT = re.compile(r"^(?:\[[^\]]*\]\s*)?(?P<text>.*?)(?:\s*\(_ssl\.c:\d+\))?$", re.DOTALL)


class ClientError(Exception):
    """A failure reported as one line on standard error with an exit status."""

    exit_status = EXIT_CONNECTION


class UsageError(ClientError):
    """Bad command line, or a ``--ca``/``--cert``/``--key`` that cannot be used."""

    exit_status = EXIT_USAGE


class ConnectionFailedError(ClientError):
    """Any TLS or connection failure."""

    exit_status = EXIT_CONNECTION


class LocalIOError(ClientError):
    """Standard input or output failed."""

    exit_status = EXIT_LOCAL_IO


class WrongReplyError(ClientError):
    """The server answered, but not with what the command asked for."""

    exit_status = EXIT_WRONG_REPLY


class _PeerClosedError(Exception):
    """The server closed the connection during the handshake."""


class _DeadlineError(Exception):
    """A deadline passed while waiting for the socket."""


# ----------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class Address:
    """Where to connect: a host (name or IP literal, IPv6 without brackets) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        """Render as ``host:port``, bracketing IPv6 literals."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def verify_name(self) -> str:
        """The name to verify the certificate against when no ``--servername`` is given."""
        # A zone index (fe80::1%eth0) is local routing, never part of a certificate.
        return self.host.partition("%")[0]


def parse_address(text: str) -> Address:
    """Parse ``HOST:PORT`` or ``[IPv6]:PORT``; raise :class:`ValueError` saying what is wrong."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError(f"{text!r} is not HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, as [::1]:8443")
        if any(ch.isspace() for ch in host):
            raise ValueError(f"{text!r}: the host contains white space")
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= MAX_PORT:
        raise ValueError(f"{text!r}: the port must be a number from 1 to {MAX_PORT}")
    return Address(host, int(port_text))


def one_line(text: str) -> str:
    """Make ``text`` printable on one line: control characters become spaces."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(cleaned.split())


def _soften(text: str) -> str:
    """Lower-case a leading capital of an ordinary word ("Connection refused")."""
    text = text.strip().rstrip(".")
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


def describe_error(exc: BaseException) -> str:
    """Describe a socket or TLS exception in a few words, without OpenSSL's source noise.

    ``certificate verify failed: unable to get local issuer certificate``,
    ``tlsv1 alert unknown ca``, ``connection refused``, ``timed out``.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = _soften(exc.verify_message or "")
        return one_line(f"certificate verify failed: {detail}" if detail else "verify failed")
    if isinstance(exc, ssl.SSLError):
        raw = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
        match = _SSL_TEXT.match(raw)
        text = match.group("text") if match else raw
        if not text.strip():
            text = (exc.reason or type(exc).__name__).replace("_", " ").lower()
        return one_line(_soften(text))
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return one_line(_soften(exc.strerror))
    return one_line(_soften(str(exc)) or type(exc).__name__)


class LineLedger:
    """Pure accounting of pipelined lines: what is sent, what is answered, what may go next.

    Invariants: ``unanswered`` holds the sizes of the LF-terminated lines sent and not yet
    answered, oldest first; ``partial`` is the size of the unterminated line being sent.
    A reply line (one LF received) answers the oldest unanswered line.  A reply that
    arrives while none is owed (a server that rejects an over-long line before its end,
    or says something unsolicited) is kept as ``early`` credit and settles the next line
    completed, so the count never drifts into a stall.
    """

    def __init__(self) -> None:
        self.unanswered: collections.deque[int] = collections.deque()
        self.unanswered_bytes = 0
        self.partial = 0
        self.early = 0
        self.replies = 0

    @property
    def in_flight(self) -> int:
        """Bytes sent whose reply has not arrived, the unterminated line included."""
        return self.unanswered_bytes + self.partial

    def sent(self, data: bytes) -> None:
        """Account for ``data`` handed to the connection."""
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            size = self.partial + end + 1 - start
            self.partial = 0
            if self.early:
                self.early -= 1
            else:
                self.unanswered.append(size)
                self.unanswered_bytes += size
            start = end + 1
        self.partial += len(data) - start

    def received(self, data: bytes) -> int:
        """Account for reply bytes; return how many reply lines they completed."""
        count = data.count(b"\n")
        for _ in range(count):
            if self.unanswered:
                self.unanswered_bytes -= self.unanswered.popleft()
            else:
                self.early += 1
        self.replies += count
        return count

    def budget(self, limit: int) -> int:
        """Return how many more bytes may be sent now (0: wait for replies)."""
        free = limit - self.in_flight
        if free > 0:
            return free
        if not self.unanswered:
            # Only an unterminated line is out; the server needs its end to answer it.
            return CHUNK
        return 0


def parse_proxy_source(text: str) -> Address:
    """Parse ``IP:PORT`` or ``[IPv6]:PORT`` for ``--proxy-source``; a name is refused.

    A PROXY header carries addresses, not names, so the host must be an IP literal.
    """
    address = parse_address(text)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError(
            f"{text!r}: the host must be an IP address, as in 192.0.2.7:4242 or [2001:db8::7]:4242"
        ) from None
    return address


def _plain_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP address ``host``, an IPv4-mapped IPv6 address as the IPv4 one."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def proxy_v2_header(
    local: tuple[str, int], peer: tuple[str, int], claimed: Address | None = None
) -> bytes:
    """The PROXY v2 header for a connection from ``local`` to ``peer``.

    ``claimed`` (``--proxy-source``) replaces ``local`` as the source.  Both ends of a
    header are of one IP version, so a ``claimed`` source of the other version than
    the connection raises :class:`UsageError`.
    """
    # The header builder's module also holds the daemon's Twisted reader; importing it
    # only here keeps the client's other modes on the standard library alone.
    from secure_echo.wire.proxy import build_v2_header  # noqa: PLC0415

    destination = _plain_ip(peer[0])
    source = _plain_ip(local[0] if claimed is None else claimed.host)
    if claimed is not None and source.version != destination.version:
        where = Address(str(destination), peer[1])
        raise UsageError(
            f"--proxy-source {claimed} is IPv{source.version} but the connection to {where} "
            f"is IPv{destination.version}; claim an IPv{destination.version} source"
        )
    source_port = local[1] if claimed is None else claimed.port
    return build_v2_header(
        source=(str(source), source_port), destination=(str(destination), peer[1])
    )


# ----------------------------------------------------------------------------- TLS set-up


def _read_option_file(option: str, path: str) -> None:
    try:
        with Path(path).open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise UsageError(f"{option}: cannot read {path}: {describe_error(exc)}") from None


def build_context(
    ca: str | None,
    cert: str | None = None,
    key: str | None = None,
    *,
    tls13_only: bool = False,
    insecure: bool = False,
    alpn: Sequence[str] = (),
) -> ssl.SSLContext:
    """Build the client context: TLS 1.2+ (or 1.3 only), verifying the server.

    The server is verified against ``ca`` only, or without it against the system trust
    store (OpenSSL's default paths); ``insecure`` verifies nothing.  ``alpn`` is offered
    in order.  Raises :class:`UsageError` naming the option whose file cannot be read or
    used.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls13_only else ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _read_option_file("--ca", ca)
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise UsageError(
                f"--ca: {ca} holds no usable CA certificate: {describe_error(exc)}"
            ) from None
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if (cert is None) != (key is None):
        raise UsageError("--cert and --key go together: give both or neither")
    if cert is not None and key is not None:
        _load_client_pair(context, cert, key)
    return context


def trust_description(options: argparse.Namespace) -> str:
    """Say what the server's certificate is checked against, for ``-v``."""
    if options.insecure:
        return "none (--insecure)"
    if options.ca is None:
        return "against the system trust store"
    return f"against {options.ca}"


def _load_client_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    _read_option_file("--cert", cert)
    _read_option_file("--key", key)
    asked: list[bool] = []

    def no_password() -> bytes:
        # Never let OpenSSL prompt on the terminal for a passphrase.
        asked.append(True)
        return b""

    try:
        context.load_cert_chain(cert, key, password=no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        if asked:
            raise UsageError(f"--key: {key} is encrypted; give an unencrypted key") from None
        raise UsageError(
            f"--cert/--key: cannot use {cert} with {key}: {describe_error(exc)}"
        ) from None


# ----------------------------------------------------------------------------- connection


def new_selector() -> selectors.BaseSelector:
    """Return a selector that can watch sockets, pipes, terminals and regular files.

    epoll (Linux's default) refuses regular files, so ``< input.txt`` would fail; poll
    takes them.  macOS's poll does not work on terminals, so elsewhere use select, whose
    descriptor limit (1024) is far above the three descriptors this process watches.
    """
    platform: str = sys.platform  # a variable: mypy would drop the branch not taken here
    if platform.startswith("linux"):
        return selectors.PollSelector()
    return selectors.SelectSelector()


class HandshakeRecorder:
    """Copies of the TLS bytes sent and received until the handshake is done, for ``-v``.

    Each direction keeps at most :data:`HANDSHAKE_RECORD_LIMIT` bytes.  The PROXY header
    is not TLS and never passes through here.
    """

    def __init__(self) -> None:
        self.sent = bytearray()
        self.received = bytearray()
        self.recording = True

    def on_sent(self, data: bytes) -> None:
        """Keep a copy of TLS bytes handed to the socket queue."""
        if self.recording:
            self.sent += data[: HANDSHAKE_RECORD_LIMIT - len(self.sent)]

    def on_received(self, data: bytes) -> None:
        """Keep a copy of TLS bytes read from the socket."""
        if self.recording:
            self.received += data[: HANDSHAKE_RECORD_LIMIT - len(self.received)]


class _Connection:
    """A non-blocking TCP socket with TLS over memory BIOs."""

    def __init__(
        self,
        context: ssl.SSLContext,
        server_name: str,
        address: Address,
        *,
        recorder: HandshakeRecorder | None = None,
        verify_hint: str = "",
    ) -> None:
        self.address = address
        self.server_name = server_name
        self.recorder = recorder
        self.verify_hint = verify_hint
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        try:
            self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        except (ValueError, UnicodeError) as exc:
            raise UsageError(f"cannot verify the name {server_name!r}: {exc}") from None
        self.net_out = bytearray()
        self.sock: socket.socket | None = None
        self.selector = new_selector()

    def close(self) -> None:
        self.selector.close()
        if self.sock is not None:
            self.sock.close()

    def collect(self) -> None:
        """Move ciphertext produced by the TLS object to the socket queue."""
        if self.outgoing.pending:
            data = self.outgoing.read()
            if self.recorder is not None:
                self.recorder.on_sent(data)
            self.net_out += data

    @property
    def socket(self) -> socket.socket:
        if self.sock is None:
            raise RuntimeError("not connected")  # a bug: only used after connect()
        return self.sock

    def connect(self, deadline: float, timeout: float) -> None:
        """Connect to the first address of the host that accepts, before ``deadline``."""
        where = self.address
        try:
            infos = socket.getaddrinfo(where.host, where.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ConnectionFailedError(
                f"cannot resolve {where.host}: {describe_error(exc)}"
            ) from None
        failure: OSError = TimeoutError()
        for family, kind, proto, _, sockaddr in infos:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = TimeoutError()
                break
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(remaining)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            self.selector.register(sock, selectors.EVENT_READ)
            return
        reason = describe_error(failure)
        if isinstance(failure, TimeoutError):
            reason = f"timed out after {timeout:g} s"
        raise ConnectionFailedError(f"cannot connect to {where}: {reason}")

    def handshake(self, deadline: float, timeout: float) -> None:
        """Complete the TLS handshake before ``deadline``."""
        prefix = f"TLS handshake with {self.address} failed"
        try:
            while True:
                try:
                    self.tls.do_handshake()
                except ssl.SSLWantReadError:
                    self.collect()
                    self._flush_until(deadline)
                    self._receive_until(deadline)
                else:
                    self.collect()
                    if self.recorder is not None:
                        self.recorder.recording = False
                    return
        except _DeadlineError:
            raise ConnectionFailedError(f"{prefix}: timed out after {timeout:g} s") from None
        except (_PeerClosedError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            raise ConnectionFailedError(f"{prefix}: connection closed by the server") from None
        except ssl.SSLError as exc:
            self.send_alert()
            reason = describe_error(exc)
            if isinstance(exc, ssl.SSLCertVerificationError) and self.verify_hint:
                reason = f"{reason} {self.verify_hint}"
            raise ConnectionFailedError(f"{prefix}: {reason}") from None
        except OSError as exc:
            raise ConnectionFailedError(f"{prefix}: {describe_error(exc)}") from None

    def send_alert(self) -> None:
        """Best effort: let the server see the alert OpenSSL produced, not a reset."""
        self.collect()
        try:
            self.socket.send(self.net_out)
        except OSError:
            return

    def _wait(self, events: int, deadline: float) -> None:
        self.selector.modify(self.socket, events)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self.selector.select(remaining):
            raise _DeadlineError

    def _flush_until(self, deadline: float) -> None:
        while self.net_out:
            self._wait(selectors.EVENT_WRITE, deadline)
            try:
                sent = self.socket.send(self.net_out)
            except BlockingIOError:
                continue
            del self.net_out[:sent]

    def _receive_until(self, deadline: float) -> None:
        self._wait(selectors.EVENT_READ, deadline)
        try:
            data = self.socket.recv(RECV_SIZE)
        except BlockingIOError:
            return
        if not data:
            self.incoming.write_eof()
            raise _PeerClosedError
        if self.recorder is not None:
            self.recorder.on_received(data)
        self.incoming.write(data)


def open_connection(
    address: Address,
    context: ssl.SSLContext,
    server_name: str | None,
    timeout: float,
    *,
    preamble: Callable[[socket.socket], bytes] | None = None,
    recorder: HandshakeRecorder | None = None,
    verify_hint: str = "",
) -> _Connection:
    """Connect and complete the handshake within ``timeout`` seconds, or raise.

    ``preamble(sock)``, called once TCP is up, returns plaintext bytes to send before
    the handshake (a PROXY header).  ``recorder`` keeps the handshake's bytes;
    ``verify_hint`` is appended to a certificate verification failure.
    """
    connection = _Connection(
        context,
        server_name or address.verify_name,
        address,
        recorder=recorder,
        verify_hint=verify_hint,
    )
    deadline = time.monotonic() + timeout
    try:
        connection.connect(deadline, timeout)
        if preamble is not None:
            # Queued before the handshake makes its first record (rule 6).
            connection.net_out += preamble(connection.socket)
        connection.handshake(deadline, timeout)
    except BaseException:
        connection.close()
        raise
    return connection


# ----------------------------------------------------------------------------- the I/O loop


class _Pump:
    """The single-threaded loop: input to TLS, TLS to output, half-close at the end.

    See the module docstring for the rules it keeps.
    """

    def __init__(
        self,
        connection: _Connection,
        *,
        write_output: Callable[[bytes], None],
        timeout: float,
        input_fd: int | None = None,
        data: bytes = b"",
        wait_for_close: bool = True,
    ) -> None:
        self.conn = connection
        self.write_output = write_output
        self.timeout = timeout
        self.input_fd = input_fd
        self.pending = bytearray(data)
        self.input_eof = input_fd is None
        self.wait_for_close = wait_for_close
        self.ledger = LineLedger()
        self.close_sent = False
        self.peer_closed = False
        self.socket_eof = False
        self.received_any = False
        self.last_progress = time.monotonic()
        self.last_reply_at = 0.0
        connection.selector.modify(connection.socket, selectors.EVENT_READ)
        self._masks: dict[int, int] = {connection.socket.fileno(): selectors.EVENT_READ}

    # -- state --------------------------------------------------------------------------

    def _expecting(self) -> bool:
        """Whether the server owes us something, so the idle timeout runs."""
        return bool(
            self.ledger.unanswered
            or self.conn.net_out
            or self.close_sent
            or self.conn.incoming.pending  # half a record: the rest is due
        )

    def _finished(self) -> bool:
        where = self.conn.address
        if self.peer_closed:
            if not self.input_eof or self.pending:
                raise ConnectionFailedError(
                    f"{where} closed the connection before the end of the input"
                )
            owed = len(self.ledger.unanswered) + (
                1 if self.ledger.partial and not self.close_sent else 0
            )
            if owed:
                raise ConnectionFailedError(
                    f"{where} closed the connection with {owed} line(s) unanswered"
                )
            return True
        return self.close_sent and not self.wait_for_close and not self.conn.net_out

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        """Run until the exchange is complete; raise a :class:`ClientError` on failure."""
        while True:
            self._feed_tls()
            self._maybe_close()
            if self._finished():
                return
            self._update_interest()
            timeout = None
            if self._expecting():
                timeout = max(0.0, self.last_progress + self.timeout - time.monotonic())
            ready = self.conn.selector.select(timeout)
            if not ready:
                if self._expecting() and (time.monotonic() - self.last_progress >= self.timeout):
                    raise ConnectionFailedError(self._timeout_message())
                continue
            for key, mask in ready:
                if key.fd == self.input_fd:
                    self._read_input()
                    continue
                if mask & selectors.EVENT_READ:
                    self._receive()
                if mask & selectors.EVENT_WRITE and not self.peer_closed:
                    self._send()

    def _timeout_message(self) -> str:
        where = self.conn.address
        waiting = len(self.ledger.unanswered)
        if waiting:
            return (
                f"no reply from {where} within {self.timeout:g} s ({waiting} line(s) unanswered)"
            )
        if self.close_sent:
            return f"{where} did not close the connection within {self.timeout:g} s"
        return f"cannot send to {where}: no progress within {self.timeout:g} s"

    def _update_interest(self) -> None:
        sock_fd = self.conn.socket.fileno()
        wanted = {sock_fd: selectors.EVENT_READ}
        if self.conn.net_out:
            wanted[sock_fd] |= selectors.EVENT_WRITE
        if self.input_fd is not None and not self.input_eof and len(self.pending) < CHUNK:
            wanted[self.input_fd] = selectors.EVENT_READ
        selector = self.conn.selector
        for fd, events in wanted.items():
            if fd not in self._masks:
                selector.register(fd, events)
            elif self._masks[fd] != events:
                selector.modify(fd, events)
        for fd in set(self._masks) - set(wanted):
            selector.unregister(fd)
        self._masks = wanted

    # -- plaintext in ---------------------------------------------------------------------

    def _read_input(self) -> None:
        if self.input_fd is None:
            return  # not registered without an input descriptor
        try:
            data = os.read(self.input_fd, CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            raise LocalIOError(f"cannot read standard input: {describe_error(exc)}") from None
        if data:
            self.pending += data
        else:
            self.input_eof = True

    def _feed_tls(self) -> None:
        while self.pending and not self.close_sent and not self.peer_closed:
            if len(self.conn.net_out) >= NET_HIGH_WATER:
                return
            budget = min(self.ledger.budget(MAX_IN_FLIGHT), CHUNK, len(self.pending))
            if budget <= 0:
                return
            chunk = bytes(self.pending[:budget])
            try:
                written = self.conn.tls.write(chunk)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLError as exc:
                raise ConnectionFailedError(self._tls_failure(exc)) from None
            del self.pending[:written]
            self.ledger.sent(chunk[:written])
            self.conn.collect()

    def _maybe_close(self) -> None:
        if (
            self.close_sent
            or self.peer_closed
            or not self.input_eof
            or self.pending
            or self.ledger.unanswered
            # Python's unwrap() may call SSL_shutdown twice, and OpenSSL's shutdown
            # discards application data it reads; wait until no record is half-fed.
            or self.conn.incoming.pending
        ):
            return
        try:
            self.conn.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify sent; the server's comes later
        except ssl.SSLError as exc:
            raise ConnectionFailedError(self._tls_failure(exc)) from None
        self.close_sent = True
        self.conn.collect()

    # -- the socket -----------------------------------------------------------------------

    def _send(self) -> None:
        try:
            sent = self.conn.socket.send(self.conn.net_out)
        except BlockingIOError:
            return
        except OSError as exc:
            where = self.conn.address
            raise ConnectionFailedError(
                f"connection to {where} failed: {describe_error(exc)}"
            ) from None
        del self.conn.net_out[:sent]
        self.last_progress = time.monotonic()

    def _receive(self) -> None:
        try:
            data = self.conn.socket.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            where = self.conn.address
            raise ConnectionFailedError(
                f"connection to {where} failed: {describe_error(exc)}"
            ) from None
        self.last_progress = time.monotonic()
        if data:
            self.conn.incoming.write(data)
        else:
            self.socket_eof = True
            self.conn.incoming.write_eof()
        self._drain_tls()

    def _drain_tls(self) -> None:
        while not self.peer_closed:
            try:
                data = self.conn.tls.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                self.peer_closed = self.socket_eof
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            except (ssl.SSLEOFError, ssl.SSLSyscallError) as exc:
                if not self.socket_eof:
                    raise ConnectionFailedError(self._tls_failure(exc)) from None
                self.peer_closed = True  # end of stream without close_notify
                break
            except ssl.SSLError as exc:
                self.conn.send_alert()
                raise ConnectionFailedError(self._tls_failure(exc)) from None
            if not data:  # close_notify before ours
                self.peer_closed = True
                break
            self.received_any = True
            self.write_output(data)
            if self.ledger.received(data):
                self.last_reply_at = time.monotonic()
        self.conn.collect()

    def _tls_failure(self, exc: ssl.SSLError) -> str:
        where = self.conn.address
        if not self.received_any:
            # With TLS 1.3 the server checks a client certificate after our side of the
            # handshake has completed; its alert is still a handshake failure.
            return f"TLS handshake with {where} failed: {describe_error(exc)}"
        return f"TLS error from {where}: {describe_error(exc)}"


# ----------------------------------------------------------------------------- the commands


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # Standard output inherited in non-blocking mode: wait until it drains.
            with new_selector() as selector:
                selector.register(fd, selectors.EVENT_WRITE)
                selector.select()
            continue
        except OSError as exc:
            raise LocalIOError(f"cannot write standard output: {describe_error(exc)}") from None
        view = view[written:]


def _proxy_preamble(options: argparse.Namespace) -> Callable[[socket.socket], bytes] | None:
    """The PROXY v2 header maker for ``--proxy-v2`` (``None`` without it)."""
    if not options.proxy_v2:
        return None
    claimed: Address | None = options.proxy_source

    def header(sock: socket.socket) -> bytes:
        local, peer = sock.getsockname(), sock.getpeername()
        return proxy_v2_header((local[0], local[1]), (peer[0], peer[1]), claimed)

    return header


def connect(options: argparse.Namespace, context: ssl.SSLContext) -> _Connection:
    """Open the connection the options describe (PROXY header included), or raise.

    With ``-v`` the connection report goes to standard error once the handshake is done.
    """
    recorder = HandshakeRecorder() if options.verbose else None
    connection = open_connection(
        options.address,
        context,
        options.servername,
        options.timeout,
        preamble=_proxy_preamble(options),
        recorder=recorder,
        verify_hint=SYSTEM_STORE_HINT if options.ca is None and not options.insecure else "",
    )
    if recorder is not None:
        try:
            _print_report(options, connection, recorder)
        except BaseException:
            connection.close()
            raise
    return connection


def _print_report(
    options: argparse.Namespace, connection: _Connection, recorder: HandshakeRecorder
) -> None:
    # Imported here: the report needs ``cryptography``, which the other paths do not.
    from secure_echo.tools.report import connection_report  # noqa: PLC0415

    lines = connection_report(
        connection.tls,
        address=str(connection.address),
        server_name=connection.server_name,
        trust=trust_description(options),
        offered_alpn=options.alpn,
        sent=bytes(recorder.sent),
        received=bytes(recorder.received),
    )
    try:
        sys.stderr.write("".join(f"{line}\n" for line in lines))
        sys.stderr.flush()
    except (OSError, ValueError):
        return


def run_echo(options: argparse.Namespace, context: ssl.SSLContext) -> int:
    """Echo standard input through the server to standard output."""
    connection = connect(options, context)
    try:
        pump = _Pump(
            connection,
            write_output=lambda data: _write_fd(sys.stdout.fileno(), data),
            timeout=options.timeout,
            input_fd=sys.stdin.fileno(),
        )
        pump.run()
    finally:
        connection.close()
    return EXIT_OK


def run_check(options: argparse.Namespace, context: ssl.SSLContext) -> int:
    """Send one nonce line, expect it back, print ``OK <ms> ms <version> <cipher>``."""
    nonce = f"secure-echo-check {secrets.token_hex(16)}\n".encode("ascii")
    connection = connect(options, context)
    reply = bytearray()
    try:
        version = connection.tls.version() or "unknown"
        cipher = (connection.tls.cipher() or ("unknown",))[0]
        pump = _Pump(
            connection,
            write_output=reply.extend,
            timeout=options.timeout,
            data=nonce,
            wait_for_close=False,
        )
        started = time.monotonic()
        pump.run()
        elapsed_ms = (pump.last_reply_at - started) * 1000
    finally:
        connection.close()
    if bytes(reply) != nonce:
        shown = bytes(reply[:80])
        more = "..." if len(reply) > len(shown) else ""
        _complain(
            f"check of {options.address} failed: wrong reply {shown!r}{more}, "
            f"expected the nonce line {nonce!r}"
        )
        return EXIT_WRONG_REPLY
    print(f"OK {elapsed_ms:.1f} ms {version} {cipher}", flush=True)
    return EXIT_OK


def run_info(options: argparse.Namespace, context: ssl.SSLContext) -> int:
    """Send the info line, print the server's JSON answer (pretty, or raw with ``--raw``)."""
    line: bytes = options.info_line
    reply = bytearray()

    def collect(data: bytes) -> None:
        reply.extend(data)
        if len(reply) > MAX_INFO_REPLY:
            # Not the server's info answer; do not buffer whatever this is forever.
            raise WrongReplyError(
                f"info from {options.address} failed: the reply is longer than "
                f"{MAX_INFO_REPLY} bytes, not the server's info line"
            )

    connection = connect(options, context)
    try:
        pump = _Pump(
            connection,
            write_output=collect,
            timeout=options.timeout,
            data=line + b"\n",
            wait_for_close=False,
        )
        pump.run()
    finally:
        connection.close()
    facts = parse_info_reply(line, bytes(reply), options.address)
    if options.raw:
        _write_fd(sys.stdout.fileno(), bytes(reply))
    else:
        text = json.dumps(facts, indent=2, ensure_ascii=False) + "\n"
        _write_fd(sys.stdout.fileno(), text.encode("utf-8", "backslashreplace"))
    return EXIT_OK


def parse_info_reply(line: bytes, reply: bytes, address: Address) -> dict[str, object]:
    """Return the JSON object the server answered ``line`` with.

    Raises :class:`WrongReplyError` if the server echoed ``line`` (it has no
    ``--info-line``, or another one) or answered with anything but a JSON object.
    """
    content = reply.removesuffix(b"\n").removesuffix(b"\r")
    if content == line:
        text = line.decode("utf-8", "surrogateescape")
        raise WrongReplyError(
            f"the server echoed the info line; start it with --info-line {shlex.quote(text)}"
        )
    try:
        facts = json.loads(content)
    except ValueError:
        facts = None
    if not isinstance(facts, dict):
        shown = content[:80]
        more = "..." if len(content) > len(shown) else ""
        raise WrongReplyError(
            f"info from {address} failed: the reply {shown!r}{more} is not a JSON object"
        )
    return facts


# ----------------------------------------------------------------------------- the command line


class _ArgumentParser(argparse.ArgumentParser):
    """Report usage errors as one line and exit status 64, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _address_argument(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _proxy_source_argument(text: str) -> Address:
    try:
        return parse_proxy_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _info_line_argument(text: str) -> bytes:
    # Command-line bytes that are not UTF-8 arrive as surrogates: give them back, as the
    # server does with its --info-line, so both sides compare the same bytes.
    line = text.encode("utf-8", "surrogateescape")
    if not line:
        raise argparse.ArgumentTypeError("the info line must not be empty")
    if b"\n" in line or b"\r" in line:
        raise argparse.ArgumentTypeError(
            f"{text!r} holds a line break; give the content of one line"
        )
    return line


def _alpn_argument(text: str) -> str:
    name = text.encode("utf-8", "surrogateescape")
    if not 1 <= len(name) <= MAX_ALPN:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an ALPN protocol name is 1 to {MAX_ALPN} bytes"
        )
    if not all(0x21 <= byte <= 0x7E for byte in name):  # noqa: PLR2004 - printable ASCII
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the ALPN protocol name in printable ASCII, as h2 or http/1.1"
        )
    return text


def _servername_argument(text: str) -> str:
    if not text or any(ch.isspace() for ch in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a server name")
    return text


def _timeout_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the timeout must be more than 0 seconds")
    return value


_EXIT_STATUS_HELP = (
    "exit status: 0 ok; 1 wrong reply (check), no JSON info (info) or standard "
    "input/output failed (echo); 2 TLS or connection failure; 64 bad usage or unusable "
    "--ca/--cert/--key"
)


def version_text() -> str:
    """What ``--version`` prints: secure-echo's version, then Python's and OpenSSL's."""
    return (
        f"{PROG} {secure_echo.__version__} "
        f"(Python {platform.python_version()}, {ssl.OPENSSL_VERSION})"
    )


#: What each mode runs once the options are parsed and the TLS context is built.
_RUNNERS: dict[str, Callable[[argparse.Namespace, ssl.SSLContext], int]] = {
    "echo": run_echo,
    "check": run_check,
    "info": run_info,
}


def _parser(mode: str) -> argparse.ArgumentParser:
    if mode == "check":
        parser = _ArgumentParser(
            prog=f"{PROG} check",
            description="Send one random line to a secure-echo server and expect it back; "
            "print 'OK <round trip> ms <TLS version> <cipher>'.",
            epilog=_EXIT_STATUS_HELP,
        )
    elif mode == "info":
        parser = _ArgumentParser(
            prog=f"{PROG} info",
            description="Ask a secure-echo server how it sees this connection: send the "
            "--info-line text as one line and print the server's JSON answer "
            "(peer, TLS version, cipher, client certificate, ...).",
            epilog=_EXIT_STATUS_HELP,
        )
    else:
        parser = _ArgumentParser(
            prog=PROG,
            usage=f"{PROG} [check|info] HOST:PORT [--ca CA.pem | --insecure] [options]",
            description="Send standard input to a secure-echo server line by line and write "
            f"its replies to standard output. '{PROG} check HOST:PORT ...' "
            f"checks a server instead; '{PROG} info HOST:PORT ...' shows how the server "
            "sees the connection.",
            epilog=_EXIT_STATUS_HELP,
        )
    parser.add_argument(
        "address",
        metavar="HOST:PORT",
        type=_address_argument,
        help="server address; IPv6 in brackets: [::1]:8443",
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument(
        "--ca",
        metavar="CA.pem",
        help="CA certificate(s) to verify the server against (default: the system trust store)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate or name (a warning says so)",
    )
    parser.add_argument("--cert", metavar="CERT.pem", help="client certificate (with --key)")
    parser.add_argument("--key", metavar="KEY.pem", help="unencrypted client private key")
    parser.add_argument(
        "--servername",
        type=_servername_argument,
        metavar="NAME",
        help="name to send (SNI) and to verify in the certificate (default: HOST)",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout_argument,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="limit for connect plus handshake, then for each wait on the server "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--tls13-only", action="store_true", help="refuse TLS 1.2")
    parser.add_argument(
        "--alpn",
        action="append",
        default=[],
        type=_alpn_argument,
        metavar="PROTO",
        help="offer this ALPN protocol; repeatable, in order of preference",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the negotiated TLS version, cipher, group and ALPN and the server's "
        "certificate chain to standard error",
    )
    parser.add_argument(
        "--proxy-v2",
        action="store_true",
        help="send a PROXY protocol v2 header before the TLS handshake, as a load "
        "balancer would (for a server started with --proxy-protocol); it names this "
        "client's address as the source",
    )
    parser.add_argument(
        "--proxy-source",
        type=_proxy_source_argument,
        metavar="IP:PORT",
        help="with --proxy-v2: claim this source address instead of the client's own; "
        "IPv6 in brackets, same IP version as the connection",
    )
    if mode == "info":
        parser.add_argument(
            "--info-line",
            type=_info_line_argument,
            default=DEFAULT_INFO_LINE,
            metavar="TEXT",
            help="the line to send; must equal the server's --info-line exactly "
            f"(default {DEFAULT_INFO_LINE}: the server has none, and this is the example "
            "in contrib/secure-echo.toml)",
        )
        parser.add_argument(
            "--raw", action="store_true", help="print the JSON line as received, not indented"
        )
    return parser


def _complain(message: str) -> None:
    try:
        sys.stderr.write(f"{PROG}: {one_line(message)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        return


def parse_arguments(argv: Sequence[str]) -> tuple[str, argparse.Namespace]:
    """Return the mode (``"echo"``, ``"check"`` or ``"info"``) and the options.

    Raises :class:`UsageError` on bad usage.
    """
    arguments = list(argv)
    mode = arguments[0] if arguments[:1] in (["check"], ["info"]) else "echo"
    if mode != "echo":
        arguments = arguments[1:]
    parser = _parser(mode)
    options = parser.parse_args(arguments)
    if options.proxy_source is not None and not options.proxy_v2:
        parser.error("--proxy-source needs --proxy-v2")
    if options.insecure and options.ca is not None:
        parser.error("--insecure and --ca exclude each other: verify against --ca, or not at all")
    return mode, options


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``secure-echo-client``; return the exit status."""
    try:
        try:
            mode, options = parse_arguments(sys.argv[1:] if argv is None else argv)
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        context = build_context(
            options.ca,
            options.cert,
            options.key,
            tls13_only=options.tls13_only,
            insecure=options.insecure,
            alpn=options.alpn,
        )
        if options.insecure:
            _complain(INSECURE_WARNING)
        return _RUNNERS[mode](options, context)
    except ClientError as exc:
        _complain(str(exc))
        return exc.exit_status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug; still one line, never a traceback
        _complain(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_SOFTWARE


if __name__ == "__main__":
    raise SystemExit(main())
