"""Command-line options: parsing, the ``--config`` file, and where each value came from.

:class:`Options` parses ``twistd secure-echo`` arguments and, in ``postOptions``,
checks every one of them into plain :class:`~secure_echo.daemon.settings.Settings`
(:func:`secure_echo.daemon.settings.validate`).  Every problem is a
``usage.UsageError`` whose text is one line: the option, the problem, the fix.
Nothing here reads a TLS file, makes a certificate or listens: the load step
(:mod:`secure_echo.daemon.load`) does the first two after parsing, the listening
service (:mod:`secure_echo.daemon.services`) the last.

Sources, lowest precedence first: the defaults declared below, a ``--config`` TOML
file (:mod:`secure_echo.daemon.configfile`; keys are the long option names), the command
line.  ``parseOptions`` reads the file before twistd's parser applies the command
line, so a command-line value always wins and a repeatable option given there
replaces the file's list.  :attr:`Settings.sources` records where each value came
from; :mod:`secure_echo.daemon.printconfig` is what ``--print-config`` shows.
"""

from __future__ import annotations

import getopt
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.python import usage
from typing_extensions import override

import secure_echo
from secure_echo.daemon import configfile
from secure_echo.daemon.configfile import Key, Kind, OptionValue
from secure_echo.daemon.load import Config, load
from secure_echo.daemon.settings import (
    DEFAULT_BACKLOG,
    FILE_KEYS,
    MAX_WORKERS,
    REPEATABLE,
    Settings,
    tls_settings,
    validate,
)
from secure_echo.tls.policy import TLSConfigError, TLSSettings

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence


class Options(usage.Options):
    """Options of ``twistd secure-echo``; ``self.settings`` holds the checked values."""

    synopsis = "[options]"
    longdesc = (
        "Serve TLS line echo: every line comes back byte-exact, in order. With no "
        "--cert, a local development CA and certificate are made on first run. "
        "Every option can also be set in a --config TOML file (keys are the long "
        "option names); the command line overrides the file."
    )

    #: The keys a ``--config`` file may hold (a subclass adding options extends it).
    file_keys: ClassVar[Mapping[str, Key]] = FILE_KEYS

    optFlags: Any = [  # noqa: RUF012 - Twisted's declarative option tables
        [
            "print-config",
            None,
            "Print the effective settings and TLS policy as JSON, then exit.",
        ],
        [
            "strict-sni",
            None,
            (
                "Refuse a client whose server name (SNI) no certificate carries "
                "(unrecognized_name alert); clients sending no name get the default."
            ),
        ],
    ]

    optParameters: Any = [  # noqa: RUF012 - Twisted's declarative option tables
        [
            "config",
            None,
            None,
            "TOML file of options (keys: the long option names); the command line wins.",
        ],
        [
            "test-certs",
            None,
            None,
            "Directory of NAME.pem + NAME.key served, unchecked, to clients asking for SNI NAME.",
        ],
        ["client-ca", None, None, "PEM CA certificate(s) to verify client certificates."],
        [
            "client-auth",
            None,
            None,
            "none|optional|required (default: required with --client-ca, else none).",
        ],
        ["tls-profile", None, "intermediate", "intermediate (TLS 1.2+) or modern (TLS 1.3)."],
        ["max-line-length", None, "65536", "Longest line in bytes, terminator excluded."],
        ["max-pending", None, "256", "Replies waiting per connection before reading pauses."],
        ["handshake-timeout", None, "10", "Seconds a client has to finish the TLS handshake."],
        ["handler-timeout", None, "30", "Seconds a line handler may take for one line."],
        ["log-file", None, None, "Write JSON Lines records to this file (rotated)."],
        ["log-max-bytes", None, str(10 * 1024 * 1024), "Rotate the log file at this size."],
        ["log-keep", None, "5", "Rotated log files to keep."],
        [
            "log-stdout",
            None,
            None,
            (
                "json: JSON Lines records on stdout instead of twistd's text (for "
                "journald); text: twistd's text log, with the connection records even "
                "when --log-file has them (by default they go to --log-file only)."
            ),
        ],
        ["state-dir", None, None, "Where development certificates are kept."],
        ["idle-timeout", None, "300", "Close a connection silent this long (seconds; 0: off)."],
        [
            "write-stall-timeout",
            None,
            "30",
            "Drop a client whose unsent replies made no progress this long (s; 0: off).",
        ],
        ["max-connection-age", None, "0", "Drain a connection this old (seconds; 0: off)."],
        [
            "max-connections",
            None,
            "0",
            (
                "Open connections at most; with --workers, for the whole pool, split "
                "evenly (0: each process's file-descriptor limit less a reserve)."
            ),
        ],
        [
            "max-connections-per-ip",
            None,
            "0",
            "Per client IP (IPv6: per /64), per worker with --workers; 0: no limit.",
        ],
        ["backlog", None, str(DEFAULT_BACKLOG), "Listen backlog added to tcp/unix endpoints."],
        ["drain-timeout", None, "10", "Seconds to finish replies at shutdown before closing."],
        ["reload-interval", None, "0", "Poll the TLS files and reload on change (s; 0: off)."],
        ["expiry-warning-days", None, "14", "Warn when the certificate expires this soon."],
        [
            "metrics",
            None,
            None,
            "Serve plain-HTTP metrics here, e.g. tcp:9100:interface=127.0.0.1 (default: off).",
        ],
        [
            "proxy-protocol",
            None,
            "off",
            "off|optional|required: take PROXY v1/v2 headers from --proxy-trusted peers.",
        ],
        [
            "proxy-timeout",
            None,
            "5",
            "Seconds a trusted proxy has to send its PROXY header.",
        ],
        [
            "info-line",
            None,
            None,
            "A line with this content gets connection info as JSON, not an echo (default: off).",
        ],
        [
            "client-hello",
            None,
            "on",
            "on|off: read each client's ClientHello into its record (client_hello, ja4).",
        ],
        [
            "workers",
            None,
            "1",
            f"Worker processes sharing the listening sockets (1 to {MAX_WORKERS}; 1: none).",
        ],
        [
            "worker-watchdog",
            None,
            "10",
            "With --workers: restart a worker silent this long (seconds, at least 2; 0: off).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in REPEATABLE:
            self[name] = []
        self.settings: Settings
        self._file: configfile.ConfigFile | None = None
        self._sources: dict[str, str] = dict.fromkeys(self.file_keys, "default")

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, repeatable (default tcp:8443:interface=127.0.0.1)."""
        self["listen"].append(description)

    def opt_cert(self, path: str) -> None:
        """PEM chain, server certificate first; repeatable: the rest are chosen by SNI."""
        self["cert"].append(path)

    def opt_key(self, path: str) -> None:
        """PEM key of the --cert in the same position (default: read from that --cert)."""
        self["key"].append(path)

    def opt_crl(self, path: str) -> None:
        """PEM CRL: client certificates it revokes are refused (repeatable; --client-ca)."""
        self["crl"].append(path)

    def opt_alpn(self, protocol: str) -> None:
        """ALPN protocol selected when offered, e.g. h2 (repeatable; first preferred)."""
        self["alpn"].append(protocol)

    def opt_allow_cn(self, value: str) -> None:
        """Admit client certificates with this subject CN (repeatable)."""
        self["allow-cn"].append(value)

    def opt_allow_dns(self, value: str) -> None:
        """Admit client certificates with this DNS subjectAltName (repeatable)."""
        self["allow-dns"].append(value)

    def opt_allow_uri(self, value: str) -> None:
        """Admit client certificates with this URI SAN, e.g. a SPIFFE ID (repeatable)."""
        self["allow-uri"].append(value)

    def opt_allow_spki_sha256(self, value: str) -> None:
        """Admit client keys with this SHA-256 SubjectPublicKeyInfo pin (repeatable)."""
        self["allow-spki-sha256"].append(value)

    def opt_proxy_trusted(self, value: str) -> None:
        """Proxy address or CIDR allowed to send PROXY headers (repeatable)."""
        self["proxy-trusted"].append(value)

    def opt_version(self) -> None:
        """Print secure-echo's version and those of its TLS stack, then exit."""
        sys.stdout.write(version_line() + "\n")
        sys.stdout.flush()
        raise SystemExit(0)

    @override
    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Read ``--config`` first, then let the command line override it."""
        argv = list(sys.argv[1:] if options is None else options)
        given = self._command_line_names(argv)
        # --help and --version must work whatever state the file is in.
        if "config" in given and not given.keys() & {"help", "version"}:
            path = Path(given["config"]).expanduser().absolute()
            self.load_config_file(path, skip=given.keys())
        for name in given.keys() & self._sources.keys():
            self._sources[name] = "command-line"
        super().parseOptions(argv)

    def _command_line_names(self, argv: Sequence[str]) -> dict[str, str]:
        """Option name to (last) value for each option ``argv`` gives.

        The same getopt call as ``usage.Options.parseOptions``, so abbreviations
        resolve the same way.  A malformed command line yields nothing here; the real
        parse reports it.
        """
        try:
            pairs, _ = getopt.getopt(list(argv), self.shortOpt, self.longOpt)
        except getopt.GetoptError:
            return {}
        names: dict[str, str] = {}
        for flag, value in pairs:
            name = flag.lstrip("-")
            name = self.synonyms.get(name, self.synonyms.get(name.replace("-", "_"), name))
            names[name.replace("_", "-")] = value
        return names

    def load_config_file(self, path: Path, skip: Collection[str] = ()) -> None:
        """Use the values of the config file at ``path`` for options not in ``skip``."""
        loaded = configfile.read(path, self.file_keys)
        self._file = loaded
        for name, value in loaded.values.items():
            if name in skip:
                continue
            self._set(name, value)
            self._sources[name] = "file"

    def apply_sources(
        self, config_file: Path | None, command_line: Mapping[str, OptionValue]
    ) -> None:
        """Set options as a start with this file and command line would (for reload)."""
        if config_file is not None:
            self.load_config_file(config_file, skip=command_line.keys())
        for name, value in command_line.items():
            self._set(name, value)
            self._sources[name] = "command-line"

    def _set(self, name: str, value: OptionValue) -> None:
        if isinstance(value, tuple):
            self[name] = list(value)
        elif isinstance(value, bool):
            self[name] = int(value)  # what usage.Options stores for a flag
        else:
            self[name] = value

    def in_file_terms(self, error: usage.UsageError) -> usage.UsageError:
        """``error`` reworded to name the file and key if the option came from the file."""
        path = self._file.path if self._file else None
        return configfile.reword_for_file(error, path, self._sources)

    @override
    def postOptions(self) -> None:
        try:
            self.settings = validate(
                self,
                config_file=self._file.path if self._file else None,
                config_sha256=self._file.sha256 if self._file else None,
                sources=self._sources,
                command_line=self._captured_command_line(),
            )
        except usage.UsageError as error:
            raise self.in_file_terms(error) from None

    def tls_settings(self) -> TLSSettings:
        """The TLS options as they are now, validated into settings (files not read)."""
        return tls_settings(self)[0]

    def _captured_command_line(self) -> dict[str, OptionValue]:
        captured: dict[str, OptionValue] = {}
        for name, source in self._sources.items():
            value = self[name]
            if source != "command-line" or value is None:
                continue
            if self.file_keys[name].kind is Kind.PATHS:
                # As for one path: absolute, so a reload finds the same files.
                captured[name] = tuple(
                    str(Path(item).expanduser().absolute()) if item else item for item in value
                )
            elif isinstance(value, list):
                captured[name] = tuple(value)
            elif self.file_keys[name].kind is Kind.FLAG:
                captured[name] = bool(value)
            elif self.file_keys[name].kind is Kind.PATH and value:
                # A reload must find the same file even if the daemon changed directory.
                captured[name] = str(Path(value).expanduser().absolute())
            else:
                captured[name] = value
        return captured


def version_line() -> str:
    """``secure-echo 0.1.0 (Twisted ..., pyOpenSSL ..., OpenSSL ..., Python ...)``."""
    import platform  # noqa: PLC0415 - only for --version

    import OpenSSL  # noqa: PLC0415
    import twisted  # noqa: PLC0415
    from OpenSSL import SSL  # noqa: PLC0415

    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")
    return (
        f"secure-echo {secure_echo.__version__} (Twisted {twisted.__version__}, "
        f"pyOpenSSL {OpenSSL.__version__}, {openssl}, Python {platform.python_version()})"
    )


def one_line_exit(error: usage.UsageError, prog: str = "twistd secure-echo") -> None:
    """Print a usage error as one line on stderr and exit with status 2."""
    sys.stderr.write(f"{prog}: {error}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def parse(argv: Sequence[str]) -> Config:
    """Parse ``argv`` and load what it names (for tests and tools).

    Raises ``usage.UsageError``.
    """
    options = Options()
    options.parseOptions(list(argv))
    return load(options.settings)


def _as_tls_error(error: usage.UsageError) -> TLSConfigError:
    """The same one line as a :class:`TLSConfigError`, which a reload reports."""
    option, _, rest = str(error).partition(": ")
    problem, separator, fix = rest.rpartition("; ")
    if not separator:
        problem, fix = rest, "correct it and reload again"
    return TLSConfigError(option, problem, fix)


def reload_tls_settings(cfg: Settings) -> TLSSettings:
    """Re-read ``cfg``'s config file and build the TLS settings it now asks for.

    The certificates and keys, client CA, client-auth mode, profile, allow-lists,
    CRLs, test certificates, ALPN protocols and strict SNI come from the file as it
    is now, except where the command line gave them at start
    (``cfg.command_line``), which still wins.  The whole file is checked again
    (syntax, keys, types), but only the TLS options are validated and used; other
    changed keys take effect at the next start.  Without a config file this rebuilds
    the settings from the command line alone.

    Raises :class:`TLSConfigError` (one line, naming the file and key where the
    problem is in the file), so a caller can keep the current settings.
    """
    options = Options()
    try:
        options.apply_sources(cfg.config_file, cfg.command_line)
        settings = options.tls_settings()
    except usage.UsageError as error:
        raise _as_tls_error(options.in_file_terms(error)) from None
    return settings


def reread_settings(cfg: Settings) -> Settings:
    """Every option as a start now would check it: ``cfg``'s config file re-read.

    The command line captured at start (``cfg.command_line``) still wins, as in
    :func:`reload_tls_settings`.  Nothing is loaded (no file but the config file is
    read).  Raises ``usage.UsageError``, one line, naming the file and key when the
    problem is in the file.
    """
    options = Options()
    options.apply_sources(cfg.config_file, cfg.command_line)
    options.postOptions()
    return options.settings
