"""Tests for ``contrib/systemd/secure-echo.service``: it verifies cleanly and stays sandboxed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "systemd" / "secure-echo.service"
#: Where the unit expects twistd; documented in the unit's header comment.
TWISTD = "/usr/local/bin/twistd"
#: The worst ``systemd-analyze security`` exposure the unit may have (0 best, 10 worst).
MAX_EXPOSURE = 2.0


def _directives(text: str) -> dict[str, list[str]]:
    """Return ``[Service]`` directives, joining continuation lines, keyed by name."""
    found: dict[str, list[str]] = {}
    section = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if logical:
            line = logical + " " + line
            logical = ""
        if line.endswith("\\"):
            logical = line[:-1].rstrip()
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


class UnitFileTests(SynchronousTestCase):
    """What the unit says, checked without systemd."""

    def setUp(self) -> None:
        self.directives = _directives(UNIT.read_text(encoding="utf-8"))

    def test_foreground_without_pidfile(self) -> None:
        """The daemon runs under twistd -n, no pid file, notifying systemd (Type=notify)."""
        (exec_start,) = self.directives["ExecStart"]
        argv = exec_start.split()
        self.assertEqual(
            argv[:5], [TWISTD, "-n", "--pidfile=", "--reactor=secure-echo-epoll", "secure-echo"]
        )
        self.assertEqual(self.directives["Type"], ["notify"])
        self.assertEqual(self.directives["NotifyAccess"], ["main"])
        self.assertTrue(self.directives["WatchdogSec"])
        self.assertEqual(self.directives["ExecReload"], ["/bin/kill -HUP $MAINPID"])

    def test_certificates_and_log(self) -> None:
        """The service reads its certificate and key from credentials and logs JSON lines."""
        argv = self.directives["ExecStart"][0].split()
        self.assertEqual(argv[argv.index("--cert") + 1], "%d/server.pem")
        self.assertEqual(argv[argv.index("--key") + 1], "%d/server-key.pem")
        self.assertEqual(
            argv[argv.index("--log-file") + 1], "/var/log/secure-echo/secure-echo.jsonl"
        )
        self.assertEqual(
            sorted(self.directives["LoadCredential"]),
            [
                "server-key.pem:/etc/secure-echo/server-key.pem",
                "server.pem:/etc/secure-echo/server.pem",
            ],
        )

    def test_unprivileged(self) -> None:
        """A dynamic user with no capabilities at all and no way to gain privileges."""
        self.assertEqual(self.directives["DynamicUser"], ["yes"])
        self.assertEqual(self.directives["CapabilityBoundingSet"], [""])
        self.assertEqual(self.directives["AmbientCapabilities"], [""])
        self.assertEqual(self.directives["NoNewPrivileges"], ["yes"])
        self.assertEqual(self.directives["UMask"], ["0077"])

    def test_no_write_execute_restriction(self) -> None:
        """MemoryDenyWriteExecute stays off: pyOpenSSL's cffi callbacks need W+X memory."""
        self.assertNotIn("MemoryDenyWriteExecute", self.directives)


class SystemdAnalyzeTests(SynchronousTestCase):
    """The unit as systemd itself sees it."""

    def setUp(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        self.analyze = analyze
        # verify complains when ExecStart's binary is missing, as /usr/local/bin/twistd is
        # on most test machines: check a copy that runs an executable known to exist.
        text = UNIT.read_text(encoding="utf-8")
        self.assertIn(f"ExecStart={TWISTD} ", text)
        stand_in = shutil.which("true") or "/bin/true"
        directory = Path(self.mktemp())
        directory.mkdir()
        self.unit = directory / UNIT.name
        self.unit.write_text(text.replace(f"ExecStart={TWISTD} ", f"ExecStart={stand_in} "))

    def _systemd_analyze(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.analyze, *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def test_verify_is_silent(self) -> None:
        """``systemd-analyze verify`` prints nothing: no unknown keys, no bad values."""
        result = self._systemd_analyze("verify", str(self.unit))
        self.assertEqual((result.stdout, result.stderr), ("", ""))
        self.assertEqual(result.returncode, 0)

    def test_security_exposure(self) -> None:
        """``systemd-analyze security`` rates the unit's exposure at 2.0 or better."""
        result = self._systemd_analyze("security", "--offline=true", str(self.unit))
        if result.returncode != 0 and "offline" in result.stderr:
            raise SkipTest(f"this systemd has no offline security check: {result.stderr}")
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        self.assertIsNotNone(match, result.stdout + result.stderr)
        assert match is not None  # for mypy
        self.assertLessEqual(float(match.group(1)), MAX_EXPOSURE, result.stdout)
