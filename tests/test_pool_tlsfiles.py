"""TLS files for workers that cannot read them, and ``twistd --uid`` with a root-only key.

The unit tests check the copies (sealed memory files) and which paths a worker
replaces by them.  The process test runs as root: the key is ``0600 root``, twistd
drops to ``nobody``/``nogroup`` before the workers start, and every worker (a
restarted one too) must still serve.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Final

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from secure_echo.daemon import options as config
from secure_echo.daemon.load import load
from secure_echo.pool import tlsfiles
from secure_echo.pool.contract import TLSFileCopy
from secure_echo.pool.tlsfiles import (
    close_all,
    read_tls_files,
    readable_settings,
    share_copies,
    tls_paths,
    with_real_paths,
)
from tests.daemon import Daemon, _source_roots, child_env, start_daemon
from tests.helpers import make_pki
from tests.test_integration import IntegrationCase, server_args
from tests.test_workers import echo_burst, pids_of, wait_ready

#: Seconds any wait on the daemon may take.
WAIT: Final = 20.0


class CopiesTests(SynchronousTestCase):
    """The supervisor's copies of the TLS files."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.settings = config.parse(
            [
                "--cert",
                str(self.pki.server_cert),
                "--key",
                str(self.pki.server_key),
                "--client-ca",
                str(self.pki.ca_cert),
            ]
        ).tls_settings

    def test_paths_and_bytes(self) -> None:
        """Every file once, by absolute path; each read as it is."""
        cwd = Path.cwd()
        relative = replace(self.settings, key=Path(os.path.relpath(self.pki.server_key, cwd)))
        paths = tls_paths(relative)
        self.assertEqual(
            [str(p) for p in paths],
            [
                str(self.pki.server_cert.absolute()),
                str(self.pki.server_key.absolute()),
                str(self.pki.ca_cert.absolute()),
            ],
        )
        same_file = replace(self.settings, key=self.settings.cert)
        self.assertEqual(len(tls_paths(same_file)), 2)
        files = read_tls_files(relative)
        self.assertEqual(
            files[str(self.pki.server_key.absolute())], self.pki.server_key.read_bytes()
        )
        missing = replace(self.settings, client_ca=Path(self.mktemp()))
        self.assertEqual(len(read_tls_files(missing)), 2)

    def test_sealed_copies(self) -> None:
        """Each copy is readable at /proc/self/fd/N and cannot be changed."""
        copies, held = share_copies({"/a": b"first", "/b": b"second"})
        self.addCleanup(close_all, held)
        self.assertEqual([c.path for c in copies], ["/a", "/b"])
        self.assertEqual([c.fd for c in copies], held)
        for copy, data in zip(copies, (b"first", b"second"), strict=True):
            self.assertEqual(Path(f"/proc/self/fd/{copy.fd}").read_bytes(), data)
            self.assertRaises(OSError, os.write, copy.fd, b"changed")
        close_all(held)
        close_all(held)  # closing twice is harmless
        for fd in held:
            self.assertRaises(OSError, os.fstat, fd)

    def test_only_unreadable_files_are_replaced(self) -> None:
        """A readable or missing file is loaded from its path; an unreadable one from its copy."""
        key = str(self.pki.server_key.absolute())
        copies = (TLSFileCopy(key, 41), TLSFileCopy(str(self.pki.server_cert), 42))
        same, replaced = readable_settings(self.settings, copies)
        self.assertEqual((same, replaced), (self.settings, []))
        real_access = os.access
        self.patch(
            os,
            "access",
            lambda p, m: os.path.abspath(p) != key and real_access(p, m),  # noqa: PTH100
        )
        changed, replaced = readable_settings(self.settings, copies)
        self.assertEqual(replaced, [key])
        self.assertEqual(changed.key, Path("/proc/self/fd/41"))
        self.assertEqual(changed.cert, self.settings.cert)
        gone = replace(self.settings, key=Path(self.mktemp()))
        self.assertEqual(readable_settings(gone, copies)[1], [])
        self.assertFalse(tlsfiles._unreadable(Path(self.mktemp())))

    def test_loaded_from_copies_named_by_path(self) -> None:
        """Loaded from a copy, the settings (records, reloads) name the real files."""
        options = config.Options()
        options.parseOptions(
            ["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)]
        )
        settings = options.settings
        copies, held = share_copies({str(self.pki.server_key): self.pki.server_key.read_bytes()})
        self.addCleanup(close_all, held)
        from_copy = replace(settings.tls_settings, key=Path(f"/proc/self/fd/{copies[0].fd}"))
        cfg = load(replace(settings, tls_settings=from_copy))
        self.assertEqual(cfg.tls.settings.key, from_copy.key)
        real = with_real_paths(cfg, settings.tls_settings)
        self.assertEqual(real.tls.settings.key, self.pki.server_key)
        self.assertEqual(real.tls_settings.key, self.pki.server_key)
        self.assertIs(real.contexts, cfg.contexts)
        self.assertIs(real.contexts.loaded, real.tls)


def unprivileged_python(env: dict[str, str]) -> str | None:
    """An interpreter of this Python version that ``nobody`` can run with our packages."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (
        sys.executable,
        f"/usr/bin/python{version}",
        f"/usr/local/bin/python{version}",
    ):
        if not Path(candidate).is_file():
            continue
        try:
            probe = subprocess.run(
                [
                    candidate,
                    "-c",
                    (
                        "import sys, twisted, OpenSSL, secure_echo.pool.worker; "
                        f"assert sys.version_info[:2] == {sys.version_info[:2]!r}"
                    ),
                ],
                env=env,
                user="nobody",
                group="nogroup",
                extra_groups=[],
                capture_output=True,
                check=False,
                timeout=60,
            )
        except OSError:  # nobody may not even execute it (a pyenv under /root)
            continue
        if probe.returncode == 0:
            return candidate
    return None


class PrivilegeDropTests(IntegrationCase):
    """``twistd --uid nobody --gid nogroup`` with a key only root may read."""

    def test_root_only_key(self) -> None:
        """Workers run as nobody, load the key from the supervisor's copy, and serve."""
        if os.geteuid() != 0:
            raise SkipTest("needs root, to drop privileges")
        # Our code and our packages only: another interpreter must not load this
        # one's standard library (trial -j passes its whole sys.path down).
        site = [p for key in ("purelib", "platlib") if (p := sysconfig.get_path(key))]
        env = child_env({"PYTHONPATH": os.pathsep.join([*_source_roots(), *site])})
        python = unprivileged_python(env)
        if python is None:
            raise SkipTest("no Python interpreter that nobody may run with these packages")
        # trial's own directories are 0700: nobody could not reach the certificate.
        directory = Path(tempfile.mkdtemp(prefix="se-uid-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        directory.chmod(0o755)
        pki = make_pki(directory / "pki")
        (directory / "pki").chmod(0o755)
        os.chown(pki.server_key, 0, 0)
        pki.server_key.chmod(0o600)
        daemon = start_daemon(
            self,
            directory / "daemon",
            server_args(pki, "--workers", "2"),
            env={"PYTHONPATH": env["PYTHONPATH"]},
            python=python,
            twistd_options=("--uid", "nobody", "--gid", "nogroup"),
        )
        wait_ready(daemon)
        self.assert_unprivileged(daemon)
        copied = daemon.find_events(lambda e: e.get("event") == "tls_files_from_supervisor")
        self.assertEqual(sorted(e["worker"] for e in copied), [1, 2])
        self.assertEqual(copied[0]["files"], [str(pki.server_key)])
        loaded = daemon.find_events(lambda e: e.get("event") == "tls_context_loaded")
        self.assertTrue(all(e["cert"] == str(pki.server_cert) for e in loaded))
        self.assertEqual(len(echo_burst(daemon.port, pki.ca_cert, 8)), 8)
        # A worker started after the drop gets its copy too.
        since = daemon.mark()
        os.kill(pids_of(daemon)[1], signal.SIGKILL)
        wait_ready(daemon, since, workers=(1,))
        self.assert_unprivileged(daemon)
        self.assertEqual(len(echo_burst(daemon.port, pki.ca_cert, 8)), 8)
        # A reload reads the files as nobody, like one process under --uid: it
        # fails, and the workers keep serving the key they have.
        since = daemon.mark()
        daemon.process.send_signal(signal.SIGHUP)
        done = daemon.wait_for_event(
            lambda e: e.get("event") == "workers_reloaded", since=since, timeout=WAIT
        )
        self.assertEqual(done["failed"], [1, 2])
        failed = daemon.find_events(lambda e: e.get("event") == "tls_reload_failed", since)
        self.assertTrue(all("permission denied" in e["error"] for e in failed), failed)
        self.assertEqual(len(echo_burst(daemon.port, pki.ca_cert, 4)), 4)
        self.assertIn(daemon.stop(), {0, -signal.SIGTERM}, daemon.describe())

    def assert_unprivileged(self, daemon: Daemon) -> None:
        """The supervisor and each worker run as nobody."""
        for pid in [daemon.process.pid, *pids_of(daemon).values()]:
            status = Path(f"/proc/{pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            self.assertEqual(set(uids.split()[1:]), {"65534"}, (pid, uids))
