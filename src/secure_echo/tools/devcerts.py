"""Development certificates: a local CA and a loopback server certificate for first runs.

When the daemon is started without ``--cert``/``--key`` it calls
:func:`ensure_dev_certs` and serves with the result, printing :func:`client_command`
so the first connection works without reading any documentation.  Never meant for
production: the names are loopback only and the CA key sits next to the certificates.

Layout of ``<state_dir>/dev-ca/`` (directory mode 0700, tightened if looser):

* ``ca.pem`` (0644): the CA certificate, valid :data:`CA_DAYS`; clients trust it.
* ``ca-key.pem`` (0600): the CA key, kept so the server certificate can be re-issued
  without changing ``ca.pem`` (which clients may already have been told to trust).
* ``server.pem`` (0644) and ``server-key.pem`` (0600): the server certificate for
  :data:`DEV_NAMES`, valid :data:`SERVER_DAYS` but never beyond the CA.
* ``.lock``: an advisory ``flock`` serialising concurrent :func:`ensure_dev_certs`.

Rules, applied under the lock on every call:

1. The CA is reused if both files parse, the key is EC and matches the certificate,
   the key file is not readable by group or others, the certificate is a CA, and it
   is already valid and stays valid for at least :data:`RENEW_BEFORE`.  Otherwise
   everything is regenerated (clients must then trust the new ``ca.pem``).
2. The server pair is reused if the same checks pass for it, it was signed by the
   current CA and it names every entry of :data:`DEV_NAMES`.  Otherwise it is
   re-issued from the current CA and ``ca.pem`` is left untouched.
3. Each file is written atomically (:mod:`secure_echo.tools.certgen`), keys 0600 from
   creation on.  A crash between two files leaves a set that rule 1 or 2 repairs
   on the next call.
4. Filesystem failures become :class:`DevCertsError` with a one-line message that
   names the directory, the problem and the fix; no :class:`OSError` escapes.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import ipaddress
import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from secure_echo.tools import certgen

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Names the development server certificate is valid for.
DEV_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
#: Lifetime of a newly made development CA.
CA_DAYS = 365
#: Lifetime of a newly issued development server certificate (capped at the CA's).
SERVER_DAYS = 90
#: A certificate with less validity left than this is replaced.
RENEW_BEFORE = datetime.timedelta(days=7)
#: Common name of the development CA, to which the date and a random tag are added
#: (:func:`certgen.distinct_ca_name`) so no two development CAs look alike.
CA_COMMON_NAME = "secure-echo development CA"

_FIX = "set --state-dir to a writable directory or pass --cert/--key"


class DevCertsError(Exception):
    """The development certificates could not be created or read.

    ``str(error)`` is one line naming the directory, the problem and the fix.
    """


@dataclass(frozen=True)
class DevCerts:
    """Where the development certificates are, and whether this call wrote them.

    ``created`` is true if this call wrote any file (first run, re-issue or
    regeneration); false if every file was reused as it was.
    """

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    created: bool


def default_state_dir() -> Path:
    """Return the directory that holds the daemon's state, ``dev-ca/`` included.

    In order: the first entry of ``$STATE_DIRECTORY`` (set by systemd's
    ``StateDirectory=``; colon-separated when several are configured), then
    ``$XDG_STATE_HOME/secure-echo`` if that variable is an absolute path (the XDG
    spec says relative values are to be ignored), then
    ``~/.local/state/secure-echo``.  Nothing is created.  Raises
    :class:`DevCertsError` if none can be determined (no home directory).
    """
    systemd = os.environ.get("STATE_DIRECTORY", "")
    for entry in systemd.split(":"):
        if entry:
            return Path(entry)
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "secure-echo"
    home = Path(os.path.expanduser("~"))  # noqa: PTH111 - Path.home() raises on 3.12+
    if not home.is_absolute():
        raise DevCertsError(
            "cannot choose a directory for development certificates: no home directory "
            f"and neither $STATE_DIRECTORY nor $XDG_STATE_HOME is set; {_FIX}"
        )
    return home / ".local" / "state" / "secure-echo"


def server_paths(state_dir: Path) -> tuple[Path, Path]:
    """Where :func:`ensure_dev_certs` keeps the server certificate and key under ``state_dir``.

    Pure: nothing is read or made, so options can name the files before they exist.
    """
    paths = _Paths(state_dir / "dev-ca")
    return paths.server_cert, paths.server_key


def ensure_dev_certs(state_dir: Path, *, now: datetime.datetime | None = None) -> DevCerts:
    """Make, repair or reuse the development CA and server certificate under ``state_dir``.

    ``now`` (timezone-aware; default the current time) is the moment validity is
    judged at and new certificates start from.  See the module docstring for the
    layout and the rules.  Safe to call from several processes at once.  Raises
    :class:`DevCertsError` (one line) on any filesystem failure.
    """
    moment = now if now is not None else datetime.datetime.now(datetime.UTC)
    if moment.tzinfo is None:
        msg = "now must be timezone-aware"
        raise ValueError(msg)
    directory = state_dir / "dev-ca"
    paths = _Paths(directory)
    try:
        _make_private_directory(directory)
        with _locked(directory / ".lock"):
            created = _ensure(paths, moment)
    except OSError as error:
        raise DevCertsError(_describe(directory, error)) from error
    return DevCerts(
        directory=directory,
        ca_cert=paths.ca_cert,
        server_cert=paths.server_cert,
        server_key=paths.server_key,
        created=created,
    )


def client_command(
    ca_cert: Path,
    host: str,
    port: int,
    *,
    cert: Path | None = None,
    key: Path | None = None,
) -> str:
    """Return ready-to-paste shell commands, one per line, that talk to the daemon.

    The first line uses ``secure-echo-client``, the second ``openssl s_client``
    (which, unlike its default, fails on a verification error and checks the name).
    Both trust ``ca_cert`` and, if ``cert`` and ``key`` are given, present that client
    certificate.  An unspecified listening address (``0.0.0.0``, ``::``, empty) is
    replaced by the matching loopback address, which a client can connect to and
    the development certificate names.  Every argument is quoted with
    :func:`shlex.quote`.
    """
    target = _connect_host(host)
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
            target
        )
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address):
        authority = f"[{target}]:{port}"
    else:
        authority = f"{target}:{port}"
    client = ["secure-echo-client", authority, "--ca", str(ca_cert)]
    openssl = ["openssl", "s_client", "-connect", authority, "-CAfile", str(ca_cert)]
    if cert is not None:
        client += ["--cert", str(cert)]
        openssl += ["-cert", str(cert)]
    if key is not None:
        client += ["--key", str(key)]
        openssl += ["-key", str(key)]
    if address is None:
        openssl += ["-servername", target, "-verify_hostname", target]
    else:
        openssl += ["-verify_ip", target]
    openssl += ["-verify_return_error", "-quiet", "-no_ign_eof"]
    return "\n".join(shlex.join(command) for command in (client, openssl))


def _connect_host(host: str) -> str:
    """Map an unspecified listening address to the loopback address of its family."""
    if host in {"", "0.0.0.0"}:  # noqa: S104 - recognising the wildcard, not binding it
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


@dataclass(frozen=True)
class _Paths:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"


def _make_private_directory(directory: Path) -> None:
    """Create ``directory`` (and parents) with mode 0700, or tighten ours to 0700.

    A directory owned by another user is refused: whoever owns it can replace the
    keys we would serve with.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid():
        raise PermissionError(
            errno.EPERM, "the directory is owned by another user", os.fspath(directory)
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        directory.chmod(0o700)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _ensure(paths: _Paths, now: datetime.datetime) -> bool:
    """Apply the module's rules 1-3 in ``paths``; return whether anything was written."""
    ca = _reusable_ca(paths, now)
    regenerate = ca is None
    if ca is None:
        name = certgen.distinct_ca_name(CA_COMMON_NAME, now=now)
        ca = certgen.make_ca(name, days=CA_DAYS, now=now)
        certgen.write_pair(ca, paths.ca_cert, paths.ca_key)
    if not regenerate and _reusable_server(paths, ca, now):
        return False
    ca_left = ca.certificate.not_valid_after_utc - now
    days = min(SERVER_DAYS, ca_left.days)
    server = certgen.issue_server(ca, DEV_NAMES, days=days, now=now)
    certgen.write_pair(server, paths.server_cert, paths.server_key)
    return True


def _reusable_ca(paths: _Paths, now: datetime.datetime) -> certgen.Issued | None:
    ca = _load(paths.ca_cert, paths.ca_key)
    if ca is None or not _fresh(ca.certificate, now):
        return None
    try:
        constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return None
    return ca if constraints.value.ca else None


def _reusable_server(paths: _Paths, ca: certgen.Issued, now: datetime.datetime) -> bool:
    server = _load(paths.server_cert, paths.server_key)
    if server is None or not _fresh(server.certificate, now):
        return False
    try:
        server.certificate.verify_directly_issued_by(ca.certificate)
        san = server.certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    named = {*san.get_values_for_type(x509.DNSName)}
    named |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return named.issuperset(_canonical(name) for name in DEV_NAMES)


def _canonical(name: str) -> str:
    """Spell an IP address as :class:`ipaddress` prints it; leave DNS names alone."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _fresh(certificate: x509.Certificate, now: datetime.datetime) -> bool:
    return (
        certificate.not_valid_before_utc <= now
        and certificate.not_valid_after_utc - now >= RENEW_BEFORE
    )


def _load(cert_path: Path, key_path: Path) -> certgen.Issued | None:
    """Return the pair if both files exist, parse, match and the key is private to us.

    A missing, corrupt or mismatched pair is ``None`` (to be replaced); any other
    :class:`OSError` (say, permission denied) propagates, since overwriting what we
    cannot read would fail the same way or destroy something we do not own.
    """
    try:
        key_mode = stat.S_IMODE(key_path.stat().st_mode)
        cert_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except FileNotFoundError:
        return None
    if key_mode & 0o077:
        return None
    try:
        return certgen.load_issued(cert_pem, key_pem)
    except ValueError:
        return None


def _describe(directory: Path, error: OSError) -> str:
    """One line: the directory, what went wrong, and the fix."""
    if isinstance(error, FileExistsError):
        reason = f"{error.filename} exists and is not a directory"
    elif error.strerror:
        reason = error.strerror[0].lower() + error.strerror[1:]
    else:
        reason = str(error)
    return f"cannot create development certificates in {directory}: {reason}; {_FIX}"
