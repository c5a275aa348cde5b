"""Command-line options and their validation, before any reactor runs.

:class:`Options` parses ``twistd secure-echo`` arguments and, in ``postOptions``,
checks every one of them, resolving them into a :class:`Config`.  Every problem is a
``usage.UsageError`` whose text is one line: the option, the problem, the fix.
Nothing here listens or starts anything; a busy port is found when the listening
service starts (see :mod:`secure_echo.service`).

Sources, lowest precedence first: the defaults declared below, a ``--config`` TOML
file (:mod:`secure_echo.configfile`; keys are the long option names), the command
line.  ``parseOptions`` reads the file before twistd's parser applies the command
line, so a command-line value always wins and a repeatable option given there
replaces the file's list.  :attr:`Config.sources` records where each value came
from; :func:`effective_settings` is what ``--print-config`` shows.
"""

from __future__ import annotations

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

from secure_echo import configfile, devcerts
from secure_echo.allowlist import AllowList, AllowListError
from secure_echo.configfile import Key, Kind, OptionValue
from secure_echo.tls import (
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
from secure_echo.tls import load_and_validate as load_tls

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


def validate_listen(description: str, backlog: int = DEFAULT_BACKLOG) -> Listen:
    """Check one ``--listen`` endpoint string and add an explicit backlog."""
    given = description
    head, sep, rest = description.partition(":")
    kind = head.strip().lower()
    # Twisted's parser wants the type in lower case; accept "TCP:8443" too.
    description = f"{kind}{sep}{rest}"
    if kind in {"ssl", "tls", "le", "lets"}:
        raise usage.UsageError(
            f"--listen {given}: TLS is added by secure-echo itself; "
            "give a plain endpoint such as tcp:8443:interface=127.0.0.1"
        )
    if kind not in _ENDPOINT_TYPES:
        raise usage.UsageError(
            f"--listen {given}: unsupported endpoint type {kind!r}; "
            "use tcp:PORT, tcp6:PORT, unix:PATH or systemd:domain=INET:index=0"
        )
    if kind in _BACKLOG_TYPES and "backlog=" not in description:
        description = f"{description}:backlog={backlog}"
    try:
        # Only parses; the reactor argument is not used until listen().
        endpoint = endpoints.serverFromString(None, description)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        if kind == "systemd" and isinstance(error, KeyError | IndexError):
            # The systemd parser looks the socket up already: none was passed.
            raise usage.UsageError(
                f"--listen {description}: systemd passed no such socket; "
                "start under socket activation or use tcp:PORT"
            ) from None
        raise usage.UsageError(
            f"--listen {given}: not a valid endpoint ({error}); e.g. tcp:8443:interface=127.0.0.1"
        ) from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:  # noqa: PLR2004 - the TCP port range
        raise usage.UsageError(
            f"--listen {given}: port {port} is out of range; give a port from 0 to 65535"
        )
    return Listen(description, kind, given)


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
        "--cert, a local development CA and certificate are made on first run."
    )

    optParameters: Any = [  # noqa: RUF012 - Twisted's declarative option tables
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        for name in _ALLOW_OPTIONS:
            self[name] = []
        self.config: Config

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

    @override
    def postOptions(self) -> None:
        self.config = self._validate()

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
        try:
            profile = TLSProfile(self["tls-profile"])
        except ValueError:
            raise usage.UsageError(
                f"--tls-profile: unknown profile {self['tls-profile']!r}; "
                "use intermediate or modern"
            ) from None
        client_auth = self._client_auth()
        settings, dev = self._tls_files(profile, client_auth)
        settings = replace(settings, allow=self._allow_list(client_auth))
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
        )

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
