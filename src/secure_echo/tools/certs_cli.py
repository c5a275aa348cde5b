"""``secure-echo-certs``: make a test CA, server and client certificates for secure-echo.

Commands::

    secure-echo-certs init DIR [--server-name NAME]... [--client-name CN]
                               [--days N] [--ca-days N] [--force]
    secure-echo-certs client DIR --name CN [--dns NAME]... [--uri URI]...
                                 [--days N] [--out STEM] [--force]

``init`` writes ``ca.pem``, ``ca-key.pem``, ``server.pem``, ``server-key.pem``,
``client.pem`` and ``client-key.pem`` into DIR (created 0700) and prints how to use
them.  ``client`` issues one more client certificate from the CA already in DIR,
into ``STEM.pem`` and ``STEM-key.pem`` (STEM defaults to ``client-<name>``), for
testing client-certificate allow-lists.

Contract:

* Keys are written 0600 and certificates 0644, each atomically
  (:mod:`secure_echo.tools.certgen`).
* No file is overwritten unless ``--force`` is given; the check covers every
  target before anything is written, so a refusal writes nothing.
* A leaf never outlives its CA: ``client`` refuses ``--days`` beyond the CA's
  remaining validity instead of silently shortening it.
* Errors are one line on stderr, ``secure-echo-certs: error: ...``, exit status 1;
  usage errors are argparse's (status 2).  No traceback for any expected failure.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
import shlex
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from secure_echo.tools import certgen
from secure_echo.tools.devcerts import client_command

if TYPE_CHECKING:
    from collections.abc import Sequence

PROG = "secure-echo-certs"
#: Port the commands printed after ``init`` connect to: the daemon's default.
DEFAULT_PORT = 8443
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_CLIENT_NAME = "secure-echo client"
CA_COMMON_NAME = "secure-echo test CA"

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_MAX_DNS_NAME = 253


class CertsError(Exception):
    """An expected failure; ``str(error)`` is the one-line message for the user."""


@dataclass(frozen=True)
class _Target:
    """A certificate and key file pair to write, and what it is, for the summary."""

    cert: Path
    key: Path
    issued: certgen.Issued
    description: str


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``secure-echo-certs`` with ``argv`` (default ``sys.argv[1:]``); return the status.

    0 on success, 1 on an expected failure (message on stderr), 2 on a usage error.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help and on usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        if args.command == "init":
            _init(args)
        else:
            _client(args)
    except CertsError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Make a test CA and TLS certificates for secure-echo (not for production).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init",
        help="create a CA, a server and a client certificate in DIR",
        description="Create ca.pem, server.pem and client.pem with their keys in DIR.",
    )
    init.add_argument("directory", metavar="DIR", type=Path, help="where to write the files")
    init.add_argument(
        "--server-name",
        dest="server_names",
        metavar="NAME",
        action="append",
        type=_host_name,
        help="DNS name or IP address for the server certificate; repeatable "
        "(default: localhost, 127.0.0.1, ::1)",
    )
    init.add_argument(
        "--client-name",
        metavar="CN",
        default=DEFAULT_CLIENT_NAME,
        type=_common_name,
        help=f"common name of the client certificate (default: {DEFAULT_CLIENT_NAME!r})",
    )
    init.add_argument(
        "--days",
        type=_days,
        default=30,
        help="validity of the server and client certificates (default: 30)",
    )
    init.add_argument(
        "--ca-days",
        type=_days,
        default=365,
        help="validity of the CA, at least --days (default: 365)",
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")

    client = commands.add_parser(
        "client",
        help="issue another client certificate from the CA in DIR",
        description="Issue a client certificate signed by DIR/ca.pem and DIR/ca-key.pem.",
    )
    client.add_argument("directory", metavar="DIR", type=Path, help="directory holding the CA")
    client.add_argument(
        "--name", required=True, metavar="CN", type=_common_name, help="common name"
    )
    client.add_argument(
        "--dns",
        metavar="NAME",
        action="append",
        default=[],
        type=_host_name,
        help="subjectAltName DNS name or IP address; repeatable",
    )
    client.add_argument(
        "--uri",
        metavar="URI",
        action="append",
        default=[],
        type=_uri,
        help="subjectAltName URI, e.g. spiffe://example.org/ns/test/sa/client; repeatable",
    )
    client.add_argument("--days", type=_days, default=30, help="validity in days (default: 30)")
    client.add_argument(
        "--out",
        metavar="STEM",
        type=_stem,
        help="write STEM.pem and STEM-key.pem (default: client-<CN, slugified>)",
    )
    client.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def _init(args: argparse.Namespace) -> None:
    directory: Path = args.directory
    if args.ca_days < args.days:
        raise CertsError(
            f"--ca-days {args.ca_days} is shorter than --days {args.days}; "
            "a certificate cannot outlive its CA"
        )
    names: list[str] = args.server_names or list(DEFAULT_SERVER_NAMES)
    now = datetime.datetime.now(datetime.UTC)
    ca = certgen.make_ca(CA_COMMON_NAME, days=args.ca_days, now=now)
    server = certgen.issue_server(ca, names, days=args.days, now=now)
    client = certgen.issue_client(ca, args.client_name, days=args.days, now=now)
    targets = [
        _Target(directory / "ca.pem", directory / "ca-key.pem", ca, "CA"),
        _Target(
            directory / "server.pem",
            directory / "server-key.pem",
            server,
            "server, for " + ", ".join(names),
        ),
        _Target(
            directory / "client.pem",
            directory / "client-key.pem",
            client,
            f"client, CN={args.client_name}",
        ),
    ]
    _write(directory, targets, force=args.force)
    root = directory.absolute()
    host = _connect_host(names)
    print(
        _summary(targets)
        + "\n\nRun the daemon, requiring client certificates signed by this CA:\n  "
        + shlex.join(
            [
                "twistd",
                "-n",
                "secure-echo",
                "--cert",
                str(root / "server.pem"),
                "--key",
                str(root / "server-key.pem"),
                "--client-ca",
                str(root / "ca.pem"),
            ]
        )
        + "\n\nConnect with the client certificate (the daemon listens on "
        + f"{DEFAULT_PORT} unless --listen says otherwise):\n"
        + _indent(
            client_command(
                root / "ca.pem",
                host,
                DEFAULT_PORT,
                cert=root / "client.pem",
                key=root / "client-key.pem",
            )
        )
        + f"\n\nMore client certificates: {PROG} client {shlex.quote(str(root))} --name CN"
    )


def _client(args: argparse.Namespace) -> None:
    directory: Path = args.directory
    ca = _load_ca(directory)
    now = datetime.datetime.now(datetime.UTC)
    left = ca.certificate.not_valid_after_utc - now
    if left <= datetime.timedelta(0):
        raise CertsError(
            f"the CA in {directory} expired on {_date(ca)}; "
            f"run `{PROG} init --force` to replace it"
        )
    if datetime.timedelta(days=args.days) > left:
        raise CertsError(
            f"--days {args.days}: the CA in {directory} expires on {_date(ca)}, "
            f"in {left.days} days; pass a smaller --days or run `{PROG} init --force` "
            "for a new CA"
        )
    stem: str = args.out or _default_stem(args.name)
    try:
        issued = certgen.issue_client(
            ca, args.name, dns=args.dns, uris=args.uri, days=args.days, now=now
        )
    except ValueError as error:  # a name cryptography rejects despite our checks
        raise CertsError(f"cannot issue the certificate: {error}") from error
    targets = [
        _Target(
            directory / f"{stem}.pem",
            directory / f"{stem}-key.pem",
            issued,
            f"client, CN={args.name}",
        )
    ]
    _write(directory, targets, force=args.force)
    root = directory.absolute()
    print(
        _summary(targets)
        + "\n\nConnect with it:\n"
        + _indent(
            client_command(
                root / "ca.pem",
                "127.0.0.1",
                DEFAULT_PORT,
                cert=root / f"{stem}.pem",
                key=root / f"{stem}-key.pem",
            )
        )
    )


def _load_ca(directory: Path) -> certgen.Issued:
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    try:
        cert_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except FileNotFoundError as error:
        raise CertsError(
            f"{error.filename}: no such file; run `{PROG} init {directory}` first"
        ) from error
    except OSError as error:
        raise CertsError(f"cannot read {error.filename}: {_reason(error)}") from error
    try:
        return certgen.load_issued(cert_pem, key_pem)
    except ValueError as error:
        raise CertsError(
            f"{cert_path} and {key_path} are not a usable CA: {error}; "
            f"run `{PROG} init --force {directory}` to replace them"
        ) from error


def _write(directory: Path, targets: Sequence[_Target], *, force: bool) -> None:
    """Write every target, or nothing if any file exists and ``force`` is false."""
    paths = [path for target in targets for path in (target.cert, target.key)]
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        existing = [path.name for path in paths if path.exists() or path.is_symlink()]
        if existing and not force:
            raise CertsError(
                f"refusing to overwrite {', '.join(existing)} in {directory}; "
                "pass --force to replace them"
            )
        for target in targets:
            certgen.write_pair(target.issued, target.cert, target.key)
    except FileExistsError as error:
        raise CertsError(f"{error.filename} exists and is not a directory") from error
    except OSError as error:
        where = error.filename if error.filename is not None else directory
        raise CertsError(f"cannot write in {where}: {_reason(error)}") from error


def _summary(targets: Sequence[_Target]) -> str:
    lines = ["Wrote (keys 0600, certificates 0644):"]
    for target in targets:
        until = _date(target.issued)
        lines.append(f"  {target.cert}  {target.description}, valid until {until}")
        lines.append(f"  {target.key}  its private key")
    return "\n".join(lines)


def _date(issued: certgen.Issued) -> str:
    return issued.certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _connect_host(names: Sequence[str]) -> str:
    """Pick the name a client on this host should connect to: loopback if it is named."""
    for preferred in ("127.0.0.1", "localhost", "::1"):
        if preferred in names:
            return preferred
    return names[0]


def _reason(error: OSError) -> str:
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]


def _default_stem(common_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", common_name.lower()).strip("-")
    return f"client-{slug}" if slug else "client"


# argparse converters: each raises ArgumentTypeError with the reason, which argparse
# prints as "argument --x: <reason>".


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1 day")
    return value


def _host_name(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.split(".")
    if labels and labels[0] == "*":  # a wildcard is allowed as the whole leftmost label
        labels = labels[1:]
    if (
        len(text) > _MAX_DNS_NAME
        or not labels
        or not all(_LABEL.fullmatch(label) for label in labels)
    ):
        raise argparse.ArgumentTypeError(f"{text!r} is not a DNS name or an IP address")
    return text.lower()


def _common_name(text: str) -> str:
    if not 1 <= len(text) <= 64:  # noqa: PLR2004 - RFC 5280's ub-common-name
        raise argparse.ArgumentTypeError("a common name must be 1 to 64 characters")
    return text


def _uri(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if not parts.scheme or not (parts.netloc or parts.path) or not text.isascii():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an absolute ASCII URI such as spiffe://example.org/client"
        )
    return text


def _stem(text: str) -> str:
    if not _STEM.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use letters, digits, '.', '_' and '-' only, not starting with '.'"
        )
    return text
