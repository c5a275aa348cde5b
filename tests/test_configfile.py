"""Tests for :mod:`secure_echo.daemon.configfile`: ``--config``, ``--print-config`` and reload."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, ClassVar

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from secure_echo import tap
from secure_echo.daemon import configfile
from secure_echo.daemon import options as config
from secure_echo.daemon.configfile import COMMAND_LINE_ONLY, ConfigFileError, Key, Kind
from secure_echo.daemon.load import Config
from secure_echo.daemon.options import parse
from secure_echo.daemon.printconfig import effective_settings
from secure_echo.daemon.settings import DEFAULT_LISTEN, FILE_KEYS
from secure_echo.tls.policy import (
    GROUPS,
    TLS12_CIPHERS,
    TLS13_CIPHERS,
    ClientAuth,
    TLSConfigError,
    fingerprint_sha256,
)
from secure_echo.tls.policy import TLSProfile as Profile
from tests.helpers import make_pki, write_crl, write_named_server, write_test_certs

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "secure-echo.toml"
#: A key line of the contrib file, commented out or not.
KEY_LINE = re.compile(r"^(#\s*)?([a-z][a-z0-9-]*)\s*=\s*(.+)$")


class FileTestCase(SynchronousTestCase):
    """A PKI and a config file written next to it."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.directory = self.pki.directory.absolute()
        self.file = self.directory / "secure-echo.toml"

    def write(self, text: str) -> Path:
        """Write ``text`` as the config file, with the test certificate and key."""
        self.file.write_text(f'cert = "server.pem"\nkey = "server-key.pem"\n{text}')
        return self.file

    def parse_file(self, text: str, *args: str) -> Config:
        return parse(["--config", str(self.write(text)), *args])

    def file_error(self, text: str, *args: str) -> str:
        """Parsing fails with one line that names the file."""
        error = self.assertRaises(usage.UsageError, self.parse_file, text, *args)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(f"--config {self.file}: "), message)
        return message


class PrecedenceTests(FileTestCase):
    """Defaults < file < command line."""

    def test_file_values(self) -> None:
        """Values in the file are used, and recorded as coming from the file."""
        cfg = self.parse_file(
            'listen = ["tcp:9001", "tcp:9002"]\nmax-line-length = 100\n'
            'idle-timeout = "off"\nhandler-timeout = 2.5\nallow-cn = ["a", "b"]\n'
            f'client-ca = "{self.pki.ca_cert.absolute()}"\n'
        )
        self.assertEqual([listen.given for listen in cfg.listens], ["tcp:9001", "tcp:9002"])
        self.assertEqual(cfg.max_line_length, 100)
        self.assertEqual(cfg.idle_timeout, 0.0)
        self.assertEqual(cfg.handler_timeout, 2.5)
        self.assertEqual(cfg.tls.settings.allow.cns, frozenset({"a", "b"}))
        self.assertEqual(cfg.sources["max-line-length"], "file")
        self.assertEqual(cfg.sources["max-pending"], "default")
        self.assertEqual(cfg.config_file, self.file)
        self.assertEqual(cfg.config_sha256, hashlib.sha256(self.file.read_bytes()).hexdigest())

    def test_relative_paths_from_file_directory(self) -> None:
        """Relative paths in the file are relative to the file's directory."""
        cfg = self.parse_file("")
        self.assertEqual(cfg.tls.settings.cert, self.directory / "server.pem")
        self.assertEqual(cfg.tls.settings.key, self.directory / "server-key.pem")

    def test_command_line_wins(self) -> None:
        """A command-line value overrides the file's."""
        cfg = self.parse_file("max-line-length = 100\n", "--max-line-length", "50")
        self.assertEqual(cfg.max_line_length, 50)
        self.assertEqual(cfg.sources["max-line-length"], "command-line")
        self.assertEqual(cfg.command_line, {"max-line-length": "50"})

    def test_repeatable_replaces(self) -> None:
        """A repeatable option on the command line replaces the file's array."""
        cfg = self.parse_file(
            'listen = ["tcp:9001", "tcp:9002"]\n', "--listen", "tcp:9003", "--listen", "tcp:9004"
        )
        self.assertEqual([listen.given for listen in cfg.listens], ["tcp:9003", "tcp:9004"])
        self.assertEqual(cfg.sources["listen"], "command-line")

    def test_empty_array_is_default(self) -> None:
        """An empty listen array means the default endpoint."""
        cfg = self.parse_file("listen = []\n")
        self.assertEqual([listen.given for listen in cfg.listens], [DEFAULT_LISTEN])

    def test_equals_and_abbreviated_forms(self) -> None:
        """--config=FILE and getopt's unique abbreviation --conf FILE both read the file."""
        path = str(self.write("max-line-length = 100\n"))
        self.assertEqual(parse([f"--config={path}"]).max_line_length, 100)
        self.assertEqual(parse(["--conf", path]).max_line_length, 100)

    def test_command_line_paths_captured_absolute(self) -> None:
        """Relative command-line paths are kept absolute for a later reload."""
        cert = Path(os.path.relpath(self.pki.server_cert))
        cfg = self.parse_file("", "--cert", str(cert))
        self.assertEqual(cfg.command_line["cert"], (str(cert.absolute()),))

    def test_flag_is_boolean(self) -> None:
        """A flag is written true or false in the file; the command line still wins."""

        class WithFlag(config.Options):
            optFlags: Any = [["shout", None, "A test flag."]]  # noqa: RUF012 - Twisted's table
            file_keys: ClassVar = {**FILE_KEYS, "shout": Key(Kind.FLAG, "true")}

        path = str(self.write("shout = true\n"))
        options = WithFlag()
        options.parseOptions(["--config", path])
        self.assertEqual(options["shout"], 1)
        self.write("shout = false\n")
        options = WithFlag()
        options.parseOptions(["--config", path, "--shout"])
        self.assertEqual(options["shout"], 1)
        self.assertEqual(options.settings.command_line, {"shout": True})
        reloaded = WithFlag()
        reloaded.apply_sources(None, options.settings.command_line)
        self.assertEqual(reloaded["shout"], 1)
        self.write("shout = 1\n")
        error = self.assertRaises(ConfigFileError, WithFlag().parseOptions, ["--config", path])
        self.assertIn('key "shout" must be true or false, not an integer (1)', str(error))

    def test_help_ignores_the_file(self) -> None:
        """--help works with a broken file, and lists --config and --print-config."""
        self.file.write_text("this is not TOML\n")
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        error = self.assertRaises(
            SystemExit, config.Options().parseOptions, ["--config", str(self.file), "--help"]
        )
        self.assertEqual(error.code, 0)
        self.assertIn("--config=", stdout.getvalue())
        self.assertIn("--print-config", stdout.getvalue())

    def test_no_file(self) -> None:
        """Without --config nothing is read and every source is default or command line."""
        cfg = parse(["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)])
        self.assertIsNone(cfg.config_file)
        self.assertIsNone(cfg.config_sha256)
        self.assertEqual(set(cfg.sources.values()), {"default", "command-line"})


class FileErrorTests(FileTestCase):
    """Every problem with the file is one line naming the file, key, problem and fix."""

    def test_unknown_key_suggestion(self) -> None:
        """A misspelt key gets the nearest valid key."""
        self.assertEqual(
            self.file_error("max-line-lenght = 3\n"),
            f'--config {self.file}: unknown key "max-line-lenght"; '
            'did you mean "max-line-length"?',
        )

    def test_snake_case_key(self) -> None:
        """snake_case is not the key convention; the dashed key is suggested."""
        self.assertIn(
            'unknown key "max_connections_per_ip"; did you mean "max-connections-per-ip"?',
            self.file_error("max_connections_per_ip = 3\n"),
        )

    def test_unknown_key_without_match(self) -> None:
        """A key like no option points at --help."""
        self.assertIn(
            'unknown key "zzz"; keys are the long option names', self.file_error("zzz = 1\n")
        )

    def test_table(self) -> None:
        """Options are top-level keys; a table is refused."""
        self.assertIn("unknown table [tls]", self.file_error('[tls]\nprofile = "modern"\n'))

    def test_command_line_only(self) -> None:
        """The keys config and print-config are refused: they are command-line only."""
        for key in ("config", "print-config"):
            self.assertIn(f'key "{key}" is command-line only', self.file_error(f"{key} = 1\n"))

    def test_wrong_type(self) -> None:
        """A value of the wrong TOML type names the key, the type expected and an example."""
        self.assertEqual(
            self.file_error('max-line-length = "big"\n'),
            f'--config {self.file}: key "max-line-length" must be a whole number, '
            'not a string ("big"); write e.g. max-line-length = 65536',
        )
        cases = {
            'listen = "tcp:8443"\n': 'key "listen" must be an array of strings',
            "listen = [8443]\n": 'key "listen" must be an array of strings, and not every',
            "handshake-timeout = true\n": 'key "handshake-timeout" must be a number',
            "max-pending = 2.5\n": 'key "max-pending" must be a whole number, not a float',
            "tls-profile = 1\n": 'key "tls-profile" must be a string, not an integer',
            "idle-timeout = 2024-01-01\n": "not a date or time",
            "log-file = {a = 1}\n": "not a table",
        }
        for text, words in cases.items():
            self.assertIn(words, self.file_error(text))

    def test_bad_value_names_file_and_key(self) -> None:
        """A value that fails option validation names the file and the key."""
        self.assertEqual(
            self.file_error("max-line-length = 0\n"),
            f'--config {self.file}: key "max-line-length": 0 is too small; give at least 1',
        )
        cases = {
            'listen = ["tcp:notaport"]\n': 'key "listen": tcp:notaport: not a valid endpoint',
            'tls-profile = "old"\n': 'key "tls-profile": unknown profile',
            'client-auth = "sometimes"\n': 'key "client-auth": ',
            'allow-spki-sha256 = ["zz"]\n': 'key "allow-spki-sha256": ',
            'metrics = "ssl:9100"\n': 'key "metrics": ssl:9100: metrics are plain HTTP',
            "handshake-timeout = nan\n": 'key "handshake-timeout": ',
        }
        for text, words in cases.items():
            self.assertIn(words, self.file_error(text))

    def test_missing_tls_file_names_key(self) -> None:
        """A certificate path from the file that does not exist names the file and key."""
        self.file.write_text('cert = "nowhere.pem"\n')
        error = self.assertRaises(usage.UsageError, parse, ["--config", str(self.file)])
        self.assertTrue(str(error).startswith(f'--config {self.file}: key "cert": '), str(error))
        self.assertIn("nowhere.pem does not exist", str(error))

    def test_command_line_error_not_reworded(self) -> None:
        """A bad command-line value is reported as the option, even with a file."""
        error = self.assertRaises(
            usage.UsageError, self.parse_file, "max-line-length = 100\n", "--max-pending", "1"
        )
        self.assertTrue(str(error).startswith("--max-pending:"), str(error))

    def test_missing_file(self) -> None:
        """A file that does not exist is one line."""
        missing = self.directory / "missing.toml"
        error = self.assertRaises(ConfigFileError, parse, ["--config", str(missing)])
        self.assertEqual(
            str(error),
            f"--config {missing}: no such file; give --config the path of a readable TOML file",
        )

    def test_directory(self) -> None:
        """A directory is refused."""
        error = self.assertRaises(ConfigFileError, parse, ["--config", str(self.directory)])
        self.assertIn("is a directory", str(error))

    def test_unreadable(self) -> None:
        """A file without read permission is one line."""
        self.write("")
        if os.getuid() == 0:  # root reads any file: make this one refuse anyway
            read_bytes = Path.read_bytes

            def refuse(path: Path) -> bytes:
                if path == self.file:
                    raise PermissionError(13, "Permission denied")
                return read_bytes(path)

            self.patch(Path, "read_bytes", refuse)
        else:
            self.file.chmod(0)
            self.addCleanup(self.file.chmod, 0o600)
        error = self.assertRaises(ConfigFileError, parse, ["--config", str(self.file)])
        self.assertIn("cannot read it: permission denied", str(error))

    def test_other_os_error(self) -> None:
        """Any other OS error reading the file (here a symlink loop) is one line."""
        self.file.symlink_to(self.file)
        error = self.assertRaises(ConfigFileError, parse, ["--config", str(self.file)])
        self.assertIn("cannot read it (Too many levels of symbolic links)", str(error))

    def test_syntax_error_line(self) -> None:
        """A TOML syntax error gives the line (the file's own, after our two)."""
        message = self.file_error("max-line-length = 100\nmax-pending 3\n")
        self.assertIn("TOML syntax error at line 4, column", message)

    def test_syntax_error_at_end(self) -> None:
        """A TOML error at the end of the document names the last line."""
        message = self.file_error('info-line = "INFO')
        self.assertIn("TOML syntax error at line 3: ", message)

    def test_duplicate_key(self) -> None:
        """A key given twice is a TOML error on the second line that gives it."""
        self.assertIn(
            "TOML syntax error at line 4", self.file_error("log-keep = 1\nlog-keep = 2\n")
        )

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 names the line."""
        self.file.write_bytes(b'max-line-length = 1\ninfo-line = "\xff"\n')
        error = self.assertRaises(ConfigFileError, parse, ["--config", str(self.file)])
        self.assertIn("line 2 is not UTF-8 text", str(error))

    def test_tap_one_line_exit(self) -> None:
        """Under twistd a file error is one stderr line and exit status 2."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(
            SystemExit, tap.Options().parseOptions, ["--config", str(self.write("bogus = 1\n"))]
        )
        self.assertEqual(error.code, 2)
        self.assertEqual(stderr.getvalue().count("\n"), 1)
        self.assertIn(f"--config {self.file}: unknown key", stderr.getvalue())


class PrintConfigTests(FileTestCase):
    """--print-config: the effective settings as JSON on stdout, exit 0."""

    def print_config(self, *args: str) -> dict[str, Any]:
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        error = self.assertRaises(
            SystemExit, tap.Options().parseOptions, [*args, "--print-config"]
        )
        self.assertEqual(error.code, 0)
        result: dict[str, Any] = json.loads(stdout.getvalue())
        return result

    def test_settings_and_sources(self) -> None:
        """Every option is listed with its effective value and where it came from."""
        path = self.write('max-line-length = 100\nlisten = ["tcp:9001"]\n')
        shown = self.print_config("--config", str(path), "--max-pending", "8")
        options = shown["options"]
        self.assertEqual(set(options), set(FILE_KEYS))
        self.assertEqual(options["max-line-length"], {"value": 100, "source": "file"})
        self.assertEqual(options["max-pending"], {"value": 8, "source": "command-line"})
        self.assertEqual(options["log-keep"], {"value": 5, "source": "default"})
        self.assertEqual(options["listen"]["value"], ["tcp:9001:backlog=4096"])
        self.assertEqual(options["cert"]["value"], [str(self.directory / "server.pem")])
        self.assertEqual(shown["config_file"], str(self.file))
        self.assertEqual(shown["config_sha256"], hashlib.sha256(path.read_bytes()).hexdigest())

    def test_tls_policy(self) -> None:
        """The TLS policy in force: versions, suites, groups, verification, certificate."""
        path = self.write(
            f'client-ca = "{self.pki.ca_cert.absolute()}"\nallow-cn = ["test client"]\n'
        )
        tls = self.print_config("--config", str(path))["tls"]
        cfg = parse(["--config", str(path)])
        self.assertEqual((tls["min_version"], tls["max_version"]), ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(tls["tls12_ciphers"], list(TLS12_CIPHERS))
        self.assertEqual(tls["tls13_ciphers"], list(TLS13_CIPHERS))
        self.assertEqual(tls["groups"], list(GROUPS))
        self.assertEqual(tls["client_auth"], "required")
        self.assertEqual(tls["verify_mode"], ["VERIFY_PEER", "VERIFY_FAIL_IF_NO_PEER_CERT"])
        self.assertEqual(
            tls["client_ca_subjects"], [self.pki.ca.certificate.subject.rfc4514_string()]
        )
        self.assertEqual(tls["allow_list"]["cn"], ["test client"])
        self.assertTrue(tls["allow_list"]["active"])
        self.assertEqual(tls["certificate"]["subject"], "CN=localhost")
        self.assertEqual(tls["certificate"]["not_after"], cfg.tls.not_after.isoformat())
        self.assertFalse(tls["certificate"]["development"])

    def test_modern_profile(self) -> None:
        """Under the modern profile TLS 1.3 is the floor and no TLS 1.2 suite is in force."""
        tls = self.print_config(
            "--config", str(self.write("")), "--tls-profile", "modern", "--client-auth", "none"
        )["tls"]
        self.assertEqual(tls["min_version"], "TLSv1.3")
        self.assertEqual(tls["tls12_ciphers"], [])
        self.assertEqual(tls["verify_mode"], ["VERIFY_NONE"])

    def test_new_options_shown(self) -> None:
        """The PROXY, metrics, stdout-log and info-line settings are shown as JSON values."""
        options = self.print_config(
            "--config",
            str(self.write('proxy-protocol = "required"\nproxy-trusted = ["10.1.2.3/8"]\n')),
            "--metrics",
            "TCP:9100:interface=127.0.0.1",
            "--log-stdout",
            "json",
            "--info-line",
            "INFO",
        )["options"]
        self.assertEqual(options["proxy-trusted"]["value"], ["10.0.0.0/8"])
        self.assertEqual(options["proxy-protocol"]["value"], "required")
        self.assertEqual(options["metrics"]["value"], "tcp:9100:interface=127.0.0.1")
        self.assertEqual(options["log-stdout"]["value"], "json")
        self.assertEqual(options["info-line"]["value"], "INFO")

    def test_development_certificate(self) -> None:
        """Without a certificate the development one and its state directory are shown."""
        state = Path(self.mktemp()).absolute()
        self.file.write_text(f'state-dir = "{state}"\n')
        shown = self.print_config("--config", str(self.file))
        self.assertTrue(shown["tls"]["certificate"]["development"])
        self.assertEqual(shown["options"]["state-dir"], {"value": str(state), "source": "file"})

    def test_invalid_prints_nothing(self) -> None:
        """With an invalid option nothing is printed and the exit status is 2."""
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(
            SystemExit,
            tap.Options().parseOptions,
            ["--config", str(self.write("log-keep = 0\n")), "--print-config"],
        )
        self.assertEqual(error.code, 2)
        self.assertEqual(stdout.getvalue(), "")
        self.assertIn('key "log-keep"', stderr.getvalue())

    def test_effective_settings_of_constructed_config(self) -> None:
        """A Config built without options (as tests do) reports every source as default."""
        cfg = parse(["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)])
        bare = Config(
            listens=cfg.listens,
            tls_settings=cfg.tls_settings,
            dev_state_dir=None,
            tls=cfg.tls,
            contexts=cfg.contexts,
            max_line_length=1,
            max_pending=2,
            handshake_timeout=3.0,
            handler_timeout=4.0,
            log_file=None,
            log_max_bytes=4096,
            log_keep=1,
        )
        shown = effective_settings(bare)
        options = shown["options"]
        assert isinstance(options, dict)
        self.assertEqual({o["source"] for o in options.values()}, {"default"})
        json.dumps(shown)


class ReloadTests(FileTestCase):
    """reload_tls_settings re-reads the file, keeping command-line values."""

    def test_rereads_changed_file(self) -> None:
        """Certificate, client CA, client-auth, profile and allow-lists come from the new file."""
        cfg = self.parse_file("")
        self.assertIs(cfg.tls.settings.client_auth, ClientAuth.NONE)
        self.write(
            f'client-ca = "{self.pki.ca_cert.absolute()}"\nclient-auth = "optional"\n'
            'tls-profile = "modern"\nallow-dns = ["Client.Example.org"]\n'
        )
        settings = config.reload_tls_settings(cfg)
        self.assertEqual(settings.client_ca, self.pki.ca_cert.absolute())
        self.assertIs(settings.client_auth, ClientAuth.OPTIONAL)
        self.assertIs(settings.profile, Profile.MODERN)
        self.assertEqual(settings.allow.dns, frozenset({"client.example.org"}))
        self.assertEqual(settings.cert, self.directory / "server.pem")

    def test_command_line_still_wins(self) -> None:
        """Values given on the command line at start override the re-read file."""
        cfg = self.parse_file(
            "", "--tls-profile", "modern", "--allow-cn", "x", "--client-ca", str(self.pki.ca_cert)
        )
        self.write('tls-profile = "intermediate"\nallow-cn = ["y"]\n')
        settings = config.reload_tls_settings(cfg)
        self.assertIs(settings.profile, Profile.MODERN)
        self.assertEqual(settings.allow.cns, frozenset({"x"}))
        self.assertEqual(settings.client_ca, self.pki.ca_cert.absolute())

    def test_broken_file(self) -> None:
        """A broken file at reload is a one-line TLSConfigError naming the file and key."""
        cfg = self.parse_file("")
        self.write("max-line-lenght = 3\n")
        error = self.assertRaises(TLSConfigError, config.reload_tls_settings, cfg)
        self.assertEqual(
            str(error),
            f'--config {self.file}: unknown key "max-line-lenght"; '
            'did you mean "max-line-length"?',
        )
        self.file.unlink()
        error = self.assertRaises(TLSConfigError, config.reload_tls_settings, cfg)
        self.assertIn("no such file", str(error))

    def test_bad_tls_value(self) -> None:
        """A bad TLS value in the re-read file names the file and key."""
        cfg = self.parse_file("")
        self.write('client-auth = "required"\n')
        error = self.assertRaises(TLSConfigError, config.reload_tls_settings, cfg)
        self.assertTrue(
            str(error).startswith(f'--config {self.file}: key "client-auth": '), str(error)
        )
        self.assertIn("add --client-ca", str(error))
        self.assertNotIn("\n", str(error))

    def test_without_file(self) -> None:
        """Without a config file the command-line settings are rebuilt."""
        cfg = parse(["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)])
        settings = config.reload_tls_settings(cfg)
        self.assertEqual(settings.cert, self.pki.server_cert.absolute())
        self.assertEqual(settings.key, self.pki.server_key.absolute())

    def test_command_line_error_at_reload(self) -> None:
        """An error without a file at fault is still one TLSConfigError line."""
        cfg = self.parse_file("")
        self.write('client-ca = "ca.pem"\n')
        cfg = Config(**{**cfg.__dict__, "command_line": {"client-auth": "sometimes"}})
        error = self.assertRaises(TLSConfigError, config.reload_tls_settings, cfg)
        self.assertTrue(str(error).startswith("--client-auth: unknown mode"), str(error))


class ContribFileTests(SynchronousTestCase):
    """contrib/secure-echo.toml documents exactly the options there are."""

    def key_lines(self) -> dict[str, tuple[bool, str]]:
        """Key to (commented out, TOML value text) for every key line of the file."""
        found: dict[str, tuple[bool, str]] = {}
        for line in CONTRIB.read_text().splitlines():
            match = KEY_LINE.match(line)
            if match:
                found[match[2]] = (match[1] is not None, match[3])
        return found

    def test_loads_with_known_keys(self) -> None:
        """As shipped, the file is valid TOML whose every key is an option of the right type."""
        document = tomllib.loads(CONTRIB.read_text())
        self.assertTrue(document)
        self.assertLessEqual(set(document), set(FILE_KEYS))
        configfile.read(CONTRIB, FILE_KEYS)

    def test_every_option_documented(self) -> None:
        """Every option that a file may set appears in it, commented out or not."""
        self.assertEqual(set(self.key_lines()), set(FILE_KEYS))

    def test_documented_values(self) -> None:
        """Every line, uncommented, has the right type; commented defaults are the defaults."""
        defaults = config.Options().defaults
        text = "".join(f"{key} = {value}\n" for key, (_, value) in self.key_lines().items())
        path = Path(self.mktemp())
        path.write_text(text)
        values = configfile.read(path, FILE_KEYS).values
        for key, (commented, _) in self.key_lines().items():
            default = DEFAULT_LISTEN if key == "listen" else defaults.get(key)
            if commented and default is not None:
                value = values[key]
                shown = value[0] if isinstance(value, tuple) else value
                self.assertEqual(shown, default, key)

    def test_file_keys_are_the_options(self) -> None:
        """FILE_KEYS lists every option but the command-line-only ones."""
        names = {name.rstrip("=") for name in config.Options().longOpt}
        self.assertEqual(set(FILE_KEYS), names - set(COMMAND_LINE_ONLY))
        self.assertLessEqual(set(COMMAND_LINE_ONLY), names)

    def test_examples_have_their_kind(self) -> None:
        """The example of every key (shown in type errors) is valid for that key."""
        path = Path(self.mktemp())
        path.write_text("".join(f"{key} = {spec.example}\n" for key, spec in FILE_KEYS.items()))
        self.assertEqual(set(configfile.read(path, FILE_KEYS).values), set(FILE_KEYS))


class CertificateArrayTests(FileTestCase):
    """cert, key and crl as a path or an array of paths; the new TLS keys."""

    def setUp(self) -> None:
        super().setUp()
        self.other = write_named_server(self.pki, "other", ("other.example",))

    def write_certs(self, text: str) -> Path:
        """Write ``text`` as the whole config file (no default cert and key lines)."""
        self.file.write_text(text)
        return self.file

    def test_arrays_relative_to_the_file(self) -> None:
        """Arrays of relative paths are resolved against the file's directory, in order."""
        self.write_certs(
            'cert = ["server.pem", "other.pem"]\nkey = ["server-key.pem", "other-key.pem"]\n'
        )
        cfg = parse(["--config", str(self.file)])
        settings = cfg.tls.settings
        self.assertEqual(settings.cert, self.directory / "server.pem")
        self.assertEqual(settings.key, self.directory / "server-key.pem")
        self.assertEqual(
            settings.extra_certs,
            ((self.directory / "other.pem", self.directory / "other-key.pem"),),
        )
        self.assertEqual(cfg.sources["cert"], "file")

    def test_string_or_array(self) -> None:
        """A single string is one path, as an array of one would be."""
        self.write_certs('cert = "server.pem"\nkey = ["server-key.pem"]\n')
        settings = parse(["--config", str(self.file)]).tls.settings
        self.assertEqual(
            (settings.cert, settings.key, settings.extra_certs),
            (self.directory / "server.pem", self.directory / "server-key.pem", ()),
        )

    def test_command_line_replaces_the_array(self) -> None:
        """--cert on the command line replaces the file's whole array (and --key its keys)."""
        self.write_certs(
            'cert = ["server.pem", "other.pem"]\nkey = ["server-key.pem", "other-key.pem"]\n'
        )
        cfg = parse(
            ["--config", str(self.file), "--cert", str(self.other[0]), "--key", str(self.other[1])]
        )
        self.assertEqual(cfg.tls.subject, "CN=other.example")
        self.assertEqual(cfg.tls.settings.extra_certs, ())
        self.assertEqual(cfg.command_line["cert"], (str(self.other[0].absolute()),))

    def test_wrong_types(self) -> None:
        """A number, or an array holding a number, is one line naming the file and key."""
        self.write_certs("cert = 5\n")
        error = self.assertRaises(ConfigFileError, parse, ["--config", str(self.file)])
        self.assertIn(
            'key "cert" must be a path string or an array of path strings, not an integer (5)',
            str(error),
        )
        self.write_certs('crl = ["a.pem", 1]\n')
        error = self.assertRaises(ConfigFileError, parse, ["--config", str(self.file)])
        self.assertIn('key "crl" must be an array of strings, and not every item', str(error))

    def test_value_errors_name_file_and_key(self) -> None:
        """A pairing or ALPN error from the file names the file and its key."""
        self.write_certs('cert = "server.pem"\nkey = ["server-key.pem", "other-key.pem"]\n')
        error = self.assertRaises(usage.UsageError, parse, ["--config", str(self.file)])
        self.assertEqual(
            str(error),
            f'--config {self.file}: key "key": 2 keys for 1 certificate; the n-th --key '
            "belongs to the n-th --cert, so drop the extra --key or add the --cert it belongs to",
        )
        message = self.file_error('alpn = ["h2,http/1.1"]\n')
        self.assertIn('key "alpn": ', message)
        message = self.file_error('crl = "crl.pem"\n')
        self.assertIn('key "crl": revocation lists apply to client certificates', message)

    def test_new_keys(self) -> None:
        """test-certs (relative), strict-sni, alpn and crl (relative) from the file."""
        write_test_certs(self.directory / "test-certs", self.pki.ca)
        write_crl(self.pki, (7,))
        cfg = self.parse_file(
            'test-certs = "test-certs"\nstrict-sni = true\nalpn = ["h2", "http/1.1"]\n'
            'client-ca = "ca.pem"\ncrl = "crl.pem"\n'
        )
        settings = cfg.tls.settings
        self.assertEqual(settings.test_certs, self.directory / "test-certs")
        self.assertTrue(settings.strict_sni)
        self.assertEqual(settings.alpn, (b"h2", b"http/1.1"))
        self.assertEqual(settings.crls, (self.directory / "crl.pem",))
        self.assertEqual([cert.name for cert in cfg.tls.test], ["expired.localhost"])

    def test_reload_rereads_the_set(self) -> None:
        """A reload takes the certificates, CRLs, ALPN and test certificates of the file as now."""
        self.write_certs('cert = "server.pem"\nkey = "server-key.pem"\n')
        cfg = parse(["--config", str(self.file)])
        write_test_certs(self.directory / "test-certs", self.pki.ca)
        write_crl(self.pki, ())
        self.write_certs(
            'cert = ["server.pem", "other.pem"]\nkey = ["server-key.pem", "other-key.pem"]\n'
            'test-certs = "test-certs"\nalpn = ["h2"]\nstrict-sni = true\n'
            'client-ca = "ca.pem"\ncrl = ["crl.pem"]\n'
        )
        settings = config.reload_tls_settings(cfg)
        self.assertEqual(
            settings.extra_certs,
            ((self.directory / "other.pem", self.directory / "other-key.pem"),),
        )
        self.assertEqual(settings.test_certs, self.directory / "test-certs")
        self.assertEqual(settings.alpn, (b"h2",))
        self.assertTrue(settings.strict_sni)
        self.assertEqual(settings.crls, (self.directory / "crl.pem",))


class PrintCertificatesTests(FileTestCase):
    """--print-config shows every certificate, the test certificates, CRLs and ALPN."""

    def test_every_certificate(self) -> None:
        """Each certificate with subject, names, dates and fingerprint; the new options."""
        other = write_named_server(self.pki, "other", ("other.example", "*.other.example"))
        write_test_certs(self.directory / "test-certs", self.pki.ca)
        write_crl(self.pki, (1, 2))
        path = self.write(
            'test-certs = "test-certs"\nalpn = ["h2"]\nstrict-sni = true\n'
            'client-ca = "ca.pem"\ncrl = "crl.pem"\n'
        )
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        args = [
            "--config",
            str(path),
            "--cert",
            str(self.pki.server_cert),
            "--cert",
            str(other[0]),
        ]
        args += ["--key", str(self.pki.server_key), "--key", str(other[1]), "--print-config"]
        error = self.assertRaises(SystemExit, tap.Options().parseOptions, args)
        self.assertEqual(error.code, 0)
        shown = json.loads(stdout.getvalue())
        cfg = parse(args[:-1])
        tls = shown["tls"]
        first, second = tls["certificates"]
        self.assertEqual(first["subject"], "CN=localhost")
        self.assertEqual(first["names"], ["localhost"])
        self.assertTrue(first["default"])
        self.assertEqual(first["sha256"], tls["certificate"]["sha256"])
        self.assertEqual(second["cert"], str(other[0]))
        self.assertEqual(second["key"], str(other[1]))
        self.assertEqual(second["subject"], "CN=other.example")
        self.assertEqual(second["names"], ["other.example", "*.other.example"])
        self.assertFalse(second["default"])
        self.assertEqual(second["not_after"], cfg.tls.extra[0].not_after.isoformat())
        self.assertEqual(second["sha256"], fingerprint_sha256(cfg.tls.extra[0].leaf))
        self.assertEqual(second["issuer"], "CN=test CA,O=secure-echo")
        self.assertEqual(second["chain_length"], 1)
        (test,) = tls["test_certificates"]
        self.assertEqual(test["name"], "expired.localhost")
        self.assertLess(test["not_after"], first["not_after"])
        self.assertEqual(tls["alpn"], ["h2"])
        self.assertTrue(tls["strict_sni"])
        (shown_crl,) = tls["crls"]
        self.assertEqual(shown_crl["revoked"], 2)
        self.assertEqual(shown_crl["issuer"], "CN=test CA,O=secure-echo")
        options = shown["options"]
        self.assertEqual(
            options["cert"],
            {"value": [str(self.pki.server_cert), str(other[0])], "source": "command-line"},
        )
        self.assertEqual(
            options["crl"], {"value": [str(self.directory / "crl.pem")], "source": "file"}
        )
        self.assertEqual(options["alpn"], {"value": ["h2"], "source": "file"})
        self.assertEqual(options["strict-sni"], {"value": True, "source": "file"})
        self.assertEqual(
            options["test-certs"], {"value": str(self.directory / "test-certs"), "source": "file"}
        )
