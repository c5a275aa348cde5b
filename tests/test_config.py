"""Tests for :mod:`secure_echo.daemon.options` and the one-line errors of ``tap.Options``."""

from __future__ import annotations

import io
import ipaddress
import os
import sys
from pathlib import Path
from unittest import SkipTest

from cryptography import x509
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from secure_echo import tap
from secure_echo.daemon.load import Config, load
from secure_echo.daemon.options import parse
from secure_echo.daemon.settings import DEFAULT_BACKLOG, Listen, validate_listen
from secure_echo.tls.policy import ClientAuth, TLSProfile
from tests.helpers import (
    make_pki,
    write_crl,
    write_expired_server,
    write_named_server,
    write_test_certs,
)


class ConfigTestCase(SynchronousTestCase):
    """Shared set-up: a PKI and the arguments that point at its server pair."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.tls_args = ["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)]

    def parse(self, *args: str) -> Config:
        return parse([*self.tls_args, *args])

    def assert_usage_error(self, option: str, *args: str, words: tuple[str, ...] = ()) -> str:
        """Parsing ``args`` fails with one line that starts by naming ``option``."""
        error: usage.UsageError = self.assertRaises(usage.UsageError, self.parse, *args)
        text = str(error)
        self.assertNotIn("\n", text)
        self.assertTrue(text.startswith(option), text)
        for word in words:
            self.assertIn(word, text)
        return text


class DefaultsTests(ConfigTestCase):
    """What an operator gets without options."""

    def test_defaults(self) -> None:
        """Loopback port 8443 with backlog 4096, intermediate, 64 KiB lines, no client auth."""
        cfg = self.parse()
        self.assertEqual(
            cfg.listens,
            (Listen(f"tcp:8443:interface=127.0.0.1:backlog={DEFAULT_BACKLOG}", "tcp"),),
        )
        self.assertEqual(DEFAULT_BACKLOG, 4096)
        self.assertIs(cfg.tls.settings.profile, TLSProfile.INTERMEDIATE)
        self.assertEqual(cfg.max_line_length, 65536)
        self.assertEqual(cfg.max_pending, 256)
        self.assertEqual(cfg.handshake_timeout, 10.0)
        self.assertEqual(cfg.handler_timeout, 30.0)
        self.assertIsNone(cfg.log_file)
        self.assertEqual(cfg.log_max_bytes, 10 * 1024 * 1024)
        self.assertEqual(cfg.log_keep, 5)
        self.assertIs(cfg.tls.settings.client_auth, ClientAuth.NONE)
        self.assertIsNone(cfg.tls.settings.client_ca)
        self.assertIsNone(cfg.dev_certs)
        self.assertIs(cfg.contexts.loaded, cfg.tls)

    def test_client_ca_means_required(self) -> None:
        """With --client-ca and no --client-auth, client certificates are required."""
        cfg = self.parse("--client-ca", str(self.pki.ca_cert))
        self.assertIs(cfg.tls.settings.client_auth, ClientAuth.REQUIRED)
        self.assertEqual(cfg.tls.settings.client_ca, self.pki.ca_cert)
        self.assertEqual(cfg.tls.client_cas, (self.pki.ca.certificate,))

    def test_client_auth_explicit(self) -> None:
        """--client-auth optional or none is kept as given with --client-ca."""
        for mode in ClientAuth:
            cfg = self.parse("--client-ca", str(self.pki.ca_cert), "--client-auth", str(mode))
            self.assertIs(cfg.tls.settings.client_auth, mode)

    def test_modern_profile(self) -> None:
        """--tls-profile modern is accepted and builds a context."""
        cfg = self.parse("--tls-profile", "modern")
        self.assertIs(cfg.tls.settings.profile, TLSProfile.MODERN)

    def test_numbers(self) -> None:
        """Numeric options are parsed into the config."""
        cfg = self.parse(
            "--max-line-length=100",
            "--max-pending=2",
            "--handshake-timeout=0.5",
            "--handler-timeout=2",
            "--log-max-bytes=4096",
            "--log-keep=1",
        )
        self.assertEqual(
            (
                cfg.max_line_length,
                cfg.max_pending,
                cfg.handshake_timeout,
                cfg.handler_timeout,
                cfg.log_max_bytes,
                cfg.log_keep,
            ),
            (100, 2, 0.5, 2.0, 4096, 1),
        )

    def test_log_file(self) -> None:
        """A log file in an existing directory is resolved to an absolute path."""
        directory = Path(self.mktemp())
        directory.mkdir()
        cfg = self.parse("--log-file", str(directory / "echo.jsonl"))
        self.assertEqual(cfg.log_file, (directory / "echo.jsonl").absolute())


class ListenTests(ConfigTestCase):
    """--listen values."""

    def test_repeatable(self) -> None:
        """--listen may be given several times; each gets the default backlog."""
        cfg = self.parse("--listen", "tcp:0:interface=127.0.0.1", "--listen", "tcp6:0")
        self.assertEqual(
            cfg.listens,
            (
                Listen("tcp:0:interface=127.0.0.1:backlog=4096", "tcp"),
                Listen("tcp6:0:backlog=4096", "tcp6"),
            ),
        )

    def test_explicit_backlog_kept(self) -> None:
        """An explicit backlog is left alone."""
        self.assertEqual(validate_listen("tcp:0:backlog=5"), Listen("tcp:0:backlog=5", "tcp"))

    def test_unix(self) -> None:
        """A UNIX socket endpoint is allowed and gets the default backlog."""
        path = str(Path(self.mktemp()).absolute())
        self.assertEqual(
            validate_listen(f"unix:{path}"), Listen(f"unix:{path}:backlog=4096", "unix")
        )

    def test_bad_port(self) -> None:
        """A TCP endpoint with a non-numeric port is one line naming --listen."""
        self.assert_usage_error(
            "--listen", "--listen", "tcp:notaport", words=("not a valid endpoint",)
        )

    def test_unknown_argument(self) -> None:
        """A TCP endpoint with an unknown argument is one line naming --listen."""
        self.assert_usage_error("--listen", "--listen", "tcp:0:bogus=1")

    def test_ssl_refused(self) -> None:
        """ssl: endpoints are refused: TLS is ours to add."""
        for kind in ("ssl", "tls", "le", "lets"):
            self.assert_usage_error(
                "--listen", "--listen", f"{kind}:8443", words=("TLS is added by secure-echo",)
            )

    def test_unknown_type(self) -> None:
        """An endpoint type we do not support is one line naming the type."""
        self.assert_usage_error(
            "--listen", "--listen", "udp:53", words=("unsupported endpoint type 'udp'",)
        )

    def test_systemd_without_socket(self) -> None:
        """A systemd endpoint with no socket passed is one line, not a traceback."""
        if "LISTEN_FDS" in os.environ:
            raise SkipTest("this process was given sockets by systemd")
        for description in ("systemd:domain=INET:index=0", "systemd:domain=INET:name=nope"):
            self.assert_usage_error(
                "--listen", "--listen", description, words=("systemd passed no such socket",)
            )

    def test_systemd_without_index_or_name(self) -> None:
        """A systemd endpoint naming neither index nor name is one line."""
        self.assert_usage_error("--listen", "--listen", "systemd:domain=INET")


class InvalidOptionTests(ConfigTestCase):
    """Each bad option is one line that names it."""

    def test_max_line_length(self) -> None:
        """A non-numeric or zero --max-line-length is refused."""
        self.assert_usage_error(
            "--max-line-length", "--max-line-length", "abc", words=("not a whole number",)
        )
        self.assert_usage_error(
            "--max-line-length", "--max-line-length", "0", words=("too small",)
        )

    def test_max_pending(self) -> None:
        """--max-pending below 2 is refused."""
        self.assert_usage_error("--max-pending", "--max-pending", "1")

    def test_timeouts(self) -> None:
        """Zero, negative, NaN, infinite and non-numeric timeouts are refused."""
        for option in ("handshake-timeout", "handler-timeout"):
            for value in ("0", "-1", "nan", "inf", "-inf", "1e999", "abc"):
                self.assert_usage_error(f"--{option}", f"--{option}={value}")

    def test_tls_profile(self) -> None:
        """An unknown --tls-profile is refused with the valid names."""
        self.assert_usage_error(
            "--tls-profile", "--tls-profile", "old", words=("intermediate or modern",)
        )

    def test_client_auth_unknown(self) -> None:
        """An unknown --client-auth mode is refused."""
        self.assert_usage_error(
            "--client-auth",
            "--client-ca",
            str(self.pki.ca_cert),
            "--client-auth",
            "sometimes",
        )

    def test_client_auth_without_ca(self) -> None:
        """--client-auth required or optional without --client-ca is refused."""
        for mode in ("required", "optional"):
            self.assert_usage_error(
                "--client-auth", "--client-auth", mode, words=("add --client-ca",)
            )

    def test_client_auth_none_without_ca(self) -> None:
        """--client-auth none needs no CA."""
        cfg = self.parse("--client-auth", "none")
        self.assertIs(cfg.tls.settings.client_auth, ClientAuth.NONE)

    def test_bad_client_ca(self) -> None:
        """A client CA file that holds no certificate is refused naming --client-ca."""
        self.assert_usage_error("--client-ca", "--client-ca", str(self.pki.server_key))

    def test_key_without_cert(self) -> None:
        """--key without --cert is refused naming --key."""
        error = self.assertRaises(
            usage.UsageError,
            parse,
            ["--key", str(self.pki.server_key), "--state-dir", self.mktemp()],
        )
        self.assertEqual(
            str(error), "--key: given without --cert; add --cert with the matching certificate"
        )

    def test_bad_cert(self) -> None:
        """A TLS problem reaches the operator as one UsageError line naming the option."""
        error = self.assertRaises(
            usage.UsageError,
            parse,
            ["--cert", str(self.pki.server_cert), "--key", str(self.pki.client_key)],
        )
        self.assertTrue(str(error).startswith("--key:"), str(error))
        self.assertNotIn("\n", str(error))

    def test_log_file_missing_directory(self) -> None:
        """A log file in a directory that does not exist is refused."""
        missing = Path(self.mktemp()) / "echo.jsonl"
        self.assert_usage_error(
            "--log-file", "--log-file", str(missing), words=("does not exist",)
        )

    def test_log_file_is_directory(self) -> None:
        """A directory given as the log file is refused with a suggestion."""
        directory = Path(self.mktemp())
        directory.mkdir()
        self.assert_usage_error(
            "--log-file", "--log-file", str(directory), words=("is a directory",)
        )

    def test_log_keep_zero(self) -> None:
        """--log-keep 0 is refused."""
        self.assert_usage_error("--log-keep", "--log-keep", "0")

    def test_log_max_bytes_small(self) -> None:
        """--log-max-bytes below 4096 is refused."""
        self.assert_usage_error("--log-max-bytes", "--log-max-bytes", "100")


class CertificateSourceTests(SynchronousTestCase):
    """Where the certificate comes from: --cert alone, or development certificates."""

    def test_combined_pem(self) -> None:
        """--cert alone reads the key from the same file (certificate plus key)."""
        pki = make_pki(self.mktemp())
        combined = pki.directory / "combined.pem"
        combined.write_bytes(pki.server_cert.read_bytes() + pki.server_key.read_bytes())
        cfg = parse(["--cert", str(combined)])
        self.assertEqual(cfg.tls.settings.cert, combined)
        self.assertEqual(cfg.tls.settings.key, combined)
        self.assertEqual(
            cfg.tls.leaf, x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
        )
        self.assertEqual(len(cfg.tls.chain), 1)
        self.assertIsNone(cfg.dev_certs)

    def test_cert_only_without_key(self) -> None:
        """--cert alone with a file that has no key is refused naming --key."""
        pki = make_pki(self.mktemp())
        error = self.assertRaises(usage.UsageError, parse, ["--cert", str(pki.server_cert)])
        self.assertTrue(str(error).startswith("--key:"), str(error))

    def test_dev_certs(self) -> None:
        """Without --cert, development certificates are made in --state-dir and used."""
        state = Path(self.mktemp())
        cfg = parse(["--state-dir", str(state)])
        dev = cfg.dev_certs
        assert dev is not None
        self.assertTrue(dev.created)
        self.assertEqual(dev.directory, state / "dev-ca")
        self.assertTrue(dev.ca_cert.is_file())
        self.assertEqual(cfg.tls.settings.cert, dev.server_cert)
        self.assertEqual(cfg.tls.settings.key, dev.server_key)
        again = parse(["--state-dir", str(state)]).dev_certs
        assert again is not None
        self.assertFalse(again.created)

    def test_dev_certs_unusable_state_dir(self) -> None:
        """A --state-dir that cannot hold a directory is one line naming --state-dir."""
        blocker = Path(self.mktemp())
        blocker.write_text("a file, not a directory\n")
        error = self.assertRaises(usage.UsageError, parse, ["--state-dir", str(blocker)])
        self.assertTrue(str(error).startswith("--state-dir:"), str(error))
        self.assertNotIn("\n", str(error))


class TapOptionsTests(SynchronousTestCase):
    """twistd's Options: a usage error is one stderr line and exit status 2."""

    def run_options(self, *args: str) -> tuple[SystemExit, str]:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error: SystemExit = self.assertRaises(SystemExit, tap.Options().parseOptions, list(args))
        return error, stderr.getvalue()

    def test_invalid_value(self) -> None:
        """An invalid value exits 2 with exactly one line naming the option."""
        error, output = self.run_options("--tls-profile", "old", "--state-dir", self.mktemp())
        self.assertEqual(error.code, 2)
        self.assertEqual(output.count("\n"), 1)
        self.assertTrue(output.endswith("\n"))
        self.assertIn("--tls-profile", output)
        self.assertTrue(output.startswith("twistd secure-echo: "), output)

    def test_unknown_option(self) -> None:
        """An unknown option exits 2 with one line, not the whole help page."""
        error, output = self.run_options("--no-such-option")
        self.assertEqual(error.code, 2)
        self.assertEqual(output.count("\n"), 1)
        self.assertIn("--no-such-option", output)

    def test_valid(self) -> None:
        """Valid options parse without output and leave a config."""
        pki = make_pki(self.mktemp())
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        options = tap.Options()
        options.parseOptions(["--cert", str(pki.server_cert), "--key", str(pki.server_key)])
        self.assertEqual(stderr.getvalue(), "")
        self.assertIsInstance(load(options.settings), Config)


class NewOptionTests(ConfigTestCase):
    """--metrics, --proxy-*, --log-stdout and --info-line."""

    def test_defaults(self) -> None:
        """Metrics off, PROXY protocol off with 5 s timeout, twistd's log, no info line."""
        cfg = self.parse()
        self.assertIsNone(cfg.metrics)
        self.assertEqual(cfg.proxy_protocol, "off")
        self.assertEqual(cfg.proxy_trusted, ())
        self.assertEqual(cfg.proxy_timeout, 5.0)
        self.assertIsNone(cfg.log_stdout)
        self.assertIsNone(cfg.info_line)
        self.assertEqual(cfg.backlog, DEFAULT_BACKLOG)

    def test_metrics(self) -> None:
        """--metrics keeps a plain endpoint, type lower-cased, without a backlog added."""
        cfg = self.parse("--metrics", "TCP:9100:interface=127.0.0.1")
        self.assertEqual(cfg.metrics, "tcp:9100:interface=127.0.0.1")
        path = str(Path(self.mktemp()).absolute())
        self.assertEqual(self.parse("--metrics", f"unix:{path}").metrics, f"unix:{path}")

    def test_metrics_invalid(self) -> None:
        """A TLS, unknown or malformed metrics endpoint is one line naming --metrics."""
        self.assert_usage_error("--metrics", "--metrics", "ssl:9100", words=("plain HTTP",))
        self.assert_usage_error("--metrics", "--metrics", "udp:9100", words=("unsupported",))
        self.assert_usage_error("--metrics", "--metrics", "tcp:x", words=("not a valid",))
        self.assert_usage_error("--metrics", "--metrics", "tcp:70000", words=("out of range",))

    def test_proxy_protocol(self) -> None:
        """Modes optional and required take trusted networks (host bits allowed, v4 and v6)."""
        for mode in ("optional", "required"):
            cfg = self.parse(
                "--proxy-protocol",
                mode,
                "--proxy-trusted",
                "10.1.2.3/8",
                "--proxy-trusted",
                "2001:db8::1",
                "--proxy-timeout",
                "0.5",
            )
            self.assertEqual(cfg.proxy_protocol, mode)
            self.assertEqual(
                cfg.proxy_trusted,
                (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::1/128")),
            )
            self.assertEqual(cfg.proxy_timeout, 0.5)

    def test_proxy_errors(self) -> None:
        """Unknown mode, missing or stray --proxy-trusted, bad network, bad timeout."""
        self.assert_usage_error(
            "--proxy-protocol", "--proxy-protocol", "on", words=("off, optional or required",)
        )
        self.assert_usage_error(
            "--proxy-trusted", "--proxy-protocol", "required", words=("add --proxy-trusted",)
        )
        self.assert_usage_error(
            "--proxy-trusted", "--proxy-trusted", "10.0.0.0/8", words=("--proxy-protocol",)
        )
        self.assert_usage_error(
            "--proxy-trusted",
            "--proxy-protocol",
            "optional",
            "--proxy-trusted",
            "10.0.0.0/33",
            words=("not an IP address or network",),
        )
        self.assert_usage_error("--proxy-timeout", "--proxy-timeout", "0")

    def test_log_stdout(self) -> None:
        """--log-stdout takes json or text."""
        for value in ("json", "text"):
            self.assertEqual(self.parse("--log-stdout", value).log_stdout, value)
        self.assert_usage_error("--log-stdout", "--log-stdout", "xml", words=("json or text",))

    def test_info_line(self) -> None:
        """--info-line is kept as bytes; non-UTF-8 command-line bytes survive."""
        self.assertEqual(self.parse("--info-line", "INFO").info_line, b"INFO")
        raw = b"caf\xe9".decode("utf-8", "surrogateescape")
        self.assertEqual(self.parse("--info-line", raw).info_line, b"caf\xe9")

    def test_info_line_invalid(self) -> None:
        """Empty, multi-line or longer-than-a-line info text is refused."""
        self.assert_usage_error("--info-line", "--info-line", "", words=("empty",))
        self.assert_usage_error("--info-line", "--info-line", "a\nb", words=("line break",))
        self.assert_usage_error(
            "--info-line",
            "--info-line",
            "x" * 11,
            "--max-line-length",
            "10",
            words=("longer than --max-line-length",),
        )

    def test_client_hello(self) -> None:
        """--client-hello is on by default; off turns it off; anything else is refused."""
        self.assertTrue(self.parse().client_hello)
        self.assertFalse(self.parse("--client-hello", "off").client_hello)
        self.assert_usage_error("--client-hello", "--client-hello", "maybe", words=("on or off",))


class SeveralCertificatesTests(SynchronousTestCase):
    """--cert/--key repeatable: paired by position, the first is the default."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.other = write_named_server(self.pki, "other", ("other.example",))
        self.third = write_named_server(self.pki, "third", ("*.third.example",))

    def error(self, *args: str) -> str:
        """Parsing ``args`` fails with one line; return it."""
        error: usage.UsageError = self.assertRaises(usage.UsageError, parse, list(args))
        self.assertNotIn("\n", str(error))
        return str(error)

    def test_pairs_by_position(self) -> None:
        """The n-th --key belongs to the n-th --cert; the first pair is the default."""
        cfg = parse(
            [
                "--cert",
                str(self.pki.server_cert),
                "--cert",
                str(self.other[0]),
                "--key",
                str(self.pki.server_key),
                "--key",
                str(self.other[1]),
            ]
        )
        settings = cfg.tls.settings
        self.assertEqual(
            (settings.cert, settings.key), (self.pki.server_cert, self.pki.server_key)
        )
        self.assertEqual(settings.extra_certs, (self.other,))
        self.assertEqual(cfg.tls.subject, "CN=localhost")
        self.assertEqual([extra.subject for extra in cfg.tls.extra], ["CN=other.example"])

    def test_missing_key_read_from_cert_file(self) -> None:
        """A --cert beyond the last --key reads its key from its own file."""
        combined = self.pki.directory / "third-combined.pem"
        combined.write_bytes(self.third[0].read_bytes() + self.third[1].read_bytes())
        cfg = parse(
            [
                "--cert",
                str(self.pki.server_cert),
                "--key",
                str(self.pki.server_key),
                "--cert",
                str(combined),
            ]
        )
        self.assertEqual(cfg.tls.settings.extra_certs, ((combined, combined),))
        self.assertEqual(cfg.tls.extra[0].subject, "CN=*.third.example")

    def test_more_keys_than_certs(self) -> None:
        """More --key than --cert is one line saying how they pair."""
        text = self.error(
            "--cert",
            str(self.pki.server_cert),
            "--key",
            str(self.pki.server_key),
            "--key",
            str(self.other[1]),
        )
        self.assertTrue(text.startswith("--key: 2 keys for 1 certificate;"), text)
        self.assertIn("the n-th --key belongs to the n-th --cert", text)

    def test_empty_paths(self) -> None:
        """An empty --cert or --key is refused, naming the option."""
        self.assertTrue(self.error("--cert", "").startswith("--cert: an empty path"))
        text = self.error("--cert", str(self.pki.server_cert), "--key", "")
        self.assertTrue(text.startswith("--key: an empty path"), text)

    def test_bad_second_certificate(self) -> None:
        """The further certificates get the default one's checks: an expired one stops start-up."""
        expired = write_expired_server(self.pki.directory, self.pki.ca)
        text = self.error(
            "--cert",
            str(self.pki.server_cert),
            "--cert",
            str(expired[0]),
            "--key",
            str(self.pki.server_key),
            "--key",
            str(expired[1]),
        )
        self.assertTrue(text.startswith("--cert: certificate in"), text)
        self.assertIn("expired", text)

    def test_second_key_mismatch(self) -> None:
        """A further key that is not its certificate's is refused naming --key."""
        text = self.error(
            "--cert",
            str(self.pki.server_cert),
            "--cert",
            str(self.other[0]),
            "--key",
            str(self.pki.server_key),
            "--key",
            str(self.third[1]),
        )
        self.assertTrue(text.startswith("--key:"), text)
        self.assertIn("does not match", text)


class NewTLSOptionTests(ConfigTestCase):
    """--test-certs, --strict-sni, --crl and --alpn."""

    def test_defaults(self) -> None:
        """Without them: no test certificates, no CRL, no ALPN, SNI not strict."""
        settings = self.parse().tls.settings
        self.assertEqual(
            (
                settings.test_certs,
                settings.crls,
                settings.alpn,
                settings.strict_sni,
                settings.extra_certs,
            ),
            (None, (), (), False, ()),
        )

    def test_test_certs(self) -> None:
        """--test-certs DIR loads each NAME.pem + NAME.key; the default stays --cert."""
        directory = write_test_certs(self.pki.directory / "test-certs", self.pki.ca)
        cfg = self.parse("--test-certs", str(directory))
        self.assertEqual(cfg.tls.settings.test_certs, directory)
        self.assertEqual([cert.name for cert in cfg.tls.test], ["expired.localhost"])
        self.assertEqual(cfg.tls.settings.cert, self.pki.server_cert)

    def test_test_certs_not_a_directory(self) -> None:
        """A --test-certs that is no directory is one line naming the option."""
        self.assert_usage_error(
            "--test-certs", "--test-certs", str(self.pki.ca_cert), words=("not a directory",)
        )

    def test_strict_sni(self) -> None:
        """--strict-sni is a flag."""
        self.assertTrue(self.parse("--strict-sni").tls.settings.strict_sni)

    def test_alpn(self) -> None:
        """--alpn keeps the order given, once per protocol."""
        cfg = self.parse("--alpn", "h2", "--alpn", "http/1.1", "--alpn", "h2")
        self.assertEqual(cfg.tls.settings.alpn, (b"h2", b"http/1.1"))

    def test_alpn_errors(self) -> None:
        """An empty, too long or comma-separated --alpn is one line naming it."""
        self.assert_usage_error("--alpn", "--alpn", "", words=("is 0 bytes", "1 to 255"))
        self.assert_usage_error("--alpn", "--alpn", "x" * 256, words=("is 256 bytes",))
        self.assertEqual(self.parse("--alpn", "x" * 255).tls.settings.alpn, (b"x" * 255,))
        self.assert_usage_error(
            "--alpn", "--alpn", "h2,http/1.1", words=("comma", "--alpn h2 --alpn http/1.1")
        )

    def test_crl(self) -> None:
        """--crl with --client-ca is loaded, repeatable."""
        first = write_crl(self.pki, (1,), name="one.pem")
        second = write_crl(self.pki, (2, 3), name="two.pem")
        cfg = self.parse(
            "--client-ca", str(self.pki.ca_cert), "--crl", str(first), "--crl", str(second)
        )
        self.assertEqual(cfg.tls.settings.crls, (first, second))
        self.assertEqual([len(crl) for crl in cfg.tls.crls], [1, 2])

    def test_crl_needs_client_ca(self) -> None:
        """--crl without --client-ca, or with --client-auth none, is one line: what to add."""
        crl = str(write_crl(self.pki, ()))
        self.assert_usage_error("--crl", "--crl", crl, words=("add --client-ca",))
        self.assert_usage_error(
            "--crl",
            "--crl",
            crl,
            "--client-ca",
            str(self.pki.ca_cert),
            "--client-auth",
            "none",
            words=("--client-auth none checks no client certificate",),
        )
        self.assert_usage_error(
            "--crl", "--crl", "", "--client-ca", str(self.pki.ca_cert), words=("empty path",)
        )

    def test_crl_file_problems(self) -> None:
        """A CRL file that holds no CRL, or an expired one, stops start-up naming --crl."""
        ca = ("--client-ca", str(self.pki.ca_cert))
        self.assert_usage_error(
            "--crl", *ca, "--crl", str(self.pki.ca_cert), words=("holds no PEM CRL",)
        )
        expired = write_crl(self.pki, (), name="old.pem", days=-1)
        self.assert_usage_error("--crl", *ca, "--crl", str(expired), words=("expired",))
