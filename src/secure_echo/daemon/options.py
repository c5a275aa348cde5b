"""Command-line options and their validation, before any reactor runs.

:class:`Options` parses ``twistd secure-echo`` arguments and, in ``postOptions``,
checks every one of them, resolving them into a :class:`Config`.  Every problem is a
``usage.UsageError`` whose text is one line: the option, the problem, the fix.
Nothing here listens or starts anything; a busy port is found when the listening
service starts (see :mod:`secure_echo.daemon.services`).

Sources, lowest precedence first: the defaults declared below, a ``--config`` TOML
file (:mod:`secure_echo.daemon.configfile`; keys are the long option names), the command
line.  ``parseOptions`` reads the file before twistd's parser applies the command
line, so a command-line value always wins and a repeatable option given there
replaces the file's list.  :attr:`Config.sources` records where each value came
from; :func:`effective_settings` is what ``--print-config`` shows.
"""

from __future__ import annotations

import getopt
import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, ClassVar, Final

from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.python import usage
from typing_extensions import override

from secure_echo.daemon import configfile
from secure_echo.daemon.configfile import Key, Kind, OptionValue
from secure_echo.tls.allowlist import AllowList, AllowListError
from secure_echo.tls.policy import (
    GROUPS,
    TLS12_CIPHERS,
    TLS13_CIPHERS,
    ClientAuth,
    ContextHolder,
    LoadedTLS,
    TLSConfigError,
    TLSProfile,
    TLSSettings,
    fingerprint_sha256,
)
from secure_echo.tls.policy import load_and_validate as load_tls
from secure_echo.tools import devcerts

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

DEFAULT_LISTEN: Final = "tcp:8443:interface=127.0.0.1"
#: Enough for a burst of a few thousand connects; the kernel caps it at
#: net.core.somaxconn.
DEFAULT_BACKLOG: Final = 4096
_ENDPOINT_TYPES: Final = frozenset({"tcp", "tcp6", "unix", "systemd"})
_BACKLOG_TYPES: Final = frozenset({"tcp", "tcp6", "unix"})
_ALLOW_OPTIONS: Final = ("allow-cn", "allow-dns", "allow-uri", "allow-spki-sha256")
_REPEATABLE: Final = ("listen", *_ALLOW_OPTIONS, "proxy-trusted")
PROXY_PROTOCOL_MODES: Final = ("off", "optional", "required")
LOG_STDOUT_FORMATS: Final = ("json", "text")
_OPTION_IN_ERROR: Final = re.compile(r"--([a-z0-9-]+)")
#: ``--workers``: processes that accept on the shared listening sockets.
MAX_WORKERS: Final = 64

#: Every key a ``--config`` file may hold: each option but the command-line-only
#: ones (``config``, ``print-config``), with its TOML kind and an example value.
FILE_KEYS: Final[Mapping[str, Key]] = MappingProxyType(
    {
        "listen": Key(Kind.STRINGS, f'["{DEFAULT_LISTEN}"]'),
        "backlog": Key(Kind.INTEGER, str(DEFAULT_BACKLOG)),
        "cert": Key(Kind.PATH, '"/etc/secure-echo/server.pem"'),
        "key": Key(Kind.PATH, '"/etc/secure-echo/server-key.pem"'),
        "client-ca": Key(Kind.PATH, '"/etc/secure-echo/client-ca.pem"'),
        "client-auth": Key(Kind.STRING, '"required"'),
        "tls-profile": Key(Kind.STRING, '"intermediate"'),
        "allow-cn": Key(Kind.STRINGS, '["client.example.org"]'),
        "allow-dns": Key(Kind.STRINGS, '["client.example.org"]'),
        "allow-uri": Key(Kind.STRINGS, '["spiffe://example.org/ns/prod/sa/web"]'),
        "allow-spki-sha256": Key(Kind.STRINGS, '["<64 hex digits>"]'),
        "state-dir": Key(Kind.PATH, '"/var/lib/secure-echo"'),
        "max-line-length": Key(Kind.INTEGER, "65536"),
        "max-pending": Key(Kind.INTEGER, "256"),
        "handshake-timeout": Key(Kind.NUMBER, "10"),
        "handler-timeout": Key(Kind.NUMBER, "30"),
        "idle-timeout": Key(Kind.NUMBER_OR_OFF, "300"),
        "write-stall-timeout": Key(Kind.NUMBER_OR_OFF, "30"),
        "max-connection-age": Key(Kind.NUMBER_OR_OFF, "3600"),
        "max-connections": Key(Kind.INTEGER, "10000"),
        "max-connections-per-ip": Key(Kind.INTEGER, "100"),
        "drain-timeout": Key(Kind.NUMBER, "10"),
        "reload-interval": Key(Kind.NUMBER_OR_OFF, "60"),
        "expiry-warning-days": Key(Kind.NUMBER, "14"),
        "log-file": Key(Kind.PATH, '"/var/log/secure-echo/secure-echo.jsonl"'),
        "log-max-bytes": Key(Kind.INTEGER, str(10 * 1024 * 1024)),
        "log-keep": Key(Kind.INTEGER, "5"),
        "log-stdout": Key(Kind.STRING, '"json"'),
        "metrics": Key(Kind.STRING, '"tcp:9100:interface=127.0.0.1"'),
        "proxy-protocol": Key(Kind.STRING, '"required"'),
        "proxy-trusted": Key(Kind.STRINGS, '["10.0.0.0/8"]'),
        "proxy-timeout": Key(Kind.NUMBER, "5"),
        "info-line": Key(Kind.STRING, '"INFO"'),
        "workers": Key(Kind.INTEGER, "1"),
    }
)

#: Where an option's value came from, lowest precedence first.
SOURCES: Final = ("default", "file", "command-line")


@dataclass(frozen=True)
class Listen:
    """One validated ``--listen`` value."""

    description: str
    kind: str
    #: What the operator typed, for messages (``description`` has the backlog added).
    given: str = field(default="", compare=False)


@dataclass(frozen=True)
class Config:
    """Everything ``makeService`` needs, validated."""

    listens: tuple[Listen, ...]
    tls: LoadedTLS
    contexts: ContextHolder
    max_line_length: int
    max_pending: int
    handshake_timeout: float
    handler_timeout: float
    log_file: Path | None
    log_max_bytes: int
    log_keep: int
    dev_certs: devcerts.DevCerts | None
    idle_timeout: float = 300.0
    write_stall_timeout: float = 30.0
    max_connection_age: float = 0.0
    max_connections: int = 0
    max_connections_per_ip: int = 0
    drain_timeout: float = 10.0
    reload_interval: float = 0.0
    expiry_warning_days: float = 14.0
    #: ``--metrics``: plain server endpoint for the metrics page, or None (off).
    metrics: str | None = None
    #: ``--proxy-protocol``: one of :data:`PROXY_PROTOCOL_MODES`.
    proxy_protocol: str = "off"
    #: ``--proxy-trusted``: peers allowed to send a PROXY header (non-empty unless off).
    proxy_trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    proxy_timeout: float = 5.0
    #: ``--log-stdout``: json or text, or None for twistd's own text log.
    log_stdout: str | None = None
    #: ``--info-line``: a line with exactly this content gets a JSON description of
    #: its connection instead of an echo; None: every line is echoed.
    info_line: bytes | None = None
    backlog: int = DEFAULT_BACKLOG
    #: The ``--config`` file (absolute) and the SHA-256 of its bytes at start.
    config_file: Path | None = None
    config_sha256: str | None = None
    #: Option name to "default", "file" or "command-line".
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    #: The values the command line gave (paths made absolute), which a reload of
    #: the config file must keep: see :func:`reload_tls_settings`.
    command_line: Mapping[str, OptionValue] = field(default_factory=dict, compare=False)
    #: ``--workers``: 1 serves in this process; more runs that many worker
    #: processes under this one (:mod:`secure_echo.pool.supervisor`).
    workers: int = 1


def _positive_int(name: str, value: str, *, minimum: int = 1) -> int:
    try:
        number = int(value)
    except ValueError:
        raise usage.UsageError(
            f"--{name}: {value!r} is not a whole number; give e.g. --{name}={minimum * 1024}"
        ) from None
    if number < minimum:
        raise usage.UsageError(f"--{name}: {number} is too small; give at least {minimum}")
    return number


def _positive_float(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise usage.UsageError(
            f"--{name}: {value!r} is not a number of seconds; give e.g. --{name}=10"
        ) from None
    if not number > 0 or number == float("inf"):
        raise usage.UsageError(f"--{name}: {value} must be a positive number of seconds")
    return number


def _seconds_or_off(name: str, value: str) -> float:
    """A number of seconds where 0 switches the feature off."""
    if value.strip() in {"0", "0.0", "off"}:
        return 0.0
    return _positive_float(name, value)


def _count_or_off(name: str, value: str) -> int:
    """A whole number where 0 means no limit."""
    return _positive_int(name, value, minimum=0)


def validate_endpoint(description: str, option: str = "listen") -> tuple[str, str]:
    """Check a plain server endpoint string for ``--option``; return it and its type.

    The type is put in lower case (Twisted's parser wants that; ``TCP:8443`` is
    accepted).  TLS endpoints are refused: secure-echo adds TLS itself, and the
    metrics page is plain HTTP.
    """
    given = description
    head, sep, rest = description.partition(":")
    kind = head.strip().lower()
    description = f"{kind}{sep}{rest}"
    example = "tcp:9100:interface=127.0.0.1" if option == "metrics" else DEFAULT_LISTEN
    if kind in {"ssl", "tls", "le", "lets"}:
        why = (
            "metrics are plain HTTP"
            if option == "metrics"
            else "TLS is added by secure-echo itself"
        )
        raise usage.UsageError(
            f"--{option} {given}: {why}; give a plain endpoint such as {example}"
        )
    if kind not in _ENDPOINT_TYPES:
        raise usage.UsageError(
            f"--{option} {given}: unsupported endpoint type {kind!r}; "
            "use tcp:PORT, tcp6:PORT, unix:PATH or systemd:domain=INET:index=0"
        )
    try:
        # Only parses; the reactor argument is not used until listen().
        endpoint = endpoints.serverFromString(None, description)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        if kind == "systemd" and isinstance(error, KeyError | IndexError):
            # The systemd parser looks the socket up already: none was passed.
            raise usage.UsageError(
                f"--{option} {description}: systemd passed no such socket; "
                "start under socket activation or use tcp:PORT"
            ) from None
        raise usage.UsageError(
            f"--{option} {given}: not a valid endpoint ({error}); e.g. {example}"
        ) from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:  # noqa: PLR2004 - the TCP port range
        raise usage.UsageError(
            f"--{option} {given}: port {port} is out of range; give a port from 0 to 65535"
        )
    return description, kind


def validate_listen(description: str, backlog: int = DEFAULT_BACKLOG) -> Listen:
    """Check one ``--listen`` endpoint string and add an explicit backlog."""
    checked, kind = validate_endpoint(description)
    if kind in _BACKLOG_TYPES and "backlog=" not in checked:
        checked = f"{checked}:backlog={backlog}"
    return Listen(checked, kind, description)


def _workers(value: str) -> int:
    """``--workers``: a whole number from 1 to :data:`MAX_WORKERS`."""
    number = _positive_int("workers", value)
    if number > MAX_WORKERS:
        raise usage.UsageError(
            f"--workers: {number} is too many; give at most {MAX_WORKERS} "
            "(about one per CPU core is enough)"
        )
    return number


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise usage.UsageError(
            f"--{name}: unknown value {value!r}; use {', '.join(choices[:-1])} or {choices[-1]}"
        )
    return value


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise usage.UsageError(
            f"--proxy-trusted: {value!r} is not an IP address or network; "
            "give e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32"
        ) from None


def _info_line(value: str | None, max_line_length: int) -> bytes | None:
    if value is None:
        return None
    # Command-line bytes that are not UTF-8 arrive as surrogates: give them back.
    line = value.encode("utf-8", "surrogateescape")
    if not line:
        raise usage.UsageError(
            "--info-line: empty text would answer every empty line; give a word such as INFO"
        )
    if b"\n" in line or b"\r" in line:
        raise usage.UsageError(
            "--info-line: the text holds a line break; give the content of one line"
        )
    if len(line) > max_line_length:
        raise usage.UsageError(
            f"--info-line: {len(line)} bytes is longer than --max-line-length "
            f"({max_line_length}), so no line could match; give a shorter text"
        )
    return line


def _log_path(value: str) -> Path:
    path = Path(value).expanduser().absolute()
    if path.is_dir():
        raise usage.UsageError(
            f"--log-file: {path} is a directory; give a file path such as {path}/secure-echo.jsonl"
        )
    parent = path.parent
    if not parent.is_dir():
        raise usage.UsageError(
            f"--log-file: directory {parent} does not exist; create it or choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK) or (
        path.exists() and not os.access(path, os.W_OK)
    ):
        raise usage.UsageError(
            f"--log-file: cannot write {path}: permission denied; "
            "choose a writable path or fix its permissions"
        )
    return path


class Options(usage.Options):
    """Options of ``twistd secure-echo``; ``self.config`` holds the result."""

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
    ]

    optParameters: Any = [  # noqa: RUF012 - Twisted's declarative option tables
        [
            "config",
            None,
            None,
            "TOML file of options (keys: the long option names); the command line wins.",
        ],
        ["cert", None, None, "PEM certificate chain (server certificate first)."],
        ["key", None, None, "PEM private key of --cert (default: read from --cert)."],
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
            "Open connections at most (0: the file-descriptor limit less a reserve).",
        ],
        ["max-connections-per-ip", None, "0", "Per client IP (IPv6: per /64); 0: no limit."],
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
            "workers",
            None,
            "1",
            f"Worker processes sharing the listening sockets (1 to {MAX_WORKERS}; 1: none).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in _REPEATABLE:
            self[name] = []
        self.config: Config
        self._file: configfile.ConfigFile | None = None
        self._sources: dict[str, str] = dict.fromkeys(self.file_keys, "default")

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, repeatable (default tcp:8443:interface=127.0.0.1)."""
        self["listen"].append(description)

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
        match = _OPTION_IN_ERROR.match(str(error))
        if (
            self._file is None
            or isinstance(error, configfile.ConfigFileError)
            or match is None
            or self._sources.get(match[1]) != "file"
        ):
            return error
        return configfile.in_file_terms(error, self._file.path, match[1])

    @override
    def postOptions(self) -> None:
        try:
            self.config = self._validate()
        except usage.UsageError as error:
            raise self.in_file_terms(error) from None

    def _captured_command_line(self) -> dict[str, OptionValue]:
        captured: dict[str, OptionValue] = {}
        for name, source in self._sources.items():
            value = self[name]
            if source != "command-line" or value is None:
                continue
            if isinstance(value, list):
                captured[name] = tuple(value)
            elif self.file_keys[name].kind is Kind.FLAG:
                captured[name] = bool(value)
            elif self.file_keys[name].kind is Kind.PATH and value:
                # A reload must find the same file even if the daemon changed directory.
                captured[name] = str(Path(value).expanduser().absolute())
            else:
                captured[name] = value
        return captured

    def tls_settings(self) -> tuple[TLSSettings, devcerts.DevCerts | None]:
        """The TLS options, validated into settings (files not read yet)."""
        try:
            profile = TLSProfile(self["tls-profile"])
        except ValueError:
            raise usage.UsageError(
                f"--tls-profile: unknown profile {self['tls-profile']!r}; "
                "use intermediate or modern"
            ) from None
        client_auth = self._client_auth()
        settings, dev = self._tls_files(profile, client_auth)
        return replace(settings, allow=self._allow_list(client_auth)), dev

    def _validate(self) -> Config:
        backlog = _positive_int("backlog", self["backlog"])
        listens = tuple(validate_listen(d, backlog) for d in (self["listen"] or [DEFAULT_LISTEN]))
        max_line_length = _positive_int("max-line-length", self["max-line-length"])
        max_pending = _positive_int("max-pending", self["max-pending"], minimum=2)
        handshake_timeout = _positive_float("handshake-timeout", self["handshake-timeout"])
        handler_timeout = _positive_float("handler-timeout", self["handler-timeout"])
        log_max_bytes = _positive_int("log-max-bytes", self["log-max-bytes"], minimum=4096)
        log_keep = _positive_int("log-keep", self["log-keep"])
        log_file = _log_path(self["log-file"]) if self["log-file"] else None
        settings, dev = self.tls_settings()
        try:
            tls = load_tls(settings)
        except TLSConfigError as error:
            raise usage.UsageError(str(error)) from None
        try:
            contexts = ContextHolder(tls)
        except (SSL.Error, RuntimeError) as error:
            raise usage.UsageError(
                f"--cert: OpenSSL refused the certificate or key ({error}); "
                "check that they are a PEM certificate chain and its key"
            ) from None
        metrics = validate_endpoint(self["metrics"], "metrics")[0] if self["metrics"] else None
        proxy_protocol, proxy_trusted = self._proxy()
        log_stdout = self["log-stdout"]
        return Config(
            listens=listens,
            tls=tls,
            contexts=contexts,
            max_line_length=max_line_length,
            max_pending=max_pending,
            handshake_timeout=handshake_timeout,
            handler_timeout=handler_timeout,
            log_file=log_file,
            log_max_bytes=log_max_bytes,
            log_keep=log_keep,
            dev_certs=dev,
            idle_timeout=_seconds_or_off("idle-timeout", self["idle-timeout"]),
            write_stall_timeout=_seconds_or_off(
                "write-stall-timeout", self["write-stall-timeout"]
            ),
            max_connection_age=_seconds_or_off("max-connection-age", self["max-connection-age"]),
            max_connections=_count_or_off("max-connections", self["max-connections"]),
            max_connections_per_ip=_count_or_off(
                "max-connections-per-ip", self["max-connections-per-ip"]
            ),
            drain_timeout=_positive_float("drain-timeout", self["drain-timeout"]),
            reload_interval=_seconds_or_off("reload-interval", self["reload-interval"]),
            expiry_warning_days=_positive_float(
                "expiry-warning-days", self["expiry-warning-days"]
            ),
            metrics=metrics,
            proxy_protocol=proxy_protocol,
            proxy_trusted=proxy_trusted,
            proxy_timeout=_positive_float("proxy-timeout", self["proxy-timeout"]),
            log_stdout=(
                _choice("log-stdout", log_stdout, LOG_STDOUT_FORMATS) if log_stdout else None
            ),
            info_line=_info_line(self["info-line"], max_line_length),
            backlog=backlog,
            config_file=self._file.path if self._file else None,
            config_sha256=self._file.sha256 if self._file else None,
            sources=MappingProxyType(dict(self._sources)),
            command_line=MappingProxyType(self._captured_command_line()),
            workers=_workers(self["workers"]),
        )

    def _proxy(self) -> tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
        mode = _choice("proxy-protocol", self["proxy-protocol"], PROXY_PROTOCOL_MODES)
        trusted = tuple(_network(value) for value in self["proxy-trusted"])
        if mode != "off" and not trusted:
            raise usage.UsageError(
                f"--proxy-trusted: --proxy-protocol {mode} needs the addresses of the "
                "proxies allowed to send PROXY headers; add --proxy-trusted CIDR "
                "(e.g. 10.0.0.0/8)"
            )
        if mode == "off" and trusted:
            raise usage.UsageError(
                "--proxy-trusted: only used with --proxy-protocol optional or required; "
                "add --proxy-protocol required or drop --proxy-trusted"
            )
        return mode, trusted

    def _allow_list(self, client_auth: ClientAuth) -> AllowList:
        given = [name for name in _ALLOW_OPTIONS if self[name]]
        if given and client_auth is ClientAuth.NONE:
            raise usage.UsageError(
                f"--{given[0]}: allow-lists apply to client certificates; "
                "add --client-ca CA.pem (and --client-auth required)"
            )
        try:
            return AllowList.build(
                cns=self["allow-cn"],
                dns=self["allow-dns"],
                uris=self["allow-uri"],
                spki=self["allow-spki-sha256"],
            )
        except AllowListError as error:
            raise usage.UsageError(str(error)) from None

    def _client_auth(self) -> ClientAuth:
        value = self["client-auth"]
        if value is None:
            return ClientAuth.REQUIRED if self["client-ca"] else ClientAuth.NONE
        try:
            auth = ClientAuth(value)
        except ValueError:
            raise usage.UsageError(
                f"--client-auth: unknown mode {value!r}; use none, optional or required"
            ) from None
        if auth is not ClientAuth.NONE and not self["client-ca"]:
            raise usage.UsageError(
                f"--client-auth {auth}: no CA to verify client certificates against; "
                "add --client-ca CA.pem"
            )
        return auth

    def _tls_files(
        self, profile: TLSProfile, client_auth: ClientAuth
    ) -> tuple[TLSSettings, devcerts.DevCerts | None]:
        client_ca = Path(self["client-ca"]).expanduser() if self["client-ca"] else None
        if self["cert"] is None:
            if self["key"] is not None:
                raise usage.UsageError(
                    "--key: given without --cert; add --cert with the matching certificate"
                )
            try:
                state_dir = (
                    Path(self["state-dir"]).expanduser()
                    if self["state-dir"]
                    else devcerts.default_state_dir()
                )
                dev = devcerts.ensure_dev_certs(state_dir)
            except devcerts.DevCertsError as error:
                raise usage.UsageError(f"--state-dir: {error}") from None
            return (
                TLSSettings(dev.server_cert, dev.server_key, client_ca, client_auth, profile),
                dev,
            )
        cert = Path(self["cert"]).expanduser()
        key = Path(self["key"]).expanduser() if self["key"] else cert
        return TLSSettings(cert, key, client_ca, client_auth, profile), None


def one_line_exit(error: usage.UsageError, prog: str = "twistd secure-echo") -> None:
    """Print a usage error as one line on stderr and exit with status 2."""
    sys.stderr.write(f"{prog}: {error}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def parse(argv: Sequence[str]) -> Config:
    """Parse ``argv`` (for tests and tools); raises ``usage.UsageError``."""
    options = Options()
    options.parseOptions(list(argv))
    return options.config


def _option_values(cfg: Config) -> dict[str, object]:
    """Every file-settable option's effective value, as JSON-ready data."""
    settings = cfg.tls.settings
    allow = settings.allow
    return {
        "listen": [listen.description for listen in cfg.listens],
        "backlog": cfg.backlog,
        "cert": str(settings.cert),
        "key": str(settings.key),
        "client-ca": str(settings.client_ca) if settings.client_ca else None,
        "client-auth": str(settings.client_auth),
        "tls-profile": str(settings.profile),
        "allow-cn": sorted(allow.cns),
        "allow-dns": sorted(allow.dns),
        "allow-uri": sorted(allow.uris),
        "allow-spki-sha256": sorted(allow.spki_sha256),
        "state-dir": str(cfg.dev_certs.directory.parent) if cfg.dev_certs else None,
        "max-line-length": cfg.max_line_length,
        "max-pending": cfg.max_pending,
        "handshake-timeout": cfg.handshake_timeout,
        "handler-timeout": cfg.handler_timeout,
        "idle-timeout": cfg.idle_timeout,
        "write-stall-timeout": cfg.write_stall_timeout,
        "max-connection-age": cfg.max_connection_age,
        "max-connections": cfg.max_connections,
        "max-connections-per-ip": cfg.max_connections_per_ip,
        "drain-timeout": cfg.drain_timeout,
        "reload-interval": cfg.reload_interval,
        "expiry-warning-days": cfg.expiry_warning_days,
        "log-file": str(cfg.log_file) if cfg.log_file else None,
        "log-max-bytes": cfg.log_max_bytes,
        "log-keep": cfg.log_keep,
        "log-stdout": cfg.log_stdout,
        "metrics": cfg.metrics,
        "proxy-protocol": cfg.proxy_protocol,
        "proxy-trusted": [str(network) for network in cfg.proxy_trusted],
        "proxy-timeout": cfg.proxy_timeout,
        "info-line": (
            cfg.info_line.decode("utf-8", "backslashreplace") if cfg.info_line else None
        ),
        "workers": cfg.workers,
    }


def _tls_policy(cfg: Config) -> dict[str, object]:
    """The TLS policy in force, as :func:`secure_echo.tls.policy.build_context` applies it."""
    loaded = cfg.tls
    settings = loaded.settings
    modern = settings.profile is TLSProfile.MODERN
    verifying = settings.client_ca is not None and settings.client_auth is not ClientAuth.NONE
    verify = ["VERIFY_PEER"] if verifying else ["VERIFY_NONE"]
    if verifying and settings.client_auth is ClientAuth.REQUIRED:
        verify.append("VERIFY_FAIL_IF_NO_PEER_CERT")
    return {
        "profile": str(settings.profile),
        "min_version": "TLSv1.3" if modern else "TLSv1.2",
        "max_version": "TLSv1.3",
        # Under the modern profile the TLS 1.2 list is set but can never be used.
        "tls12_ciphers": [] if modern else list(TLS12_CIPHERS),
        "tls13_ciphers": list(TLS13_CIPHERS),
        "groups": list(GROUPS),
        "options": ["NO_COMPRESSION", "NO_RENEGOTIATION", "SINGLE_ECDH_USE"],
        "client_auth": str(settings.client_auth),
        "verify_mode": verify,
        "client_ca": str(settings.client_ca) if settings.client_ca else None,
        "client_ca_subjects": [ca.subject.rfc4514_string() for ca in loaded.client_cas],
        "allow_list": {
            "active": settings.allow.active,
            "cn": sorted(settings.allow.cns),
            "dns": sorted(settings.allow.dns),
            "uri": sorted(settings.allow.uris),
            "spki_sha256": sorted(settings.allow.spki_sha256),
        },
        "certificate": {
            "cert": str(settings.cert),
            "key": str(settings.key),
            "subject": loaded.subject,
            "issuer": loaded.leaf.issuer.rfc4514_string(),
            "not_before": loaded.leaf.not_valid_before_utc.isoformat(),
            "not_after": loaded.not_after.isoformat(),
            "sha256": fingerprint_sha256(loaded.leaf),
            "chain_length": len(loaded.chain),
            "development": cfg.dev_certs is not None,
        },
    }


def effective_settings(cfg: Config) -> dict[str, object]:
    """What ``--print-config`` shows: every option's value and source, and the TLS policy.

    ``options`` maps each option (the ``--config`` key) to ``{"value", "source"}``,
    the source being one of :data:`SOURCES`; ``tls`` is the policy in force.
    """
    return {
        "config_file": str(cfg.config_file) if cfg.config_file else None,
        "config_sha256": cfg.config_sha256,
        "options": {
            name: {"value": value, "source": cfg.sources.get(name, "default")}
            for name, value in _option_values(cfg).items()
        },
        "tls": _tls_policy(cfg),
    }


def print_effective_settings(cfg: Config, out: IO[str] | None = None) -> None:
    """Write :func:`effective_settings` as JSON to ``out`` (default: stdout)."""
    stream = out or sys.stdout
    stream.write(json.dumps(effective_settings(cfg), indent=2) + "\n")
    stream.flush()


def _as_tls_error(error: usage.UsageError) -> TLSConfigError:
    """The same one line as a :class:`TLSConfigError`, which a reload reports."""
    option, _, rest = str(error).partition(": ")
    problem, separator, fix = rest.rpartition("; ")
    if not separator:
        problem, fix = rest, "correct it and reload again"
    return TLSConfigError(option, problem, fix)


def reload_tls_settings(cfg: Config) -> TLSSettings:
    """Re-read ``cfg``'s config file and build the TLS settings it now asks for.

    The certificate, key, client CA, client-auth mode, profile and allow-lists come
    from the file as it is now, except where the command line gave them at start
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
        settings, _ = options.tls_settings()
    except usage.UsageError as error:
        raise _as_tls_error(options.in_file_terms(error)) from None
    return settings
