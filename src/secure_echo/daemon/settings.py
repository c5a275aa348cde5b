"""The daemon's settings: every option checked and resolved into plain values.

:func:`validate` turns the raw option values (``usage.Options`` holds them as
strings and lists) into a frozen :class:`Settings`, or raises a one-line
``usage.UsageError``: the option, the problem, the fix.  It reads no TLS file and
makes no certificate: that is the load step's job
(:mod:`secure_echo.daemon.load`), so options stay plain data that can be printed,
compared and passed to a worker process.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from twisted.internet import endpoints
from twisted.python import usage

from secure_echo.daemon.configfile import Key, Kind, OptionValue
from secure_echo.tls.allowlist import AllowList, AllowListError
from secure_echo.tls.policy import ClientAuth, TLSProfile, TLSSettings
from secure_echo.tools import devcerts

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

DEFAULT_LISTEN: Final = "tcp:8443:interface=127.0.0.1"
#: Enough for a burst of a few thousand connects; the kernel caps it at
#: net.core.somaxconn.
DEFAULT_BACKLOG: Final = 4096
_ENDPOINT_TYPES: Final = frozenset({"tcp", "tcp6", "unix", "systemd"})
_BACKLOG_TYPES: Final = frozenset({"tcp", "tcp6", "unix"})
ALLOW_OPTIONS: Final = ("allow-cn", "allow-dns", "allow-uri", "allow-spki-sha256")
REPEATABLE: Final = ("listen", "cert", "key", "crl", "alpn", *ALLOW_OPTIONS, "proxy-trusted")
#: The longest ALPN protocol name: its length is one byte on the wire (RFC 7301).
MAX_ALPN_BYTES: Final = 255
PROXY_PROTOCOL_MODES: Final = ("off", "optional", "required")
LOG_STDOUT_FORMATS: Final = ("json", "text")
ON_OFF: Final = ("on", "off")
#: ``--workers``: processes that accept on the shared listening sockets.
MAX_WORKERS: Final = 64
#: ``--worker-watchdog``: at least two of a worker's heartbeats, which come every
#: second (:data:`secure_echo.pool.contract.HEARTBEAT_INTERVAL`).
MIN_WORKER_WATCHDOG: Final = 2.0

#: Every key a ``--config`` file may hold: each option but the command-line-only
#: ones (``config``, ``print-config``), with its TOML kind and an example value.
FILE_KEYS: Final[Mapping[str, Key]] = MappingProxyType(
    {
        "listen": Key(Kind.STRINGS, f'["{DEFAULT_LISTEN}"]'),
        "backlog": Key(Kind.INTEGER, str(DEFAULT_BACKLOG)),
        "cert": Key(Kind.PATHS, '["/etc/secure-echo/server.pem", "/etc/secure-echo/other.pem"]'),
        "key": Key(
            Kind.PATHS, '["/etc/secure-echo/server-key.pem", "/etc/secure-echo/other-key.pem"]'
        ),
        "test-certs": Key(Kind.PATH, '"/etc/secure-echo/test-certs"'),
        "strict-sni": Key(Kind.FLAG, "false"),
        "alpn": Key(Kind.STRINGS, '["h2", "http/1.1"]'),
        "client-ca": Key(Kind.PATH, '"/etc/secure-echo/client-ca.pem"'),
        "client-auth": Key(Kind.STRING, '"required"'),
        "crl": Key(Kind.PATHS, '["/etc/secure-echo/client-ca.crl.pem"]'),
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
        "client-hello": Key(Kind.STRING, '"on"'),
        "workers": Key(Kind.INTEGER, "1"),
        "worker-watchdog": Key(Kind.NUMBER_OR_OFF, "10"),
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


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every option, checked: plain values, nothing read or built yet.

    :func:`secure_echo.daemon.load.load` turns these into a
    :class:`~secure_echo.daemon.load.Config` (files read, contexts built).
    """

    listens: tuple[Listen, ...]
    #: The TLS files and policy asked for (with no ``--cert``: the development
    #: certificate's paths under ``dev_state_dir``, made by the load step).
    tls_settings: TLSSettings
    max_line_length: int
    max_pending: int
    handshake_timeout: float
    handler_timeout: float
    log_file: Path | None
    log_max_bytes: int
    log_keep: int
    #: No ``--cert``: where the development CA and certificate live (or will).
    dev_state_dir: Path | None
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
    #: ``--client-hello``: read each client's ClientHello into its record
    #: (``client_hello``, ``ja4``, and the failure hints that compare offers).
    client_hello: bool = True
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
    #: ``--worker-watchdog``: seconds a worker may go without a heartbeat before
    #: the supervisor kills and restarts it (0: never).
    worker_watchdog: float = 10.0


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


def _workers(value: str, max_connections: str = "0") -> int:
    """``--workers``: a whole number from 1 to :data:`MAX_WORKERS`.

    ``--max-connections`` is the pool's total, split across the workers: each must
    get at least one.
    """
    number = _positive_int("workers", value)
    if number > MAX_WORKERS:
        raise usage.UsageError(
            f"--workers: {number} is too many; give at most {MAX_WORKERS} "
            "(about one per CPU core is enough)"
        )
    total = _count_or_off("max-connections", max_connections)
    if 0 < total < number:
        raise usage.UsageError(
            f"--max-connections: {total} cannot be split across {number} workers; "
            f"give at least {number} (it is the whole pool's limit)"
        )
    return number


def _worker_watchdog(value: str) -> float:
    """``--worker-watchdog``: off (0), or at least :data:`MIN_WORKER_WATCHDOG` seconds."""
    seconds = _seconds_or_off("worker-watchdog", value)
    if 0 < seconds < MIN_WORKER_WATCHDOG:
        raise usage.UsageError(
            f"--worker-watchdog: {value} s is shorter than two heartbeats; give at least "
            f"{MIN_WORKER_WATCHDOG:g}, or 0 to switch it off"
        )
    return seconds


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


def _paths(value: Sequence[str]) -> list[str]:
    """A repeatable path option's values (a list: Options keeps one for each)."""
    return [str(item) for item in value]


def _certificate_pairs(values: Mapping[str, Any]) -> list[tuple[Path, Path]]:
    """``--cert``/``--key`` paired by position: the n-th key belongs to the n-th cert.

    A certificate without a key of its own (fewer ``--key`` than ``--cert``) reads its
    key from the certificate file.
    """
    certs, keys = _paths(values["cert"]), _paths(values["key"])
    if keys and not certs:
        raise usage.UsageError(
            "--key: given without --cert; add --cert with the matching certificate"
        )
    for name, given in (("cert", certs), ("key", keys)):
        if "" in given:
            raise usage.UsageError(
                f"--{name}: an empty path; give the path of a PEM file"
                + (" or leave the option out" if name == "key" else "")
            )
    if len(keys) > len(certs):
        raise usage.UsageError(
            f"--key: {len(keys)} keys for {len(certs)} "
            f"certificate{'s' if len(certs) != 1 else ''}; the n-th --key belongs to the "
            "n-th --cert, so drop the extra --key or add the --cert it belongs to"
        )
    pairs = []
    for index, cert in enumerate(certs):
        key = keys[index] if index < len(keys) else cert
        pairs.append((Path(cert).expanduser(), Path(key).expanduser()))
    return pairs


def _crls(values: Mapping[str, Any], client_auth: ClientAuth) -> tuple[Path, ...]:
    """``--crl``: revocation lists, which only mean something when clients are verified."""
    crls = _paths(values["crl"])
    if not crls:
        return ()
    if "" in crls:
        raise usage.UsageError("--crl: an empty path; give the path of a PEM CRL file")
    if not values["client-ca"]:
        raise usage.UsageError(
            "--crl: revocation lists apply to client certificates, and none are "
            "checked; add --client-ca CA.pem (the CA that issued them and the CRL)"
        )
    if client_auth is ClientAuth.NONE:
        raise usage.UsageError(
            "--crl: --client-auth none checks no client certificate; "
            "use --client-auth required (or optional), or drop --crl"
        )
    return tuple(Path(crl).expanduser() for crl in crls)


def _alpn(values: Mapping[str, Any]) -> tuple[bytes, ...]:
    """``--alpn``: protocol names, most preferred first, each 1 to 255 bytes."""
    protocols: list[bytes] = []
    for value in values["alpn"] or ():
        # Command-line bytes that are not UTF-8 arrive as surrogates: give them back.
        name = str(value).encode("utf-8", "surrogateescape")
        if not name or len(name) > MAX_ALPN_BYTES:
            raise usage.UsageError(
                f"--alpn: {value!r} is {len(name)} bytes; a protocol name is 1 to "
                f"{MAX_ALPN_BYTES} bytes, such as h2 or http/1.1"
            )
        if b"," in name:
            raise usage.UsageError(
                f"--alpn: {value!r} holds a comma; give each protocol as its own --alpn "
                "(--alpn h2 --alpn http/1.1)"
            )
        if name not in protocols:
            protocols.append(name)
    return tuple(protocols)


def tls_settings(values: Mapping[str, Any]) -> tuple[TLSSettings, Path | None]:
    """The TLS options, validated into settings, and the dev-certificate directory.

    The first ``--cert``/``--key`` pair is the default certificate, the others are
    chosen by the client's server name (``extra_certs``).  Without ``--cert`` the
    settings name the development certificate's files under the state directory
    (returned second); they are made by the load step, not here.
    """
    try:
        profile = TLSProfile(values["tls-profile"])
    except ValueError:
        raise usage.UsageError(
            f"--tls-profile: unknown profile {values['tls-profile']!r}; use intermediate or modern"
        ) from None
    client_auth = _client_auth(values)
    client_ca = Path(values["client-ca"]).expanduser() if values["client-ca"] else None
    allow = _allow_list(values, client_auth)
    pairs = _certificate_pairs(values)
    crls = _crls(values, client_auth)
    alpn = _alpn(values)
    test_certs = Path(values["test-certs"]).expanduser() if values["test-certs"] else None
    state_dir = None
    if not pairs:
        try:
            state_dir = (
                Path(values["state-dir"]).expanduser()
                if values["state-dir"]
                else devcerts.default_state_dir()
            )
        except devcerts.DevCertsError as error:
            raise usage.UsageError(f"--state-dir: {error}") from None
        pairs = [devcerts.server_paths(state_dir)]
    (cert, key), *others = pairs
    settings = TLSSettings(
        cert,
        key,
        client_ca,
        client_auth,
        profile,
        allow,
        extra_certs=tuple(others),
        crls=crls,
        alpn=alpn,
        test_certs=test_certs,
        strict_sni=bool(values["strict-sni"]),
    )
    return settings, state_dir


def validate(
    values: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    config_sha256: str | None = None,
    sources: Mapping[str, str] | None = None,
    command_line: Mapping[str, OptionValue] | None = None,
) -> Settings:
    """Check every option in ``values`` (``usage.Options``' raw values) into :class:`Settings`."""
    backlog = _positive_int("backlog", values["backlog"])
    listens = tuple(validate_listen(d, backlog) for d in (values["listen"] or [DEFAULT_LISTEN]))
    max_line_length = _positive_int("max-line-length", values["max-line-length"])
    tls, dev_state_dir = tls_settings(values)
    metrics = validate_endpoint(values["metrics"], "metrics")[0] if values["metrics"] else None
    proxy_protocol, proxy_trusted = _proxy(values)
    log_stdout = values["log-stdout"]
    return Settings(
        listens=listens,
        tls_settings=tls,
        dev_state_dir=dev_state_dir,
        max_line_length=max_line_length,
        max_pending=_positive_int("max-pending", values["max-pending"], minimum=2),
        handshake_timeout=_positive_float("handshake-timeout", values["handshake-timeout"]),
        handler_timeout=_positive_float("handler-timeout", values["handler-timeout"]),
        log_file=_log_path(values["log-file"]) if values["log-file"] else None,
        log_max_bytes=_positive_int("log-max-bytes", values["log-max-bytes"], minimum=4096),
        log_keep=_positive_int("log-keep", values["log-keep"]),
        idle_timeout=_seconds_or_off("idle-timeout", values["idle-timeout"]),
        write_stall_timeout=_seconds_or_off("write-stall-timeout", values["write-stall-timeout"]),
        max_connection_age=_seconds_or_off("max-connection-age", values["max-connection-age"]),
        max_connections=_count_or_off("max-connections", values["max-connections"]),
        max_connections_per_ip=_count_or_off(
            "max-connections-per-ip", values["max-connections-per-ip"]
        ),
        drain_timeout=_positive_float("drain-timeout", values["drain-timeout"]),
        reload_interval=_seconds_or_off("reload-interval", values["reload-interval"]),
        expiry_warning_days=_positive_float("expiry-warning-days", values["expiry-warning-days"]),
        metrics=metrics,
        proxy_protocol=proxy_protocol,
        proxy_trusted=proxy_trusted,
        proxy_timeout=_positive_float("proxy-timeout", values["proxy-timeout"]),
        log_stdout=(_choice("log-stdout", log_stdout, LOG_STDOUT_FORMATS) if log_stdout else None),
        info_line=_info_line(values["info-line"], max_line_length),
        client_hello=_choice("client-hello", values["client-hello"], ON_OFF) == "on",
        backlog=backlog,
        config_file=config_file,
        config_sha256=config_sha256,
        sources=MappingProxyType(dict(sources or {})),
        command_line=MappingProxyType(dict(command_line or {})),
        workers=_workers(values["workers"], values["max-connections"]),
        worker_watchdog=_worker_watchdog(values["worker-watchdog"]),
    )


def _proxy(
    values: Mapping[str, Any],
) -> tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
    mode = _choice("proxy-protocol", values["proxy-protocol"], PROXY_PROTOCOL_MODES)
    trusted = tuple(_network(value) for value in values["proxy-trusted"])
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


def _allow_list(values: Mapping[str, Any], client_auth: ClientAuth) -> AllowList:
    given = [name for name in ALLOW_OPTIONS if values[name]]
    if given and client_auth is ClientAuth.NONE:
        raise usage.UsageError(
            f"--{given[0]}: allow-lists apply to client certificates; "
            "add --client-ca CA.pem (and --client-auth required)"
        )
    try:
        return AllowList.build(
            cns=values["allow-cn"],
            dns=values["allow-dns"],
            uris=values["allow-uri"],
            spki=values["allow-spki-sha256"],
        )
    except AllowListError as error:
        raise usage.UsageError(str(error)) from None


def _client_auth(values: Mapping[str, Any]) -> ClientAuth:
    value = values["client-auth"]
    if value is None:
        return ClientAuth.REQUIRED if values["client-ca"] else ClientAuth.NONE
    try:
        auth = ClientAuth(value)
    except ValueError:
        raise usage.UsageError(
            f"--client-auth: unknown mode {value!r}; use none, optional or required"
        ) from None
    if auth is not ClientAuth.NONE and not values["client-ca"]:
        raise usage.UsageError(
            f"--client-auth {auth}: no CA to verify client certificates against; "
            "add --client-ca CA.pem"
        )
    return auth


def option_values(cfg: Settings) -> dict[str, object]:
    """Every file-settable option's effective value, as JSON-ready data.

    Keyed like :data:`FILE_KEYS`.  Values are the checked ones (numbers as numbers,
    the backlog added to each listen), so two settings compare equal per key when
    they would run the same.  ``--print-config`` shows them, and
    a reload compares them (:mod:`secure_echo.daemon.restart`).
    """
    settings = cfg.tls_settings
    allow = settings.allow
    return {
        "listen": [listen.description for listen in cfg.listens],
        "backlog": cfg.backlog,
        "cert": [str(settings.cert), *(str(cert) for cert, _ in settings.extra_certs)],
        "key": [str(settings.key), *(str(key) for _, key in settings.extra_certs)],
        "test-certs": str(settings.test_certs) if settings.test_certs else None,
        "strict-sni": settings.strict_sni,
        "alpn": [name.decode("utf-8", "backslashreplace") for name in settings.alpn],
        "client-ca": str(settings.client_ca) if settings.client_ca else None,
        "client-auth": str(settings.client_auth),
        "crl": [str(crl) for crl in settings.crls],
        "tls-profile": str(settings.profile),
        "allow-cn": sorted(allow.cns),
        "allow-dns": sorted(allow.dns),
        "allow-uri": sorted(allow.uris),
        "allow-spki-sha256": sorted(allow.spki_sha256),
        "state-dir": str(cfg.dev_state_dir) if cfg.dev_state_dir else None,
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
        "client-hello": "on" if cfg.client_hello else "off",
        "workers": cfg.workers,
        "worker-watchdog": cfg.worker_watchdog,
    }
