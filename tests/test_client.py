"""Tests for :mod:`secure_echo.tools.client`, the ``secure-echo-client`` command.

Pure parts (address parsing, error wording, line accounting, option checks) are called
directly.  End-to-end behaviour runs the client as a subprocess against
``tests/ssl_echo_peer.py``, a small stdlib TLS echo server, also a subprocess.  Every
subprocess wait has a timeout and every process is stopped by a cleanup.
"""

from __future__ import annotations

import io
import itertools
import os
import platform
import selectors
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import secure_echo
from secure_echo.tools import certgen
from secure_echo.tools.client import (
    CHUNK,
    DEFAULT_INFO_LINE,
    EXIT_CONNECTION,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WRONG_REPLY,
    MAX_IN_FLIGHT,
    MAX_INFO_REPLY,
    Address,
    LineLedger,
    UsageError,
    WrongReplyError,
    build_context,
    describe_error,
    main,
    one_line,
    parse_address,
    parse_arguments,
    parse_info_reply,
    parse_proxy_source,
    proxy_v2_header,
)
from secure_echo.wire.proxy import ProxyHeader, parse_header

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = REPO / "tests" / "ssl_echo_peer.py"
#: Upper bound for any single subprocess run; the tests normally take well under a second.
RUN_TIMEOUT = 60.0
PREFIX = b"secure-echo-client: "


@dataclass(frozen=True)
class Certs:
    """Paths of the certificates and keys generated for one test."""

    directory: Path
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(case: SynchronousTestCase) -> Certs:
    """Generate a CA, a server and a client pair, and an unrelated CA, under mktemp()."""
    directory = Path(case.mktemp())
    directory.mkdir(parents=True)
    ca = certgen.make_ca("client-test CA")
    other = certgen.make_ca("some other CA")
    certs = Certs(
        directory=directory,
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    certgen.write_pair(ca, certs.ca, directory / "ca.key")
    certgen.write_pair(other, certs.other_ca, directory / "other-ca.key")
    certgen.write_pair(certgen.issue_server(ca), certs.server_cert, certs.server_key)
    certgen.write_pair(certgen.issue_client(ca, "client-one"), certs.client_cert, certs.client_key)
    return certs


class Peer:
    """A running ``ssl_echo_peer.py``; stopped by a cleanup registered on the test."""

    def __init__(self, case: SynchronousTestCase, certs: Certs, *extra: str) -> None:
        stderr_path = certs.directory / f"peer-{time.monotonic_ns()}.err"
        self._stderr = stderr_path.open("wb")
        case.addCleanup(self._stderr.close)
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(PEER_SCRIPT),
                "--cert",
                str(certs.server_cert),
                "--key",
                str(certs.server_key),
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        case.addCleanup(self.stop)
        self._buffer = b""
        first = self.next_line()
        if not first.isdigit():
            case.fail(f"peer did not start: {first!r}; see {stderr_path}")
        self.port = int(first)

    def next_line(self, timeout: float = 10.0) -> str:
        """Return the peer's next line of standard output, or fail after ``timeout``."""
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.PollSelector() as selector:
            selector.register(stdout.fileno(), selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise AssertionError(f"no line from the peer within {timeout} s")
                data = os.read(stdout.fileno(), 4096)
                if not data:
                    raise AssertionError(f"peer exited; unread output {self._buffer!r}")
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def stop(self) -> None:
        """Close the peer's standard input (it exits), wait, kill if it does not."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def client_env() -> dict[str, str]:
    """Return the environment for a client subprocess: this checkout's ``src`` first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p
    )
    return env


def client_command(*args: str) -> list[str]:
    """Return the command line that runs the client module with ``args``."""
    return [sys.executable, "-m", "secure_echo.tools.client", *args]


def run_client(
    *args: str, data: bytes = b"", stdin: IO[bytes] | None = None, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m secure_echo.tools.client ARGS`` with ``data`` (or ``stdin``) as input."""
    command, env = client_command(*args), client_env()
    if stdin is not None:
        return subprocess.run(
            command, stdin=stdin, capture_output=True, timeout=timeout, env=env, check=False
        )
    return subprocess.run(
        command, input=data, capture_output=True, timeout=timeout, env=env, check=False
    )


def spawn_client(case: SynchronousTestCase, *args: str) -> subprocess.Popen[bytes]:
    """Start the client with pipes for all three streams; a cleanup reaps it."""
    process = subprocess.Popen(
        client_command(*args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(),
    )
    case.addCleanup(reap, process)
    return process


def reap(process: subprocess.Popen[bytes]) -> None:
    """Kill ``process`` if it still runs, wait for it, close its pipes."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def read_exactly(stream: IO[bytes], size: int, timeout: float = 10.0) -> bytes:
    """Read ``size`` bytes from a pipe, failing after ``timeout`` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.PollSelector() as selector:
        selector.register(stream.fileno(), selectors.EVENT_READ)
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"only {data!r} within {timeout} s")
            chunk = os.read(stream.fileno(), size - len(data))
            if not chunk:
                raise AssertionError(f"end of stream after {data!r}")
            data += chunk
    return data


class ClientTestCase(SynchronousTestCase):
    """Shared set-up: certificates per test and assertions on the client's output."""

    def setUp(self) -> None:
        self.certs = make_certs(self)

    def peer(self, *extra: str) -> Peer:
        """Start an echo peer with the test's server certificate."""
        return Peer(self, self.certs, *extra)

    def assert_one_line_error(
        self, result: subprocess.CompletedProcess[bytes], status: int, text: str
    ) -> str:
        """Assert exit ``status``, no output, one stderr line containing ``text``."""
        self.assertEqual((result.returncode, result.stdout), (status, b""), result.stderr.decode())
        self.assertTrue(result.stderr.startswith(PREFIX), result.stderr)
        self.assertTrue(result.stderr.endswith(b"\n"), result.stderr)
        self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)
        line = result.stderr.decode()
        self.assertIn(text, line)
        return line


# ----------------------------------------------------------------------------- pure helpers


class ParseAddressTests(SynchronousTestCase):
    """HOST:PORT parsing."""

    def test_host_and_port(self) -> None:
        """A DNS name or IPv4 address and a port are split at the last colon."""
        self.assertEqual(parse_address("example.com:443"), Address("example.com", 443))
        self.assertEqual(parse_address("127.0.0.1:8443"), Address("127.0.0.1", 8443))
        self.assertEqual(parse_address("h:65535").port, 65535)
        self.assertEqual(parse_address("h:1").port, 1)

    def test_bracketed_ipv6(self) -> None:
        """An IPv6 literal comes in brackets; the host is stored without them."""
        self.assertEqual(parse_address("[::1]:8443"), Address("::1", 8443))
        self.assertEqual(parse_address("[2001:db8::5]:1"), Address("2001:db8::5", 1))

    def test_zone_index(self) -> None:
        """A zone index is kept for connecting but not used as the name to verify."""
        address = parse_address("[fe80::1%eth0]:8443")
        self.assertEqual(address.host, "fe80::1%eth0")
        self.assertEqual(address.verify_name, "fe80::1")

    def test_display(self) -> None:
        """Addresses render as they are written on the command line."""
        self.assertEqual(str(Address("::1", 8443)), "[::1]:8443")
        self.assertEqual(str(Address("127.0.0.1", 8443)), "127.0.0.1:8443")
        self.assertEqual(str(Address("localhost", 1)), "localhost:1")

    def test_rejects(self) -> None:
        """Malformed addresses raise ValueError with a message naming the input."""
        for text in [
            "nohost",
            ":8443",
            "host:",
            "host:0",
            "host:65536",
            "host:99999999",
            "host:8x",
            "host:+1",
            "host:\u0661",
            "::1:8443",
            "[::1]8443",
            "[::1]",
            "[not-v6]:1",
            "[127.0.0.1]:1",
            "bad host:1",
        ]:
            with self.assertRaises(ValueError, msg=text) as raised:
                parse_address(text)
            self.assertIn(repr(text), str(raised.exception))


class DescribeErrorTests(SynchronousTestCase):
    """Error wording: short, lower-case, one line, no OpenSSL source references."""

    def test_verify_failure(self) -> None:
        """A verification failure names OpenSSL's verify message."""
        exc = ssl.SSLCertVerificationError(
            1,
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
            "unable to get local issuer certificate (_ssl.c:1006)",
        )
        exc.verify_message = "unable to get local issuer certificate"
        self.assertEqual(
            describe_error(exc),
            "certificate verify failed: unable to get local issuer certificate",
        )

    def test_hostname_mismatch(self) -> None:
        """Python's hostname message is softened and loses its final full stop."""
        exc = ssl.SSLCertVerificationError(1, "x")
        exc.verify_message = "Hostname mismatch, certificate is not valid for 'a.example'."
        self.assertEqual(
            describe_error(exc),
            "certificate verify failed: hostname mismatch, "
            "certificate is not valid for 'a.example'",
        )

    def test_alert(self) -> None:
        """An SSLError loses its ``[SSL: ...]`` prefix and ``(_ssl.c:N)`` suffix."""
        exc = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)")
        self.assertEqual(describe_error(exc), "tlsv1 alert unknown ca")

    def test_eof(self) -> None:
        """An EOF error without a bracketed prefix is kept readable."""
        exc = ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)")
        self.assertEqual(describe_error(exc), "EOF occurred in violation of protocol")

    def test_os_errors(self) -> None:
        """Socket errors use their strerror, with an ordinary leading capital lowered."""
        self.assertEqual(
            describe_error(ConnectionRefusedError(111, "Connection refused")),
            "connection refused",
        )
        self.assertEqual(describe_error(TimeoutError()), "timed out")
        self.assertEqual(describe_error(OSError("odd\nthing")), "odd thing")

    def test_one_line(self) -> None:
        """Control characters and line breaks never reach the error line."""
        self.assertEqual(one_line("a\nb\r\x00c\t d"), "a b c d")
        self.assertEqual(one_line("  spaced   out "), "spaced out")


class LineLedgerTests(SynchronousTestCase):
    """Accounting of pipelined lines."""

    def test_sent_and_answered(self) -> None:
        """Each LF-terminated line sent is owed one reply line; replies settle oldest first."""
        ledger = LineLedger()
        ledger.sent(b"one\ntw")
        self.assertEqual((list(ledger.unanswered), ledger.partial), ([4], 2))
        ledger.sent(b"o\nthree")
        self.assertEqual((list(ledger.unanswered), ledger.partial), ([4, 4], 5))
        self.assertEqual(ledger.in_flight, 13)
        self.assertEqual(ledger.received(b"one\nt"), 1)
        self.assertEqual(ledger.in_flight, 9)
        self.assertEqual(ledger.received(b"wo\n"), 1)
        self.assertEqual((list(ledger.unanswered), ledger.in_flight), ([], 5))

    def test_early_reply_is_credit(self) -> None:
        """A reply that arrives before its line ends settles that line when it ends."""
        ledger = LineLedger()
        ledger.sent(b"x" * 100)
        ledger.received(b"-ERR line-too-long the line is too long\n")
        self.assertEqual(ledger.early, 1)
        ledger.sent(b"xx\nnext\n")
        self.assertEqual((list(ledger.unanswered), ledger.early), ([5], 0))

    def test_budget(self) -> None:
        """Sending pauses at the bound while replies are owed, but never mid-line alone."""
        ledger = LineLedger()
        self.assertEqual(ledger.budget(100), 100)
        ledger.sent(b"a" * 59 + b"\n")
        self.assertEqual(ledger.budget(100), 40)
        ledger.sent(b"b" * 50)
        self.assertEqual(ledger.budget(100), 0)
        ledger.received(b"a" * 59 + b"\n")
        self.assertEqual(ledger.budget(100), 50)
        ledger.sent(b"b" * 500)
        self.assertEqual(ledger.budget(100), CHUNK)

    @given(
        lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30),
        tail=st.binary(max_size=10).map(lambda b: b.replace(b"\n", b"")),
        send_cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
        reply_cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
    )
    def test_any_split(
        self, lines: list[bytes], tail: bytes, send_cuts: list[int], reply_cuts: list[int]
    ) -> None:
        """However input and replies are split, an exact echo settles every complete line."""
        data = b"".join(line + b"\n" for line in lines) + tail
        ledger = LineLedger()
        for piece in _split(data, send_cuts):
            ledger.sent(piece)
        self.assertEqual(len(ledger.unanswered), len(lines))
        self.assertEqual(ledger.in_flight, len(data))
        replies = 0
        for piece in _split(data, reply_cuts):
            replies += ledger.received(piece)
        self.assertEqual(replies, len(lines))
        self.assertEqual((len(ledger.unanswered), ledger.early), (0, 0))
        self.assertEqual(ledger.in_flight, len(tail))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class ProxyHeaderTests(SynchronousTestCase):
    """The PROXY v2 header ``--proxy-v2`` sends, read back with the daemon's parser."""

    def parse(self, header: bytes) -> ProxyHeader:
        """Parse ``header``, which must be exactly one complete v2 header."""
        parsed = parse_header(header)
        assert parsed is not None
        self.assertEqual((parsed.version, parsed.command), (2, "PROXY"))
        self.assertEqual(parsed.consumed, len(header))
        return parsed

    def test_own_address_is_the_source(self) -> None:
        """Without a claimed source the header says client socket -> server socket."""
        parsed = self.parse(proxy_v2_header(("127.0.0.1", 50000), ("127.0.0.1", 8443)))
        self.assertEqual(parsed.family, "TCP4")
        self.assertEqual(parsed.source, ("127.0.0.1", 50000))
        self.assertEqual(parsed.destination, ("127.0.0.1", 8443))

    def test_claimed_source(self) -> None:
        """--proxy-source replaces the source; the destination stays the server's."""
        claimed = Address("192.0.2.7", 4242)
        parsed = self.parse(proxy_v2_header(("127.0.0.1", 50000), ("127.0.0.1", 8443), claimed))
        self.assertEqual(parsed.source, ("192.0.2.7", 4242))
        self.assertEqual(parsed.destination, ("127.0.0.1", 8443))

    def test_ipv6(self) -> None:
        """An IPv6 connection gives a TCP6 header."""
        parsed = self.parse(proxy_v2_header(("::1", 50000), ("::1", 8443)))
        self.assertEqual(parsed.family, "TCP6")
        self.assertEqual((parsed.source, parsed.destination), (("::1", 50000), ("::1", 8443)))
        claimed = Address("2001:db8::7", 1)
        parsed = self.parse(proxy_v2_header(("::1", 50000), ("::1", 8443), claimed))
        self.assertEqual(parsed.source, ("2001:db8::7", 1))

    def test_ipv4_mapped(self) -> None:
        """IPv4-mapped IPv6 addresses are sent as IPv4, so an IPv4 source fits them."""
        local, peer = ("::ffff:127.0.0.1", 50000), ("::ffff:127.0.0.1", 8443)
        parsed = self.parse(proxy_v2_header(local, peer))
        self.assertEqual(parsed.family, "TCP4")
        self.assertEqual(parsed.source, ("127.0.0.1", 50000))
        parsed = self.parse(proxy_v2_header(local, peer, Address("192.0.2.7", 4242)))
        self.assertEqual(parsed.source, ("192.0.2.7", 4242))

    def test_other_ip_version_refused(self) -> None:
        """A claimed source of the other IP version is a usage error naming both."""
        with self.assertRaises(UsageError) as raised:
            proxy_v2_header(("127.0.0.1", 1), ("127.0.0.1", 8443), Address("2001:db8::7", 1))
        self.assertEqual(
            str(raised.exception),
            "--proxy-source [2001:db8::7]:1 is IPv6 but the connection to 127.0.0.1:8443 "
            "is IPv4; claim an IPv4 source",
        )
        with self.assertRaises(UsageError):
            proxy_v2_header(("::1", 1), ("::1", 8443), Address("192.0.2.7", 1))


class InfoReplyTests(SynchronousTestCase):
    """How ``info`` judges the server's answer to the info line."""

    where = Address("127.0.0.1", 8443)

    def test_json_object(self) -> None:
        """A JSON object line (LF or CRLF) is returned as a dict."""
        reply = b'{"conn_id": 7, "tls_version": "TLSv1.3"}'
        expected = {"conn_id": 7, "tls_version": "TLSv1.3"}
        self.assertEqual(parse_info_reply(b"INFO", reply + b"\n", self.where), expected)
        self.assertEqual(parse_info_reply(b"INFO", reply + b"\r\n", self.where), expected)

    def test_echoed(self) -> None:
        """The line echoed back means the server has no (or another) --info-line."""
        with self.assertRaises(WrongReplyError) as raised:
            parse_info_reply(b"secure-echo:info", b"secure-echo:info\n", self.where)
        self.assertEqual(
            str(raised.exception),
            "the server echoed the info line; start it with --info-line secure-echo:info",
        )
        self.assertEqual(raised.exception.exit_status, EXIT_WRONG_REPLY)
        with self.assertRaises(WrongReplyError) as raised:
            parse_info_reply(b"two words", b"two words\r\n", self.where)
        self.assertIn("start it with --info-line 'two words'", str(raised.exception))

    def test_not_a_json_object(self) -> None:
        """Anything else, a JSON array or number included, is a wrong reply."""
        for reply in [b"-ERR busy\n", b"[1, 2]\n", b"17\n", b"\xff{}\n", b"\n"]:
            with self.assertRaises(WrongReplyError, msg=reply) as raised:
                parse_info_reply(b"INFO", reply, self.where)
            self.assertIn("info from 127.0.0.1:8443 failed: the reply", str(raised.exception))
            self.assertIn("is not a JSON object", str(raised.exception))


class ArgumentTests(SynchronousTestCase):
    """Parsing of --proxy-v2, --proxy-source and the info subcommand's options."""

    def test_proxy_options_in_every_mode(self) -> None:
        """--proxy-v2 and --proxy-source are accepted by echo, check and info."""
        for prefix in [[], ["check"], ["info"]]:
            mode, options = parse_arguments(
                [*prefix, "h:1", "--ca", "ca.pem", "--proxy-v2", "--proxy-source", "192.0.2.7:42"]
            )
            self.assertEqual(mode, prefix[0] if prefix else "echo")
            self.assertIs(options.proxy_v2, True)
            self.assertEqual(options.proxy_source, Address("192.0.2.7", 42))

    def test_ca_is_optional(self) -> None:
        """Without --ca or --insecure the client verifies against the system trust store."""
        for prefix in [[], ["check"], ["info"]]:
            _, options = parse_arguments([*prefix, "h:1"])
            self.assertEqual((options.ca, options.insecure), (None, False))
        _, options = parse_arguments(["h:1", "--insecure"])
        self.assertIs(options.insecure, True)

    def test_alpn_and_verbose(self) -> None:
        """--alpn is repeatable and keeps its order; -v and --verbose work in every mode."""
        for prefix in [[], ["check"], ["info"]]:
            _, options = parse_arguments([*prefix, "h:1", "--alpn", "h2", "--alpn", "x-echo"])
            self.assertEqual(options.alpn, ["h2", "x-echo"])
            self.assertIs(options.verbose, False)
            for flag in ("-v", "--verbose"):
                self.assertIs(parse_arguments([*prefix, "h:1", flag])[1].verbose, True)
        self.assertEqual(parse_arguments(["h:1"])[1].alpn, [])

    def test_proxy_defaults(self) -> None:
        """Without the options no header is sent and no source is claimed."""
        _, options = parse_arguments(["h:1", "--ca", "ca.pem"])
        self.assertEqual((options.proxy_v2, options.proxy_source), (False, None))

    def test_proxy_source_forms(self) -> None:
        """--proxy-source takes IPv4 or bracketed IPv6 literals with a port."""
        self.assertEqual(parse_proxy_source("192.0.2.7:4242"), Address("192.0.2.7", 4242))
        self.assertEqual(parse_proxy_source("[2001:db8::7]:1"), Address("2001:db8::7", 1))
        for text in ["example.com:1", "192.0.2.7", "192.0.2.7:0", "2001:db8::7:1", "[x]:1"]:
            with self.assertRaises(ValueError, msg=text):
                parse_proxy_source(text)

    def test_info_defaults(self) -> None:
        """The info subcommand sends INFO by default and pretty-prints."""
        mode, options = parse_arguments(["info", "h:1", "--ca", "ca.pem"])
        self.assertEqual(mode, "info")
        self.assertEqual(DEFAULT_INFO_LINE, "INFO")
        self.assertEqual((options.info_line, options.raw), (b"INFO", False))
        self.assertEqual(options.address, Address("h", 1))

    def test_info_options(self) -> None:
        """--info-line is kept as bytes (non-UTF-8 argv bytes too); --raw is a flag."""
        _, options = parse_arguments(
            ["info", "h:1", "--ca", "ca.pem", "--info-line", "secure-echo:info", "--raw"]
        )
        self.assertEqual((options.info_line, options.raw), (b"secure-echo:info", True))
        _, options = parse_arguments(["info", "h:1", "--ca", "x", "--info-line", "\udcffok"])
        self.assertEqual(options.info_line, b"\xffok")


# ----------------------------------------------------------------------------- usage


def _restore_env(name: str, value: str | None) -> None:
    """Put environment variable ``name`` back to ``value`` (``None``: unset)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


class UsageTests(ClientTestCase):
    """Bad command lines and unusable files: one line on stderr, exit status 64."""

    def run_main(self, *args: str) -> tuple[int, str, str]:
        """Run ``main(args)`` in this process; return status, stdout and stderr."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        status = main(list(args))
        return status, out.getvalue(), err.getvalue()

    def assert_usage(self, args: list[str], text: str) -> None:
        """Assert that ``args`` exits 64 with one stderr line containing ``text``."""
        status, out, err = self.run_main(*args)
        self.assertEqual((status, out), (EXIT_USAGE, ""), f"{args}: {err}")
        self.assertTrue(err.startswith("secure-echo-client: "), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(text, err)

    def test_bad_arguments(self) -> None:
        """Missing, malformed and unknown arguments exit 64 with one line each."""
        ca = str(self.certs.ca)
        cases: list[tuple[list[str], str]] = [
            ([], "HOST:PORT"),
            (["check"], "HOST:PORT"),
            (["nohost", "--ca", ca], "is not HOST:PORT"),
            (["::1:8443", "--ca", ca], "in brackets"),
            (["h:1", "--ca", ca, "--timeout", "0"], "more than 0"),
            (["h:1", "--ca", ca, "--timeout", "nan"], "more than 0"),
            (["h:1", "--ca", ca, "--timeout", "soon"], "number of seconds"),
            (["h:1", "--ca", ca, "--bogus"], "--bogus"),
            (["h:1", "--ca", ca, "--servername", ""], "is not a server name"),
            (["h:1", "--ca", ca, "--servername", "a b"], "is not a server name"),
            (["check", "h:1", "--ca", ca, "extra"], "extra"),
            (["h:1", "--ca", ca, "--cert", str(self.certs.client_cert)], "--cert and --key"),
            (["h:1", "--ca", ca, "--key", str(self.certs.client_key)], "--cert and --key"),
            (["h:1", "--ca", ca, "--insecure"], "--insecure and --ca"),
            (["h:1", "--alpn", ""], "1 to 255"),
            (["h:1", "--alpn", "x" * 256], "1 to 255"),
            (["h:1", "--alpn", "\u00e9chec"], "printable ASCII"),
            (["h:1", "--alpn", "a b"], "printable ASCII"),
            (["h:1", "--alpn"], "expected one argument"),
        ]
        for args, text in cases:
            self.assert_usage(args, text)

    def test_bad_proxy_and_info_arguments(self) -> None:
        """Bad --proxy-*, --info-line and --raw usage exits 64 with one line each."""
        ca = str(self.certs.ca)
        cases: list[tuple[list[str], str]] = [
            (
                ["h:1", "--ca", ca, "--proxy-source", "192.0.2.7:1"],
                "--proxy-source needs --proxy-v2",
            ),
            (["h:1", "--ca", ca, "--proxy-v2", "--proxy-source", "example.com:1"], "IP address"),
            (["h:1", "--ca", ca, "--proxy-v2", "--proxy-source", "192.0.2.7"], "HOST:PORT"),
            (["h:1", "--ca", ca, "--proxy-v2", "--proxy-source", "192.0.2.7:0"], "the port"),
            (["h:1", "--ca", ca, "--proxy-v2", "--proxy-source"], "expected one argument"),
            (["check", "h:1", "--ca", ca, "--proxy-v2=yes"], "--proxy-v2"),
            (["info"], "HOST:PORT"),
            (["info", "h:1", "--ca", ca, "--info-line", ""], "must not be empty"),
            (["info", "h:1", "--ca", ca, "--info-line", "a\nb"], "line break"),
            (["info", "h:1", "--ca", ca, "--info-line", "a\r"], "line break"),
            (["check", "h:1", "--ca", ca, "--raw"], "--raw"),
            (["h:1", "--ca", ca, "--info-line", "INFO"], "--info-line"),
        ]
        for args, text in cases:
            self.assert_usage(args, text)

    def test_unreadable_ca(self) -> None:
        """A missing --ca file is named with the option and the reason."""
        missing = self.certs.directory / "missing.pem"
        self.assert_usage(
            ["h:1", "--ca", str(missing)],
            f"--ca: cannot read {missing}: no such file or directory",
        )

    def test_ca_without_certificates(self) -> None:
        """A --ca file with no certificate in it is refused before connecting."""
        garbage = self.certs.directory / "garbage.pem"
        garbage.write_bytes(b"not a certificate\n")
        self.assert_usage(["h:1", "--ca", str(garbage)], "--ca: ")
        self.assert_usage(["h:1", "--ca", str(self.certs.client_key)], "no usable CA")

    def test_unreadable_key(self) -> None:
        """A missing --key file is named with the option."""
        missing = self.certs.directory / "nope.key"
        args = ["h:1", "--ca", str(self.certs.ca), "--cert", str(self.certs.client_cert)]
        self.assert_usage([*args, "--key", str(missing)], "--key: cannot read")
        self.assert_usage(
            ["h:1", "--ca", str(self.certs.ca), "--cert", str(missing), "--key", "x"],
            "--cert: cannot read",
        )

    def test_mismatched_key(self) -> None:
        """A key that does not belong to the certificate is refused naming both options."""
        args = ["h:1", "--ca", str(self.certs.ca), "--cert", str(self.certs.client_cert)]
        self.assert_usage([*args, "--key", str(self.certs.server_key)], "--cert/--key: cannot use")

    def test_encrypted_key(self) -> None:
        """An encrypted key is refused without prompting for a passphrase."""
        issued = certgen.issue_client(certgen.make_ca("x"), "enc")
        key = self.certs.directory / "encrypted.key"
        cert = self.certs.directory / "encrypted.pem"
        key.write_bytes(
            issued.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        cert.write_bytes(issued.cert_pem())
        self.assert_usage(
            ["h:1", "--ca", str(self.certs.ca), "--cert", str(cert), "--key", str(key)],
            "is encrypted",
        )

    def test_build_context_policy(self) -> None:
        """The context verifies the server, checks its name, and starts at TLS 1.2."""
        context = build_context(str(self.certs.ca))
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(context.check_hostname)
        self.assertEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)
        self.assertEqual(len(context.get_ca_certs()), 1)
        strict = build_context(str(self.certs.ca), tls13_only=True)
        self.assertEqual(strict.minimum_version, ssl.TLSVersion.TLSv1_3)
        with self.assertRaises(UsageError):
            build_context(str(self.certs.directory))

    def test_build_context_system_store(self) -> None:
        """Without a CA file the context loads OpenSSL's default paths ($SSL_CERT_FILE)."""
        empty = self.certs.directory / "no-certs"
        empty.mkdir()
        for name, value in (
            ("SSL_CERT_FILE", str(self.certs.other_ca)),
            ("SSL_CERT_DIR", str(empty)),
        ):
            self.addCleanup(_restore_env, name, os.environ.get(name))
            os.environ[name] = value  # os.environ also sets the C environment OpenSSL reads
        context = build_context(None)
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(context.check_hostname)
        loaded = [ssl.DER_cert_to_PEM_cert(der) for der in context.get_ca_certs(binary_form=True)]
        self.assertEqual(loaded, [self.certs.other_ca.read_text()])

    def test_build_context_insecure(self) -> None:
        """--insecure turns verification and the name check off, and nothing else."""
        context = build_context(None, insecure=True)
        self.assertEqual(context.verify_mode, ssl.CERT_NONE)
        self.assertFalse(context.check_hostname)
        self.assertEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)

    def test_version(self) -> None:
        """--version prints secure-echo's version and the TLS library, in every mode."""
        for prefix in [[], ["check"], ["info"]]:
            status, out, err = self.run_main(*prefix, "--version")
            self.assertEqual((status, err), (EXIT_OK, ""))
            self.assertEqual(
                out,
                f"secure-echo-client {secure_echo.__version__} "
                f"(Python {platform.python_version()}, {ssl.OPENSSL_VERSION})\n",
            )

    def test_help(self) -> None:
        """--help prints usage mentioning the check subcommand and exits 0."""
        status, out, err = self.run_main("--help")
        self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertIn("check", out)
        self.assertIn("exit status", out)
        status, out, _ = self.run_main("check", "--help")
        self.assertEqual(status, EXIT_OK)
        self.assertIn("secure-echo-client check", out)
        self.assertIn("--proxy-v2", out)

    def test_help_info(self) -> None:
        """``info --help`` names the subcommand, --info-line with its default, --raw."""
        status, out, err = self.run_main("info", "--help")
        self.assertEqual((status, err), (EXIT_OK, ""))
        self.assertIn("secure-echo-client info", out)
        self.assertIn("--info-line TEXT", out)
        self.assertIn("default INFO", out)
        self.assertIn("--raw", out)
        self.assertIn("--proxy-source IP:PORT", out)
        status, out, _ = self.run_main("--help")
        self.assertEqual(status, EXIT_OK)
        self.assertIn("[check|info]", out)

    def test_subprocess_usage(self) -> None:
        """The installed-style entry point also exits 64 with one line, no traceback."""
        result = run_client("localhost:99999", "--ca", str(self.certs.ca))
        self.assert_one_line_error(result, EXIT_USAGE, "the port must be a number")


# ----------------------------------------------------------------------------- echo


class EchoTests(ClientTestCase):
    """Echo mode against the TLS echo peer."""

    def echo(self, peer: Peer, data: bytes, *extra: str) -> subprocess.CompletedProcess[bytes]:
        """Send ``data`` through the client to ``peer``."""
        return run_client(f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), *extra, data=data)

    def assert_echoed(self, result: subprocess.CompletedProcess[bytes], data: bytes) -> None:
        """Assert success, no stderr, and output identical to ``data``."""
        self.assertEqual((result.returncode, result.stderr), (EXIT_OK, b""))
        self.assertEqual(len(result.stdout), len(data))
        self.assertTrue(result.stdout == data, "echo differs from input")

    def test_byte_exact(self) -> None:
        """Lines with NUL, invalid UTF-8, CRLF, no content, or no final LF echo exactly."""
        data = (
            b"hello\n"
            b"nul\x00inside\x00\n"
            b"\xff\xfe\xc3\x28 not utf-8\n"
            b"crlf kept\r\n"
            b"\n"
            b"\r\n"
            b"   spaces   \n"
            b"last line without LF"
        )
        self.assert_echoed(self.echo(self.peer(), data), data)

    def test_empty_input(self) -> None:
        """No input: connect, close cleanly, print nothing, exit 0."""
        self.assert_echoed(self.echo(self.peer(), b""), b"")

    def test_only_unterminated_line(self) -> None:
        """A single line without LF is sent as it is and its echo arrives at close."""
        self.assert_echoed(self.echo(self.peer(), b"no newline"), b"no newline")

    def test_large_input_with_backpressure(self) -> None:
        """5 MB in 50,000 lines pass a peer that applies backpressure, without deadlock.

        The peer stops reading whenever 16 KiB of its replies back up; nothing may be
        lost or reordered.
        """
        data = b"".join(b"%06d " % i + bytes([65 + i % 26]) * 94 + b"\n" for i in range(50_000))
        self.assertGreaterEqual(len(data), 5_000_000)
        peer = self.peer("--out-limit", "16384")
        self.assert_echoed(self.echo(peer, data), data)

    def test_lines_longer_than_the_window(self) -> None:
        """Lines longer than the in-flight bound are sent whole and echoed, LF or not."""
        data = b"a" * (2 * MAX_IN_FLIGHT) + b"\n" + b"short\n" + b"z" * (3 * MAX_IN_FLIGHT)
        self.assert_echoed(self.echo(self.peer("--out-limit", "16384"), data), data)

    def test_random_bytes(self) -> None:
        """Arbitrary binary input (LFs where they fall) round-trips exactly."""
        data = os.urandom(1_000_000)
        self.assert_echoed(self.echo(self.peer(), data), data)

    def test_stdin_regular_file(self) -> None:
        """Standard input may be a regular file, which epoll cannot watch."""
        data = b"from a file\n" * 1000 + b"end"
        path = self.certs.directory / "input.txt"
        path.write_bytes(data)
        peer = self.peer()
        with path.open("rb") as handle:
            result = run_client(f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), stdin=handle)
        self.assert_echoed(result, data)

    def test_servername(self) -> None:
        """--servername is the name verified when connecting to an IP address."""
        data = b"via name\n"
        self.assert_echoed(self.echo(self.peer(), data, "--servername", "localhost"), data)

    def test_localhost_name(self) -> None:
        """A DNS name resolves, tries each address, and is verified against DNS SANs."""
        peer = self.peer()
        data = b"by name\n"
        result = run_client(f"localhost:{peer.port}", "--ca", str(self.certs.ca), data=data)
        self.assert_echoed(result, data)

    def test_ipv6(self) -> None:
        """A bracketed IPv6 literal connects and is verified against the IP SAN ::1."""
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError as exc:
            raise SkipTest(f"no IPv6 loopback: {exc}") from None
        peer = self.peer("--host", "::1")
        data = b"over IPv6\n"
        result = run_client(f"[::1]:{peer.port}", "--ca", str(self.certs.ca), data=data)
        self.assert_echoed(result, data)

    def test_client_certificate(self) -> None:
        """With --cert/--key the client certificate is presented and accepted."""
        peer = self.peer("--client-ca", str(self.certs.ca))
        data = b"mutual\n"
        result = self.echo(
            peer,
            data,
            "--cert",
            str(self.certs.client_cert),
            "--key",
            str(self.certs.client_key),
        )
        self.assert_echoed(result, data)
        self.assertEqual(peer.next_line(), "client-cert client-one")

    def test_tls12(self) -> None:
        """TLS 1.2 servers are accepted by default."""
        data = b"old but fine\n"
        self.assert_echoed(self.echo(self.peer("--tls12-only"), data), data)

    def test_interactive(self) -> None:
        """Each line is echoed as soon as it is sent; waiting for input never times out."""
        peer = self.peer()
        process = spawn_client(
            self, f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), "--timeout", "0.3"
        )
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdin.write(b"first\n")
        process.stdin.flush()
        self.assertEqual(read_exactly(process.stdout, 6), b"first\n")
        time.sleep(1.0)  # idle for longer than --timeout, with nothing owed
        process.stdin.write(b"second\n")
        process.stdin.flush()
        self.assertEqual(read_exactly(process.stdout, 7), b"second\n")
        process.stdin.close()
        self.assertEqual(process.wait(timeout=RUN_TIMEOUT), EXIT_OK)
        self.assertEqual(process.stdout.read(), b"")
        self.assertEqual(process.stderr.read(), b"")


# ----------------------------------------------------------------------------- failures


class FailureTests(ClientTestCase):
    """TLS and connection failures: one line on stderr, exit status 2."""

    def test_wrong_ca(self) -> None:
        """A server certificate from another CA fails verification."""
        peer = self.peer()
        result = run_client(
            f"127.0.0.1:{peer.port}", "--ca", str(self.certs.other_ca), data=b"x\n"
        )
        self.assertEqual(
            result.stderr.decode(),
            f"secure-echo-client: TLS handshake with 127.0.0.1:{peer.port} failed: "
            "certificate verify failed: unable to get local issuer certificate\n",
        )
        self.assert_one_line_error(result, EXIT_CONNECTION, "certificate verify failed")
        self.assertEqual(peer.next_line(), "handshake-failed TLSV1_ALERT_UNKNOWN_CA")

    def test_hostname_mismatch(self) -> None:
        """A --servername the certificate does not carry fails verification."""
        peer = self.peer()
        result = run_client(
            f"127.0.0.1:{peer.port}",
            "--ca",
            str(self.certs.ca),
            "--servername",
            "wrong.example",
        )
        self.assert_one_line_error(result, EXIT_CONNECTION, "hostname mismatch")

    def test_ip_mismatch(self) -> None:
        """An IP literal is verified against IP SANs, not accepted on a DNS name."""
        ca = certgen.make_ca("names-only CA")
        ca_path = self.certs.directory / "names-ca.pem"
        certgen.write_pair(ca, ca_path, self.certs.directory / "names-ca.key")
        certgen.write_pair(
            certgen.issue_server(ca, ["localhost"]),
            self.certs.server_cert,
            self.certs.server_key,
        )
        peer = self.peer()
        result = run_client(f"127.0.0.1:{peer.port}", "--ca", str(ca_path))
        self.assert_one_line_error(result, EXIT_CONNECTION, "IP address mismatch")

    def test_connection_refused(self) -> None:
        """Nothing listening: one line saying so, exit 2."""
        with socket.socket() as bound:  # bound, not listening: connections are refused
            bound.bind(("127.0.0.1", 0))
            port = bound.getsockname()[1]
            result = run_client(f"127.0.0.1:{port}", "--ca", str(self.certs.ca))
        line = self.assert_one_line_error(result, EXIT_CONNECTION, "connection refused")
        self.assertEqual(
            line, f"secure-echo-client: cannot connect to 127.0.0.1:{port}: connection refused\n"
        )

    def test_handshake_timeout(self) -> None:
        """A server that accepts TCP but never speaks TLS fails after --timeout."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        started = time.monotonic()
        result = run_client(f"127.0.0.1:{port}", "--ca", str(self.certs.ca), "--timeout", "0.5")
        self.assertLess(time.monotonic() - started, 10)
        self.assert_one_line_error(
            result,
            EXIT_CONNECTION,
            f"TLS handshake with 127.0.0.1:{port} failed: timed out after 0.5 s",
        )

    def test_not_tls(self) -> None:
        """A plaintext server is a handshake failure, not a hang."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        process = spawn_client(
            self, f"127.0.0.1:{port}", "--ca", str(self.certs.ca), "--timeout", "5"
        )
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            out, err = process.communicate(timeout=RUN_TIMEOUT)
        result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        self.assert_one_line_error(result, EXIT_CONNECTION, f"TLS handshake with 127.0.0.1:{port}")

    def test_reply_timeout(self) -> None:
        """A server that never answers fails after --timeout seconds without data."""
        peer = self.peer("--silent")
        result = run_client(
            f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), "--timeout", "1", data=b"hi\n"
        )
        self.assert_one_line_error(
            result,
            EXIT_CONNECTION,
            f"no reply from 127.0.0.1:{peer.port} within 1 s (1 line(s) unanswered)",
        )

    def test_client_certificate_required(self) -> None:
        """Without --cert/--key a server that requires a client certificate refuses us."""
        peer = self.peer("--client-ca", str(self.certs.ca))
        result = run_client(f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), data=b"x\n")
        self.assert_one_line_error(
            result, EXIT_CONNECTION, f"TLS handshake with 127.0.0.1:{peer.port} failed"
        )
        self.assertTrue(peer.next_line().startswith("handshake-failed"))

    def test_client_certificate_from_other_ca(self) -> None:
        """A client certificate the server does not trust is refused."""
        other = certgen.make_ca("untrusted client CA")
        cert = self.certs.directory / "stranger.pem"
        key = self.certs.directory / "stranger.key"
        certgen.write_pair(certgen.issue_client(other, "stranger"), cert, key)
        peer = self.peer("--client-ca", str(self.certs.ca))
        result = run_client(
            f"127.0.0.1:{peer.port}",
            "--ca",
            str(self.certs.ca),
            "--cert",
            str(cert),
            "--key",
            str(key),
            data=b"x\n",
        )
        self.assert_one_line_error(result, EXIT_CONNECTION, "failed")

    def test_tls13_only(self) -> None:
        """--tls13-only refuses a TLS 1.2 server."""
        peer = self.peer("--tls12-only")
        result = run_client(
            f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), "--tls13-only", data=b"x\n"
        )
        self.assert_one_line_error(
            result, EXIT_CONNECTION, f"TLS handshake with 127.0.0.1:{peer.port} failed"
        )

    def test_unresolvable(self) -> None:
        """A name that does not resolve is a connection failure, not a usage error."""
        result = run_client("no-such-host.invalid:8443", "--ca", str(self.certs.ca))
        self.assert_one_line_error(result, EXIT_CONNECTION, "cannot resolve no-such-host.invalid")


# ----------------------------------------------------------------------------- check


class CheckTests(ClientTestCase):
    """The ``check`` subcommand."""

    def check(self, peer: Peer, *extra: str) -> subprocess.CompletedProcess[bytes]:
        """Run ``secure-echo-client check`` against ``peer``."""
        return run_client("check", f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), *extra)

    def test_ok(self) -> None:
        """A good echo prints ``OK <ms> ms <version> <cipher>`` and exits 0."""
        result = self.check(self.peer())
        self.assertEqual((result.returncode, result.stderr), (EXIT_OK, b""))
        self.assertRegex(result.stdout.decode(), r"\AOK \d+\.\d ms TLSv1\.3 TLS_[A-Z0-9_]+\n\Z")

    def test_ok_tls12(self) -> None:
        """The reported version and cipher are the negotiated ones."""
        result = self.check(self.peer("--tls12-only"))
        self.assertEqual((result.returncode, result.stderr), (EXIT_OK, b""))
        self.assertRegex(result.stdout.decode(), r"\AOK \d+\.\d ms TLSv1\.2 ECDHE-ECDSA-\S+\n\Z")

    def test_client_certificate(self) -> None:
        """The check presents --cert/--key like echo mode."""
        peer = self.peer("--client-ca", str(self.certs.ca))
        result = self.check(
            peer, "--cert", str(self.certs.client_cert), "--key", str(self.certs.client_key)
        )
        self.assertEqual((result.returncode, result.stderr), (EXIT_OK, b""))
        self.assertTrue(result.stdout.startswith(b"OK "))

    def test_wrong_reply(self) -> None:
        """A reply that differs from the nonce line exits 1 with one line on stderr."""
        result = self.check(self.peer("--prefix", "X"))
        self.assert_one_line_error(result, EXIT_WRONG_REPLY, "wrong reply b'Xsecure-echo-check ")

    def test_no_reply(self) -> None:
        """No reply within --timeout is a connection failure."""
        result = self.check(self.peer("--silent"), "--timeout", "1")
        self.assert_one_line_error(result, EXIT_CONNECTION, "no reply from")

    def test_refused(self) -> None:
        """Nothing listening: exit 2."""
        with socket.socket() as bound:
            bound.bind(("127.0.0.1", 0))
            port = bound.getsockname()[1]
            result = run_client("check", f"127.0.0.1:{port}", "--ca", str(self.certs.ca))
        self.assert_one_line_error(result, EXIT_CONNECTION, "connection refused")

    def test_wrong_ca(self) -> None:
        """An untrusted server exits 2 with the verification failure."""
        peer = self.peer()
        result = run_client("check", f"127.0.0.1:{peer.port}", "--ca", str(self.certs.other_ca))
        self.assert_one_line_error(result, EXIT_CONNECTION, "certificate verify failed")

    def test_peer_sees_clean_close(self) -> None:
        """The check ends with close_notify: the server sees a clean close, not an error."""
        peer = self.peer()
        result = self.check(peer)
        self.assertEqual(result.returncode, EXIT_OK)
        self.assertEqual(peer.next_line(), "client-cert -")
        self.assertEqual(peer.next_line(), "closed")


# ----------------------------------------------------------------------------- --proxy-v2


class ProxyWireTests(ClientTestCase):
    """What --proxy-v2 puts on the wire, read by a plain TCP listener in the test."""

    def header_of(
        self, *extra: str
    ) -> tuple[ProxyHeader, tuple[str, int], tuple[str, int], bytes]:
        """Run ``check --proxy-v2 EXTRA`` against a plain listener and read its header.

        Returns the parsed header, the client's address as the listener sees it, the
        listener's address, and the first bytes after the header.  The listener then
        closes the connection and the client must exit 2.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        process = spawn_client(
            self,
            "check",
            f"127.0.0.1:{port}",
            "--ca",
            str(self.certs.ca),
            "--timeout",
            "5",
            "--proxy-v2",
            *extra,
        )
        listener.settimeout(10)
        conn, client = listener.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while (header := parse_header(data)) is None or len(data) == header.consumed:
                chunk = conn.recv(4096)
                self.assertTrue(chunk, f"the client closed after {data!r}")
                data += chunk
        self.assertEqual(process.wait(timeout=RUN_TIMEOUT), EXIT_CONNECTION)
        return header, client[:2], ("127.0.0.1", port), data[header.consumed :]

    def test_header_names_the_client_socket(self) -> None:
        """The header comes first, client socket -> server socket; TLS follows it."""
        header, client, server, rest = self.header_of()
        self.assertEqual((header.version, header.command, header.family), (2, "PROXY", "TCP4"))
        self.assertEqual(header.source, client)
        self.assertEqual(header.destination, server)
        self.assertEqual(rest[:1], b"\x16", "a TLS handshake record follows the header")

    def test_claimed_source(self) -> None:
        """--proxy-source is the header's source; the destination stays the server."""
        header, _, server, rest = self.header_of("--proxy-source", "192.0.2.7:4242")
        self.assertEqual(header.source, ("192.0.2.7", 4242))
        self.assertEqual(header.destination, server)
        self.assertEqual(rest[:1], b"\x16")

    def test_other_ip_version_is_usage_error(self) -> None:
        """An IPv6 --proxy-source for an IPv4 connection exits 64 before TLS starts."""
        peer = self.peer()
        result = run_client(
            "check",
            f"127.0.0.1:{peer.port}",
            "--ca",
            str(self.certs.ca),
            "--proxy-v2",
            "--proxy-source",
            "[2001:db8::7]:1",
        )
        self.assert_one_line_error(
            result, EXIT_USAGE, "--proxy-source [2001:db8::7]:1 is IPv6 but the connection"
        )

    def test_server_without_proxy_support(self) -> None:
        """A TLS server that does not expect the header fails the handshake: exit 2."""
        peer = self.peer()
        result = run_client(
            "check", f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), "--proxy-v2"
        )
        self.assert_one_line_error(
            result, EXIT_CONNECTION, f"TLS handshake with 127.0.0.1:{peer.port} failed"
        )


# ----------------------------------------------------------------------------- info


class InfoEchoPeerTests(ClientTestCase):
    """``info`` against a server that does not answer the info line (the echo peer).

    The JSON answer of the real daemon is tested in ``tests/test_client_daemon.py``.
    """

    def test_echoed(self) -> None:
        """An echoed info line exits 1 with one line telling how to start the server."""
        result = run_client("info", f"127.0.0.1:{self.peer().port}", "--ca", str(self.certs.ca))
        self.assert_one_line_error(result, EXIT_WRONG_REPLY, "")
        self.assertEqual(
            result.stderr,
            b"secure-echo-client: the server echoed the info line; "
            b"start it with --info-line INFO\n",
        )

    def test_not_json(self) -> None:
        """A reply that is neither the echo nor a JSON object exits 1."""
        peer = self.peer("--prefix", "X")
        result = run_client("info", f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca))
        self.assert_one_line_error(
            result, EXIT_WRONG_REPLY, "the reply b'XINFO' is not a JSON object"
        )

    def test_no_reply(self) -> None:
        """No reply within --timeout is a connection failure."""
        peer = self.peer("--silent")
        result = run_client(
            "info", f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), "--timeout", "1"
        )
        self.assert_one_line_error(result, EXIT_CONNECTION, "no reply from")

    def test_overlong_reply(self) -> None:
        """A reply longer than any info answer is refused without buffering it all."""
        result = run_client(
            "info",
            f"127.0.0.1:{self.peer().port}",
            "--ca",
            str(self.certs.ca),
            "--info-line",
            "x" * (MAX_INFO_REPLY + 1),
        )
        self.assert_one_line_error(
            result, EXIT_WRONG_REPLY, f"the reply is longer than {MAX_INFO_REPLY} bytes"
        )


# ----------------------------------------------------------------------------- trust and -v


def env_with_store(store: Path, directory: Path) -> dict[str, str]:
    """The client's environment with OpenSSL's default trust store replaced by ``store``."""
    empty = directory / "empty-cert-dir"
    empty.mkdir(exist_ok=True)
    return {**client_env(), "SSL_CERT_FILE": str(store), "SSL_CERT_DIR": str(empty)}


class TrustTests(ClientTestCase):
    """What the server's certificate is checked against: --ca, the system store, nothing."""

    def run_with_store(self, store: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run the client with ``store`` as the system trust store."""
        return subprocess.run(
            client_command(*args),
            input=b"",
            capture_output=True,
            timeout=RUN_TIMEOUT,
            env=env_with_store(store, self.certs.directory),
            check=False,
        )

    def test_system_store_trusts(self) -> None:
        """Without --ca a server whose CA is in the system trust store is accepted."""
        peer = self.peer()
        result = self.run_with_store(self.certs.ca, "check", f"127.0.0.1:{peer.port}")
        self.assertEqual((result.returncode, result.stderr), (EXIT_OK, b""))
        self.assertTrue(result.stdout.startswith(b"OK "), result.stdout)

    def test_system_store_refuses(self) -> None:
        """Without --ca a server from a private CA is refused, with a hint to give --ca."""
        peer = self.peer()
        result = self.run_with_store(self.certs.other_ca, "check", f"127.0.0.1:{peer.port}")
        line = self.assert_one_line_error(
            result, EXIT_CONNECTION, "unable to get local issuer certificate"
        )
        self.assertIn(
            "(checked against the system trust store; give --ca CA.pem to trust a private CA)",
            line,
        )

    def test_ca_gets_no_hint(self) -> None:
        """With --ca the failure names no trust store: the user chose the CA."""
        peer = self.peer()
        result = run_client("check", f"127.0.0.1:{peer.port}", "--ca", str(self.certs.other_ca))
        line = self.assert_one_line_error(result, EXIT_CONNECTION, "certificate verify failed")
        self.assertNotIn("trust store", line)

    def test_insecure(self) -> None:
        """--insecure connects to an unverifiable server and warns in one stderr line."""
        peer = self.peer()
        result = self.run_with_store(
            self.certs.other_ca, "check", f"127.0.0.1:{peer.port}", "--insecure"
        )
        self.assertEqual(result.returncode, EXIT_OK, result.stderr)
        self.assertTrue(result.stdout.startswith(b"OK "), result.stdout)
        self.assertEqual(
            result.stderr,
            b"secure-echo-client: warning: --insecure: the server's certificate is not "
            b"verified, so anyone on the path can pose as the server\n",
        )

    def test_insecure_echo(self) -> None:
        """--insecure echo mode still echoes byte exact; the warning goes to stderr."""
        peer = self.peer()
        result = run_client(
            f"127.0.0.1:{peer.port}", "--insecure", "--servername", "x.invalid", data=b"a\nb"
        )
        self.assertEqual((result.returncode, result.stdout), (EXIT_OK, b"a\nb"))
        self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)


class VerboseTests(ClientTestCase):
    """-v: the connection report on standard error; standard output unchanged."""

    def report_lines(self, result: subprocess.CompletedProcess[bytes]) -> list[str]:
        """Assert the run succeeded and every stderr line is a report line; return them."""
        self.assertEqual(result.returncode, EXIT_OK, result.stderr)
        lines = result.stderr.decode().splitlines()
        self.assertTrue(lines)
        for line in lines:
            self.assertTrue(line.startswith("* "), line)
        return lines

    def test_check(self) -> None:
        """With check -v, OK on stdout and the report (version, group, chain) on stderr."""
        peer = self.peer()
        result = run_client("check", f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), "-v")
        self.assertRegex(result.stdout.decode(), r"\AOK \d+\.\d ms TLSv1\.3 TLS_[A-Z0-9_]+\n\Z")
        lines = self.report_lines(result)
        self.assertEqual(lines[0], f"* connected to 127.0.0.1:{peer.port}")
        self.assertEqual(
            lines[1],
            "*   server name: 127.0.0.1 (an IP address: no SNI; checked in the certificate)",
        )
        self.assertIn("*   TLS version: TLSv1.3", lines)
        self.assertIn("*   group: x25519", lines)
        self.assertIn("*   ALPN: none (none offered)", lines)
        self.assertIn(f"*   verification: against {self.certs.ca}", lines)
        self.assertIn("*     [0] subject: CN=localhost", lines)
        self.assertIn("*         SANs: DNS:localhost, IP:127.0.0.1, IP:::1", lines)
        self.assertTrue(any(line.startswith("*   post-quantum: ") for line in lines), lines)

    def test_echo(self) -> None:
        """In echo mode -v keeps standard output byte exact."""
        peer = self.peer()
        data = b"one\ntwo\n"
        result = run_client(
            f"127.0.0.1:{peer.port}", "--ca", str(self.certs.ca), "--verbose", data=data
        )
        self.assertEqual(result.stdout, data)
        self.assertIn("*   TLS version: TLSv1.3", self.report_lines(result))

    def test_alpn(self) -> None:
        """--alpn offers the protocols in order; the one the server picked is reported."""
        peer = self.peer("--alpn", "secure-echo")
        result = run_client(
            "check",
            f"127.0.0.1:{peer.port}",
            "--ca",
            str(self.certs.ca),
            "--alpn",
            "h2",
            "--alpn",
            "secure-echo",
            "-v",
        )
        self.assertIn(
            "*   ALPN: secure-echo (offered: h2, secure-echo)", self.report_lines(result)
        )
        self.assertEqual(peer.next_line(), "alpn secure-echo")

    def test_system_store_and_insecure_are_named(self) -> None:
        """The verification line names the system trust store, or says there was none."""
        peer = self.peer()
        result = subprocess.run(
            client_command("check", f"127.0.0.1:{peer.port}", "-v"),
            input=b"",
            capture_output=True,
            timeout=RUN_TIMEOUT,
            env=env_with_store(self.certs.ca, self.certs.directory),
            check=False,
        )
        self.assertIn(
            "*   verification: against the system trust store", self.report_lines(result)
        )
        result = run_client("check", f"127.0.0.1:{peer.port}", "--insecure", "-v")
        lines = result.stderr.decode().splitlines()
        self.assertTrue(lines[0].startswith("secure-echo-client: warning: --insecure"), lines)
        self.assertIn("*   verification: none (--insecure)", lines[1:])
        self.assertIn(
            "*   certificate chain, as sent by the server (not verified), 1 certificate:",
            lines[1:],
        )

    def test_failure_is_still_one_line(self) -> None:
        """A failed handshake with -v is still one line on stderr and no report."""
        peer = self.peer()
        result = run_client(
            "check", f"127.0.0.1:{peer.port}", "--ca", str(self.certs.other_ca), "-v"
        )
        self.assert_one_line_error(result, EXIT_CONNECTION, "certificate verify failed")
