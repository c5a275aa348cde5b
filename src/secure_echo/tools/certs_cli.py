"""``secure-echo-certs``: make test CAs and certificates for secure-echo and its clients.

Commands::

    secure-echo-certs init DIR [--server-name NAME]... [--client-name CN]
                               [--days N] [--ca-days N] [--force]
    secure-echo-certs server NAME... --ca DIR [--days N] [--out STEM] [--force]
    secure-echo-certs client NAME --ca DIR [--dns NAME]... [--uri URI]...
                                  [--days N] [--out STEM] [--force]
    secure-echo-certs client DIR --name CN [same options]        (the older spelling)
    secure-echo-certs badssl DIR [--force]

``init`` writes ``ca.pem``, ``ca-key.pem``, ``server.pem``, ``server-key.pem``,
``client.pem`` and ``client-key.pem`` into DIR (created 0700) and prints how to use
them.  ``server`` and ``client`` issue more certificates from the CA already in DIR
(the one ``init`` made), into ``STEM.pem`` and ``STEM-key.pem`` in DIR (STEM defaults
to ``server-<first name>`` or ``client-<name>``, slugified): server certificates for
other names, client certificates for testing client-certificate allow-lists.
``badssl`` writes a CA of its own and the test certificates of
:mod:`secure_echo.tools.badssl` (``CASE.localhost.pem`` + ``.key``), with a
``README.txt`` saying what a verifying client must report for each.

Contract:

* Every CA made gets a subject no other CA has (:func:`certgen.distinct_ca_name`), so
  two test CAs never look alike in a trust store or to a chain builder.
* Keys are written 0600 and certificates 0644, each atomically
  (:mod:`secure_echo.tools.certgen`).
* No file is overwritten unless ``--force`` is given; the check covers every
  target before anything is written, so a refusal writes nothing.
* A leaf never outlives its CA: ``server`` and ``client`` refuse ``--days`` beyond the
  CA's remaining validity instead of silently shortening it.
* Printed daemon commands carry ``--pidfile=``, so pasting one leaves no pid file.
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
from typing import TYPE_CHECKING, NoReturn

from secure_echo.tools import badssl, certgen
from secure_echo.tools.devcerts import client_command

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

PROG = "secure-echo-certs"
#: Port the commands printed after ``init`` connect to: the daemon's default.
DEFAULT_PORT = 8443
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_CLIENT_NAME = "secure-echo client"
CA_COMMON_NAME = "secure-echo test CA"
#: How printed commands start the daemon: in the foreground, leaving no pid file.
_TWISTD = ("twistd", "-n", "--pidfile=", "secure-echo")

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
    if args.command == "client":
        try:
            _resolve_client_form(args)
        except SystemExit as exit_:  # the client subcommand's usage error
            return exit_.code if isinstance(exit_.code, int) else 2
    try:
        _COMMANDS[args.command](args)
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

    server = commands.add_parser(
        "server",
        help="issue another server certificate from the CA in DIR",
        description="Issue a server certificate for NAME... signed by DIR/ca.pem and "
        "DIR/ca-key.pem (the CA that init wrote).",
    )
    server.add_argument(
        "names",
        metavar="NAME",
        nargs="+",
        type=_host_name,
        help="DNS name or IP address the certificate is for; the first is its common name",
    )
    server.add_argument(
        "--ca", required=True, metavar="DIR", type=Path, help="directory holding the CA"
    )
    server.add_argument("--days", type=_days, default=30, help="validity in days (default: 30)")
    server.add_argument(
        "--out",
        metavar="STEM",
        type=_stem,
        help="write DIR/STEM.pem and DIR/STEM-key.pem (default: server-<first NAME, slugified>)",
    )
    server.add_argument("--force", action="store_true", help="overwrite existing files")

    client = commands.add_parser(
        "client",
        help="issue another client certificate from the CA in DIR",
        usage=f"{PROG} client (NAME --ca DIR | DIR --name CN) [options]",
        description="Issue a client certificate with common name NAME, signed by "
        "DIR/ca.pem and DIR/ca-key.pem.  The older spelling 'client DIR --name CN' "
        "does the same.",
    )
    client.add_argument(
        "target", metavar="NAME", help="common name of the certificate (with --ca DIR)"
    )
    client.add_argument("--ca", metavar="DIR", type=Path, help="directory holding the CA")
    client.add_argument("--name", metavar="CN", type=_common_name, help=argparse.SUPPRESS)
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
        help="write DIR/STEM.pem and DIR/STEM-key.pem (default: client-<NAME, slugified>)",
    )
    client.add_argument("--force", action="store_true", help="overwrite existing files")
    client.set_defaults(usage_error=client.error)

    bad = commands.add_parser(
        "badssl",
        help="make test certificates a verifying client must refuse (and one it accepts)",
        description="Write DIR/ca.pem (with ca-key.pem) and, for each case, "
        "CASE.localhost.pem + CASE.localhost.key, to be served for the SNI name "
        "CASE.localhost: " + ", ".join(case.name for case in badssl.CASES) + ".",
    )
    bad.add_argument("directory", metavar="DIR", type=Path, help="where to write the files")
    bad.add_argument("--force", action="store_true", help="overwrite existing files")
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
    ca = certgen.make_ca(
        certgen.distinct_ca_name(CA_COMMON_NAME, now=now), days=args.ca_days, now=now
    )
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
                *_TWISTD,
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
        + "\n\nMore certificates from this CA:\n"
        + f"  {PROG} server NAME... --ca {shlex.quote(str(root))}\n"
        + f"  {PROG} client NAME --ca {shlex.quote(str(root))}"
    )


def _resolve_client_form(args: argparse.Namespace) -> None:
    """Turn either spelling of ``client`` into ``directory`` and ``name``.

    ``client NAME --ca DIR`` and the older ``client DIR --name CN`` mean the same;
    giving both ``--ca`` and ``--name``, or neither, is a usage error: the subcommand's
    parser prints it and raises :class:`SystemExit` (status 2).
    """
    usage_error: Callable[[str], NoReturn] = args.usage_error
    if (args.ca is None) == (args.name is None):
        which = "both --ca and --name" if args.ca is not None else "neither --ca nor --name"
        usage_error(
            f"{which} given; use '{PROG} client NAME --ca DIR' "
            f"(or the older '{PROG} client DIR --name CN')"
        )
    if args.ca is None:
        args.directory = Path(args.target)
        return
    try:
        args.name = _common_name(args.target)
    except argparse.ArgumentTypeError as problem:
        usage_error(f"argument NAME: {problem}")
    args.directory = args.ca


def _issuing_ca(directory: Path, days: int, now: datetime.datetime) -> certgen.Issued:
    """Load the CA in ``directory`` and check that a leaf of ``days`` fits inside it."""
    ca = _load_ca(directory)
    left = ca.certificate.not_valid_after_utc - now
    if left <= datetime.timedelta(0):
        raise CertsError(
            f"the CA in {directory} expired on {_date(ca)}; "
            f"run `{PROG} init --force` to replace it"
        )
    if datetime.timedelta(days=days) > left:
        raise CertsError(
            f"--days {days}: the CA in {directory} expires on {_date(ca)}, "
            f"in {left.days} days; pass a smaller --days or run `{PROG} init --force` "
            "for a new CA"
        )
    return ca


def _client(args: argparse.Namespace) -> None:
    directory: Path = args.directory
    now = datetime.datetime.now(datetime.UTC)
    ca = _issuing_ca(directory, args.days, now)
    stem: str = args.out or _default_stem("client", args.name)
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


def _server(args: argparse.Namespace) -> None:
    directory: Path = args.ca
    names: list[str] = args.names
    now = datetime.datetime.now(datetime.UTC)
    ca = _issuing_ca(directory, args.days, now)
    stem: str = args.out or _default_stem("server", names[0])
    try:
        issued = certgen.issue_server(ca, names, days=args.days, now=now)
    except ValueError as error:  # a name cryptography rejects despite our checks
        raise CertsError(f"cannot issue the certificate: {error}") from error
    cert, key = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    targets = [_Target(cert, key, issued, "server, for " + ", ".join(names))]
    _write(directory, targets, force=args.force)
    root = directory.absolute()
    print(
        _summary(targets)
        + "\n\nServe it:\n  "
        + shlex.join(
            [
                *_TWISTD,
                "--cert",
                str(root / f"{stem}.pem"),
                "--key",
                str(root / f"{stem}-key.pem"),
            ]
        )
        + "\n\nConnect to it:\n"
        + _indent(client_command(root / "ca.pem", _connect_host(names), DEFAULT_PORT))
    )


def _badssl(args: argparse.Namespace) -> None:
    directory: Path = args.directory
    now = datetime.datetime.now(datetime.UTC)
    made = badssl.make_set(now=now)
    targets = [_Target(directory / "ca.pem", directory / "ca-key.pem", made.ca, "CA")]
    targets += [
        _Target(
            directory / f"{case.server_name}.pem",
            directory / f"{case.server_name}.key",
            made.certificates[case.name],
            f"{case.name}: {case.problem}",
        )
        for case in badssl.CASES
    ]
    root = directory.absolute()
    index = directory / "README.txt"
    _write(
        directory,
        targets,
        force=args.force,
        extra={index: badssl.index_text(now, str(root)).encode()},
    )
    quoted = shlex.quote(str(root))
    print(
        _summary(targets)
        + f"\n  {index}  what each case is and what a client must say"
        + "\n\nServe each for its SNI name CASE.localhost:\n  "
        + shlex.join([*_TWISTD, "--test-certs", str(root)])
        + "\n\nThen a verifying client trusting ca.pem must:\n"
        + "\n".join(f"  {case.server_name}: {case.expectation}" for case in badssl.CASES)
        + "\n\nFor example:\n  "
        + shlex.join(
            [
                "secure-echo-client",
                "check",
                f"127.0.0.1:{DEFAULT_PORT}",
                "--servername",
                "expired.localhost",
                "--ca",
                str(root / "ca.pem"),
            ]
        )
        + f"\n\n(docs/testing-clients.md shows openssl, curl and Python; {quoted}/README.txt"
        " lists the cases.)"
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


def _write(
    directory: Path,
    targets: Sequence[_Target],
    *,
    force: bool,
    extra: Mapping[Path, bytes] | None = None,
) -> None:
    """Write every target and the ``extra`` public files, or nothing at all.

    Nothing is written if any of the files exists and ``force`` is false.
    """
    documents = dict(extra or {})
    paths = [path for target in targets for path in (target.cert, target.key)]
    paths += list(documents)
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
        for path, data in documents.items():
            certgen.write_public(path, data)
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


def _default_stem(kind: str, name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{kind}-{slug}" if slug else kind


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


#: What each command runs once its arguments are parsed.
_COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "init": _init,
    "server": _server,
    "client": _client,
    "badssl": _badssl,
}
