"""Tests for ``contrib/systemd/secure-echo.socket`` and the service it activates.

Without systemd: the socket unit's settings, and that the ``--listen`` string its
comment gives is one Twisted's ``systemd`` endpoint parser accepts.  With
``systemd-analyze``: the socket unit, the service unit, and the service with the
lines socket activation and ``Type=notify`` add (:data:`NOTIFY_LINES`) all verify
silently, and the service stays sandboxed (exposure at most :data:`MAX_EXPOSURE`).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Final

from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactor
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

UNITS: Final = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
SOCKET_UNIT: Final = UNITS / "secure-echo.socket"
SERVICE_UNIT: Final = UNITS / "secure-echo.service"
#: Where the service unit expects twistd (see its header comment).
TWISTD: Final = "/usr/local/bin/twistd"
#: The worst ``systemd-analyze security`` exposure the service may have (0 best, 10 worst).
MAX_EXPOSURE: Final = 2.0
#: The endpoint the socket unit's comment tells the service to listen on.
SYSTEMD_LISTEN: Final = "systemd:domain=INET:name=secure-echo"
#: ``[Service]`` lines for the notify protocol and the passed socket.  ``Type=notify``,
#: not ``notify-reload``: that needs systemd 253 and 252 (Debian 12) refuses it.
NOTIFY_LINES: Final = (
    "Type=notify",
    "NotifyAccess=main",
    "WatchdogSec=30s",
    "Sockets=secure-echo.socket",
)
#: ``[Unit]`` lines that start the socket with the service.
SOCKET_DEPENDENCY_LINES: Final = ("Requires=secure-echo.socket", "After=secure-echo.socket")


def sections(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's directives by section and key (continuation lines joined)."""
    found: dict[str, dict[str, list[str]]] = {}
    section = ""
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if logical:
            line = f"{logical} {line}"
            logical = ""
        if line.endswith("\\"):
            logical = line[:-1].rstrip()
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(section, {}).setdefault(key.strip(), []).append(value.strip())
    return found


def notify_variant(service_text: str) -> str:
    """``service_text`` with :data:`NOTIFY_LINES` and a ``systemd:`` listen.

    Any ``Type=``, ``NotifyAccess=``, ``WatchdogSec=`` or ``Sockets=`` the unit
    already has is replaced, so this stays valid once the unit adopts them.
    """
    replaced = ("Type=", "NotifyAccess=", "WatchdogSec=", "Sockets=", "Requires=secure-echo")
    lines = [line for line in service_text.splitlines() if not line.startswith(replaced)]
    out: list[str] = []
    for line in lines:
        out.append(line)
        if line.strip() == "[Unit]":
            out.extend(SOCKET_DEPENDENCY_LINES)
        elif line.strip() == "[Service]":
            out.extend(NOTIFY_LINES)
    text = "\n".join(out) + "\n"
    return re.sub(r"--listen \S+", f"--listen {SYSTEMD_LISTEN}", text)


class SocketUnitTests(SynchronousTestCase):
    """What the socket unit says, checked without systemd."""

    def setUp(self) -> None:
        self.text = SOCKET_UNIT.read_text(encoding="utf-8")
        self.socket = sections(self.text)["Socket"]

    def test_listens_on_loopback_8443(self) -> None:
        """One loopback stream socket on 8443, accepted by one daemon (``Accept=no``)."""
        self.assertEqual(self.socket["ListenStream"], ["127.0.0.1:8443"])
        self.assertEqual(self.socket["Accept"], ["no"])
        self.assertEqual(self.socket["Service"], ["secure-echo.service"])

    def test_named_for_the_service(self) -> None:
        """The socket is named ``secure-echo``; the comment gives the matching ``--listen``."""
        self.assertEqual(self.socket["FileDescriptorName"], ["secure-echo"])
        self.assertIn(f"--listen {SYSTEMD_LISTEN}", self.text)

    def test_listen_string_finds_the_named_socket(self) -> None:
        """Twisted's parser turns that ``--listen`` into an endpoint adopting the named fd."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(other.close)
        # What twisted.python.systemd reads from LISTEN_FDS/LISTEN_FDNAMES.
        fds = ListenFDs([other.fileno(), listener.fileno()], ("other", "secure-echo"))
        self.patch(endpoints._SystemdParser, "_sddaemon", fds)
        endpoint = endpoints.serverFromString(MemoryReactor(), SYSTEMD_LISTEN)
        self.assertIsInstance(endpoint, endpoints.AdoptedStreamServerEndpoint)
        assert isinstance(endpoint, endpoints.AdoptedStreamServerEndpoint)
        self.assertEqual(endpoint.fileno, listener.fileno())
        self.assertEqual(endpoint.addressFamily, socket.AF_INET)


class ServiceSandboxTests(SynchronousTestCase):
    """The service's sandbox leaves room for the notify protocol."""

    def test_unix_sockets_allowed(self) -> None:
        """``NOTIFY_SOCKET`` is an ``AF_UNIX`` socket: the address families allow it."""
        service = sections(SERVICE_UNIT.read_text(encoding="utf-8"))["Service"]
        families = " ".join(service["RestrictAddressFamilies"]).split()
        self.assertIn("AF_UNIX", families)
        self.assertFalse(any(f.startswith("~") for f in families), families)


class SystemdAnalyzeTests(SynchronousTestCase):
    """The units as systemd itself sees them (copies whose ExecStart exists)."""

    def setUp(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        self.analyze = analyze
        # verify complains when ExecStart's binary is missing, as /usr/local/bin/twistd
        # is on most test machines: check copies that run an executable known to exist.
        service_text = SERVICE_UNIT.read_text(encoding="utf-8")
        self.assertIn(f"ExecStart={TWISTD} ", service_text)
        stand_in = shutil.which("true") or "/bin/true"
        service_text = service_text.replace(f"ExecStart={TWISTD} ", f"ExecStart={stand_in} ")
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir()
        self.socket = self.directory / SOCKET_UNIT.name
        self.socket.write_text(SOCKET_UNIT.read_text(encoding="utf-8"))
        self.service = self.directory / SERVICE_UNIT.name
        self.service.write_text(service_text)
        # Same unit name, so Sockets=/Service= resolve between the two copies.
        self.notify_directory = self.directory / "notify"
        self.notify_directory.mkdir()
        self.notify_socket = self.notify_directory / SOCKET_UNIT.name
        self.notify_socket.write_text(self.socket.read_text())
        self.notify_service = self.notify_directory / SERVICE_UNIT.name
        self.notify_service.write_text(notify_variant(service_text))

    def _systemd_analyze(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.analyze, *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def assert_verifies_silently(self, *units: Path) -> None:
        """``systemd-analyze verify`` prints nothing and succeeds."""
        result = self._systemd_analyze("verify", *(str(unit) for unit in units))
        self.assertEqual((result.stdout, result.stderr), ("", ""))
        self.assertEqual(result.returncode, 0)

    def exposure(self, unit: Path) -> float:
        """The 'Overall exposure level' ``systemd-analyze security`` gives ``unit``."""
        result = self._systemd_analyze("security", "--offline=true", str(unit))
        if result.returncode != 0 and "offline" in result.stderr:
            raise SkipTest(f"this systemd has no offline security check: {result.stderr}")
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        self.assertIsNotNone(match, result.stdout + result.stderr)
        assert match is not None  # for mypy
        return float(match.group(1))

    def test_socket_verifies(self) -> None:
        """``systemd-analyze verify`` prints nothing for the socket unit."""
        self.assert_verifies_silently(self.socket)

    def test_socket_and_service_verify(self) -> None:
        """The socket unit and the service it activates verify silently together."""
        self.assert_verifies_silently(self.socket, self.service)

    def test_notify_lines_verify(self) -> None:
        """The service with ``Type=notify``, watchdog and ``Sockets=`` verifies silently."""
        text = self.notify_service.read_text()
        for line in (*NOTIFY_LINES, *SOCKET_DEPENDENCY_LINES, f"--listen {SYSTEMD_LISTEN}"):
            self.assertIn(line, text)
        self.assert_verifies_silently(self.notify_socket, self.notify_service)

    def test_service_exposure(self) -> None:
        """``systemd-analyze security`` rates the service at 2.0 or better."""
        self.assertLessEqual(self.exposure(self.service), MAX_EXPOSURE)

    def test_notify_service_exposure(self) -> None:
        """Socket activation and the notify socket (``AF_UNIX``) cost no sandboxing."""
        self.assertLessEqual(self.exposure(self.notify_service), MAX_EXPOSURE)
