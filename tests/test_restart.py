"""Tests for :mod:`secure_echo.daemon.restart`: a reload names what only a restart applies.

In process: :class:`RestartCheck` against a real config file rewritten between the
start and the check, and the reloader calling it.  Against the real daemon: SIGHUP
(one process and a supervisor of two workers) and ``--reload-interval`` after the
file changed in keys a reload does not apply.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.daemon import options as config
from secure_echo.daemon.reload import TLSReloader
from secure_echo.daemon.restart import RELOADED_KEYS, RestartCheck, restart_changes
from secure_echo.daemon.settings import FILE_KEYS, option_values
from secure_echo.pool.reload import RestartWatch
from secure_echo.tls.policy import ContextHolder, load_and_validate
from tests.daemon import Daemon, start_daemon, wait_workers_ready
from tests.helpers import make_pki
from tests.test_integration import IntegrationCase, shared_pki
from tests.tlspair import capture_events, named

if TYPE_CHECKING:
    from tests.daemon import Event
    from tests.helpers import PKI

#: Seconds to wait for a daemon's event.
WAIT: Final = 20.0


def write_config(path: Path, pki: PKI, text: str) -> Path:
    """Write a config file naming ``pki``'s server certificate, then ``text``."""
    path.write_text(
        f'cert = "{pki.server_cert.absolute()}"\nkey = "{pki.server_key.absolute()}"\n{text}'
    )
    return path


class RestartChangesTests(SynchronousTestCase):
    """Which keys count as changed."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.tls = ["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)]

    def test_reloaded_keys_are_the_tls_set(self) -> None:
        """A reload applies exactly the TLS keys; every other file key needs a restart."""
        self.assertEqual(
            RELOADED_KEYS,
            {
                "cert",
                "key",
                "client-ca",
                "client-auth",
                "tls-profile",
                "allow-cn",
                "allow-dns",
                "allow-uri",
                "allow-spki-sha256",
                "crl",
                "test-certs",
                "alpn",
                "strict-sni",
            },
        )
        self.assertLessEqual(RELOADED_KEYS, FILE_KEYS.keys())
        self.assertEqual(option_values(config.parse(self.tls)).keys(), FILE_KEYS.keys())

    def test_values_compared_not_spellings(self) -> None:
        """10 and 10.0 seconds are the same value; a changed limit and TLS key are told apart."""
        start = config.parse([*self.tls, "--idle-timeout", "10"])
        same = config.parse([*self.tls, "--idle-timeout", "10.0"])
        self.assertEqual(restart_changes(start, same), {})
        other = config.parse(
            [
                *self.tls,
                "--idle-timeout",
                "10",
                "--max-line-length",
                "100",
                "--tls-profile",
                "modern",
            ]
        )
        self.assertEqual(restart_changes(start, other), {"max-line-length": (65536, 100)})


class RestartCheckTests(SynchronousTestCase):
    """The check against the config file as it is now."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.file = self.pki.directory.absolute() / "secure-echo.toml"
        self.events = capture_events(self)

    def start(self, text: str, *args: str) -> RestartCheck:
        write_config(self.file, self.pki, text)
        return RestartCheck(config.parse(["--config", str(self.file), *args]))

    def test_changed_keys_logged_by_key(self) -> None:
        """Changed limits and listen are named with old and new values; TLS changes are not."""
        check = self.start("max-line-length = 65536\n")
        write_config(
            self.file,
            self.pki,
            'max-line-length = 100\nidle-timeout = "off"\nlisten = ["tcp:9999"]\n'
            'tls-profile = "modern"\n',
        )
        self.assertEqual(check.check("SIGHUP"), ["idle-timeout", "listen", "max-line-length"])
        (event,) = named(self.events, "reload_needs_restart")
        self.assertEqual(event["keys"], ["idle-timeout", "listen", "max-line-length"])
        self.assertEqual(event["trigger"], "SIGHUP")
        self.assertEqual(event["config_file"], str(self.file))
        self.assertEqual(event["changes"]["max-line-length"], {"old": 65536, "new": 100})
        self.assertEqual(event["changes"]["idle-timeout"], {"old": 300.0, "new": 0.0})
        self.assertEqual(
            event["changes"]["listen"],
            {
                "old": ["tcp:8443:interface=127.0.0.1:backlog=4096"],
                "new": ["tcp:9999:backlog=4096"],
            },
        )
        json.dumps(event["changes"])  # the record can hold it as it is

    def test_unchanged_file_logs_nothing(self) -> None:
        """A reload of an unchanged file (a certificate rotation) logs nothing."""
        check = self.start("max-pending = 8\n")
        self.assertEqual(check.check("SIGHUP"), [])
        self.assertEqual(named(self.events, "reload_needs_restart"), [])

    def test_command_line_values_are_not_changes(self) -> None:
        """A key the command line gave at start wins over the file: no restart would change it."""
        check = self.start("max-line-length = 65536\n", "--max-line-length", "4096")
        write_config(self.file, self.pki, "max-line-length = 100\n")
        self.assertEqual(check.check("SIGHUP"), [])

    def test_removed_key_falls_back_to_default(self) -> None:
        """A key removed from the file changes to its default value."""
        check = self.start("max-pending = 8\n")
        write_config(self.file, self.pki, "")
        self.assertEqual(check.check("SIGHUP"), ["max-pending"])
        (event,) = named(self.events, "reload_needs_restart")
        self.assertEqual(event["changes"]["max-pending"], {"old": 8, "new": 256})

    def test_invalid_value_would_stop_the_next_start(self) -> None:
        """A value the next start would refuse is logged as reload_config_invalid."""
        check = self.start("")
        write_config(self.file, self.pki, "max-line-length = 0\n")
        self.assertEqual(check.check("file-change"), [])
        (event,) = named(self.events, "reload_config_invalid")
        self.assertTrue(event["error"].startswith(f'--config {self.file}: key "max-line-length"'))
        self.assertEqual(event["trigger"], "file-change")
        self.assertEqual(named(self.events, "reload_needs_restart"), [])

    def test_command_line_value_no_longer_valid(self) -> None:
        """A command-line --log-file whose directory went away is named by its option."""
        logs = Path(self.mktemp()).absolute()
        logs.mkdir()
        check = self.start("", "--log-file", str(logs / "log.jsonl"))
        logs.rmdir()
        self.assertEqual(check.check("SIGHUP"), [])
        (event,) = named(self.events, "reload_config_invalid")
        self.assertEqual(event["key"], "log-file")
        self.assertTrue(event["error"].startswith("--log-file: directory"), event["error"])

    def test_vanished_file_left_to_the_reload(self) -> None:
        """A config file that is gone is the reload's error; the check logs nothing."""
        check = self.start("")
        self.file.unlink()
        self.assertEqual(check.check("file-change", only_if_changed=True), [])
        self.assertEqual(check.check("SIGHUP"), [])
        self.assertEqual(named(self.events, "reload_config_invalid"), [])

    def test_tls_errors_left_to_the_reload(self) -> None:
        """Errors in TLS keys or the file itself are the reload's to report, not repeated."""
        check = self.start("")
        write_config(self.file, self.pki, 'client-auth = "required"\n')
        check.check("SIGHUP")
        self.file.write_text("this is [not toml\n")
        check.check("SIGHUP")
        self.assertEqual(named(self.events, "reload_config_invalid"), [])

    def test_without_config_file(self) -> None:
        """Without --config there is nothing that can change."""
        check = RestartCheck(
            config.parse(["--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key)])
        )
        self.assertEqual(check.check("SIGHUP"), [])
        self.assertEqual(self.events.__len__(), 0)

    def test_only_if_changed(self) -> None:
        """only_if_changed checks once per content of the file (N workers, one file change)."""
        check = self.start("")
        self.assertEqual(check.check("file-change", only_if_changed=True), [])
        write_config(self.file, self.pki, "max-pending = 8\n")
        self.assertEqual(check.check("file-change", only_if_changed=True), ["max-pending"])
        self.assertEqual(check.check("file-change", only_if_changed=True), [])
        self.assertEqual(len(named(self.events, "reload_needs_restart")), 1)
        # An explicit SIGHUP reminds again.
        self.assertEqual(check.check("SIGHUP"), ["max-pending"])
        self.assertEqual(len(named(self.events, "reload_needs_restart")), 2)

    def test_reloader_runs_the_check(self) -> None:
        """Each reload, failed or not, runs the check with its trigger, before ``after``."""
        write_config(self.file, self.pki, "")
        cfg = config.parse(["--config", str(self.file)])
        seen: list[str] = []
        clock = Clock()
        clock.advance(time.time())
        reloader = TLSReloader(
            ContextHolder(load_and_validate(cfg.tls_settings)),
            lambda: config.reload_tls_settings(cfg),
            clock,
            restart_check=seen.append,
        )
        reloader.after.append(lambda ok: seen.append(f"after {ok}"))
        self.assertTrue(reloader.reload("SIGHUP"))
        self.file.write_text("broken = [\n")
        self.assertFalse(reloader.reload("file-change"))
        self.assertEqual(seen, ["SIGHUP", "after True", "file-change", "after False"])


class RestartWatchTests(SynchronousTestCase):
    """The supervisor's watch: which records lead to a check, and how."""

    def test_checks_after_reload_records(self) -> None:
        """workers_reloaded checks; a worker's file-change reload checks once per content."""
        calls: list[tuple[str, bool]] = []

        class Check(RestartCheck):
            def check(self, trigger: str, *, only_if_changed: bool = False) -> list[str]:
                calls.append((trigger, only_if_changed))
                return []

        pki = make_pki(self.mktemp())
        check = Check(config.parse(["--cert", str(pki.server_cert), "--key", str(pki.server_key)]))
        clock = Clock()
        publisher = LogPublisher()
        watch = RestartWatch(check, clock, publisher)
        log = Logger(observer=publisher)
        log.info("x", event="workers_reloaded")
        watch.startService()
        log.info("x", event="workers_reloaded")
        log.info("x", event="tls_reloaded", trigger="file-change", worker=1)
        log.info("x", event="tls_reload_failed", trigger="file-change", worker=2)
        log.info("x", event="tls_reloaded", trigger="SIGHUP", worker=1)
        log.info("x", event="tls_reloaded", trigger="file-change")  # not a worker's
        self.assertEqual(calls, [], "never from inside the observer")
        clock.advance(0)
        self.assertEqual(calls, [("SIGHUP", False), ("file-change", True), ("file-change", True)])
        watch.stopService()
        log.info("x", event="workers_reloaded")
        clock.advance(0)
        self.assertEqual(len(calls), 3)


# -- the real daemon ----------------------------------------------------------------


class RestartNeededDaemonTests(IntegrationCase):
    """SIGHUP and file watching after the config file changed keys a reload cannot apply."""

    def daemon(self, text: str, *args: str) -> tuple[Daemon, Path]:
        """A daemon started with a config file holding ``text``; it and the file."""
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        path = write_config(directory / "secure-echo.toml", shared_pki(), text)
        daemon = start_daemon(self, directory / "daemon", ["--config", str(path), *args])
        return daemon, path

    def needs_restart(self, daemon: Daemon, since: int) -> Event:
        """The one ``reload_needs_restart`` record after ``since``."""
        return daemon.wait_for_event(
            lambda e: e.get("event") == "reload_needs_restart", since=since, timeout=WAIT
        )

    def test_sighup_single_process(self) -> None:
        """SIGHUP after changing max-line-length and idle-timeout: named, not applied."""
        daemon, path = self.daemon("max-line-length = 65536\n")
        write_config(path, shared_pki(), "max-line-length = 100\nidle-timeout = 60\n")
        since = daemon.mark()
        daemon.process.send_signal(signal.SIGHUP)
        event = self.needs_restart(daemon, since)
        self.assertEqual(event["keys"], ["idle-timeout", "max-line-length"])
        self.assertEqual(event["changes"]["max-line-length"], {"old": 65536, "new": 100})
        self.assertEqual(event["level"], "warn")
        self.assertTrue(
            daemon.find_events(lambda e: e.get("event") == "tls_reloaded", since), "no reload"
        )
        # Still the start's limit: a 200-byte line is echoed.
        client = self.tls_client(daemon)
        line = b"x" * 200 + b"\n"
        client.write(line)
        self.assertEqual(client.read_until(len(line)), line)

    def test_sighup_supervisor_logs_once(self) -> None:
        """--workers 2: one reload_needs_restart, from the supervisor, not one per worker."""
        daemon, path = self.daemon("", "--workers", "2")
        wait_workers_ready(daemon)
        write_config(path, shared_pki(), "max-pending = 8\n")
        since = daemon.mark()
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for_event(
            lambda e: e.get("event") == "workers_reloaded", since=since, timeout=WAIT
        )
        event = self.needs_restart(daemon, since)
        self.assertNotIn("worker", event)
        self.assertEqual(event["keys"], ["max-pending"])
        every = daemon.find_events(lambda e: e.get("event") == "reload_needs_restart", since)
        self.assertEqual(len(every), 1, every)

    def test_file_change_supervisor_logs_once(self) -> None:
        """--workers 2 --reload-interval: both workers reload, one reload_needs_restart."""
        daemon, path = self.daemon("", "--workers", "2", "--reload-interval", "0.2")
        wait_workers_ready(daemon)
        since = daemon.mark()
        write_config(path, shared_pki(), "handshake-timeout = 3\n")
        os.utime(path)
        for index in (1, 2):

            def reloaded(event: Event, index: int = index) -> bool:
                return event.get("event") == "tls_reloaded" and event.get("worker") == index

            daemon.wait_for_event(reloaded, since=since, timeout=WAIT)
        event = self.needs_restart(daemon, since)
        self.assertEqual(event["keys"], ["handshake-timeout"])
        self.assertEqual(event["trigger"], "file-change")
        time.sleep(0.5)  # a second check would have come by now
        every = daemon.find_events(lambda e: e.get("event") == "reload_needs_restart", since)
        self.assertEqual(len(every), 1, every)
