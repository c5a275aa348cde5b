"""Run the real daemon, ``twistd -n secure-echo``, from trial tests.

The clients these tests drive (Python's ``ssl``, ``openssl s_client``) block, so the
daemon is a plain :class:`subprocess.Popen` child and every wait here blocks too,
always bounded by a timeout.  Nothing here needs a reactor.

How a daemon is found and talked to:

* It is started with ``sys.executable`` running twistd's own entry point
  (:data:`TWISTD`), so the same interpreter and packages are used whether secure-echo
  runs from the source tree (``PYTHONPATH=src:.``) or is installed.  ``python -m
  twisted`` would be ``twist``, a different runner without ``-n``/``--pidfile``.
* It listens on ``tcp:0:interface=127.0.0.1`` and writes JSON Lines to a log file;
  the ``listening`` event tells the port it really bound.
* Its standard output and error go to files (a pipe nobody reads could fill and
  block it), kept next to the log for post-mortems.

Every :class:`Daemon` is stopped with SIGTERM (SIGKILL if it does not exit in time)
by whoever started it: a test's ``addCleanup`` or, for daemons shared by a test
class, :func:`shared_daemon`'s exit hook.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import secure_echo

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: Python code that runs twistd exactly as the ``twistd`` console script does.
TWISTD = "from twisted.scripts.twistd import run; run()"
#: Seconds a daemon gets to log ``listening`` after it was started.
START_TIMEOUT = 20.0
#: Seconds a daemon gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Default seconds to wait for a log event.
EVENT_TIMEOUT = 10.0
#: Interval between two looks at a log file or a process.
POLL_INTERVAL = 0.02

Event = dict[str, Any]


class DaemonError(AssertionError):
    """The daemon did not do what a test waited for; the message says what it did."""


def _source_roots() -> list[str]:
    """Directories the child needs on its path to import what this process imported.

    ``PYTHONPATH=src:.`` is relative, and trial runs tests from ``_trial_temp``, so the
    inherited value would point nowhere in the child.  The parent's own imports say
    where ``secure_echo`` and the ``twisted/plugins`` directory holding its plugin are.
    Site directories are left out: the child finds an installed package by itself.
    """
    package_dir = Path(next(iter(secure_echo.__path__))).resolve()
    candidates = [package_dir.parent]
    plugin_root = package_dir.parent.parent
    if (plugin_root / "twisted" / "plugins" / "secure_echo_plugin.py").is_file():
        candidates.append(plugin_root)
    site_dirs = {
        Path(p).resolve() for key in ("purelib", "platlib") if (p := sysconfig.get_path(key))
    }
    return [str(c) for c in candidates if c not in site_dirs]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return this process's environment with ``PYTHONPATH`` made usable by a child.

    The absolute directories from :func:`_source_roots` come first; the inherited
    entries follow unchanged.
    """
    env = dict(os.environ)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    roots = _source_roots()
    env["PYTHONPATH"] = os.pathsep.join([*roots, *(p for p in inherited if p not in roots)])
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


#: The reactor daemons under test run on: the one the shipped units and the README
#: name, unless ``$SECURE_ECHO_TEST_REACTOR`` names another (``default``: twistd's own).
REACTOR = os.environ.get("SECURE_ECHO_TEST_REACTOR", "secure-echo-epoll")

#: :data:`TWISTD` with SIGINT handled as in a process started from a terminal.
TWISTD_SIGINT = (
    f"import signal; signal.signal(signal.SIGINT, signal.default_int_handler); {TWISTD}"
)


def twistd_command(
    *args: str,
    sigint: bool = False,
    python: str | None = None,
    twistd_options: Sequence[str] = (),
    reactor: str = REACTOR,
) -> list[str]:
    """The command line of ``twistd -n --pidfile= [OPTIONS] secure-echo ARGS``.

    ``sigint``: SIGINT is Python's default handler even if this process ignores it
    (a test runner started in the background), so twistd takes it as from a terminal.
    ``python``: another interpreter than this one; ``twistd_options`` go to twistd
    itself (``--uid``); ``reactor`` is a ``--reactor`` name (``default``: none given).
    """
    code = TWISTD_SIGINT if sigint else TWISTD
    chosen = () if reactor == "default" else (f"--reactor={reactor}",)
    return [
        python or sys.executable,
        "-c",
        code,
        "-n",
        "--pidfile=",
        *chosen,
        *twistd_options,
        "secure-echo",
        *args,
    ]


def run_twistd(
    args: Sequence[str], cwd: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run twistd to completion (for start-up failures); kill it after ``timeout`` s."""
    return subprocess.run(
        twistd_command(*args),
        cwd=cwd,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_events(path: Path) -> list[Event]:
    """Every complete JSON record in ``path`` (a line being written is skipped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    complete, _, _ = data.rpartition(b"\n")
    return [json.loads(line) for line in complete.split(b"\n") if line.strip()]


@dataclass
class Daemon:
    """A running ``twistd -n secure-echo`` and what it wrote."""

    process: subprocess.Popen[bytes]
    directory: Path
    log_path: Path
    stdout_path: Path
    stderr_path: Path
    args: tuple[str, ...]
    port: int = 0
    returncode: int | None = None
    _files: list[IO[bytes]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        directory: Path,
        args: Sequence[str],
        *,
        listen: str = "tcp:0:interface=127.0.0.1",
        timeout: float = START_TIMEOUT,
        log_to_stdout: bool = False,
        env: dict[str, str] | None = None,
        python: str | None = None,
        twistd_options: Sequence[str] = (),
        reactor: str = REACTOR,
    ) -> Daemon:
        """Start a daemon with ``args`` in ``directory`` and wait until it listens.

        ``--listen`` and ``--log-file`` are added; with ``log_to_stdout``,
        ``--log-stdout json`` instead of ``--log-file``, and the log is read from
        standard output.  ``env`` adds to the environment (``NOTIFY_SOCKET``);
        ``python``, ``twistd_options`` and ``reactor`` are :func:`twistd_command`'s.
        SIGINT is handled as from a terminal (see
        :func:`twistd_command`).  Raises
        :class:`DaemonError` (after stopping the child) if no ``listening`` event
        appears in time.
        """
        directory = directory.absolute()
        directory.mkdir(parents=True, exist_ok=True)
        stdout_path = directory / "stdout.txt"
        stderr_path = directory / "stderr.txt"
        log_path = stdout_path if log_to_stdout else directory / "log.jsonl"
        # A log left by an earlier daemon here would announce a stale port.
        log_path.unlink(missing_ok=True)
        log_args = ("--log-stdout", "json") if log_to_stdout else ("--log-file", str(log_path))
        full_args = ("--listen", listen, *log_args, *args)
        stdout = stdout_path.open("wb")
        stderr = stderr_path.open("wb")
        process = subprocess.Popen(
            twistd_command(
                *full_args,
                sigint=True,
                python=python,
                twistd_options=twistd_options,
                reactor=reactor,
            ),
            cwd=directory,
            env=child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
        daemon = cls(
            process,
            directory,
            log_path,
            stdout_path,
            stderr_path,
            full_args,
            _files=[stdout, stderr],
        )
        try:
            listening = daemon.wait_for_event(
                lambda e: e.get("event") == "listening", timeout=timeout
            )
        except DaemonError:
            daemon.stop()
            raise
        daemon.port = int(listening["port"])
        return daemon

    # -- the log ---------------------------------------------------------------

    def events(self) -> list[Event]:
        """Every record the daemon has logged so far."""
        return read_events(self.log_path)

    def mark(self) -> int:
        """A position in the log: pass it as ``since`` to ignore earlier events."""
        return len(self.events())

    def find_events(
        self, predicate: Callable[[Event], bool] | None = None, since: int = 0
    ) -> list[Event]:
        """The events after ``since`` for which ``predicate`` holds."""
        return [e for e in self.events()[since:] if predicate is None or predicate(e)]

    def wait_for_event(
        self,
        predicate: Callable[[Event], bool],
        *,
        since: int = 0,
        timeout: float = EVENT_TIMEOUT,
    ) -> Event:
        """Wait for the first event after ``since`` matching ``predicate``; return it.

        Raises :class:`DaemonError` on timeout or if the daemon exits first.
        """
        return self.wait_for_events(predicate, 1, since=since, timeout=timeout)[0]

    def wait_for_events(
        self,
        predicate: Callable[[Event], bool],
        count: int,
        *,
        since: int = 0,
        timeout: float = EVENT_TIMEOUT,
    ) -> list[Event]:
        """Wait for ``count`` events after ``since`` matching ``predicate``; return them.

        Raises :class:`DaemonError` on timeout or if the daemon exits first.
        """
        deadline = time.monotonic() + timeout
        while True:
            matched = self.find_events(predicate, since)
            if len(matched) >= count:
                return matched[:count]
            if self.process.poll() is not None:
                # It may have logged the events just before exiting.
                matched = self.find_events(predicate, since)
                if len(matched) >= count:
                    return matched[:count]
                raise DaemonError(
                    f"daemon exited with {self.process.returncode}\n{self.describe()}"
                )
            if time.monotonic() >= deadline:
                raise DaemonError(f"no matching event within {timeout} s\n{self.describe()}")
            time.sleep(POLL_INTERVAL)

    def wait_closed(
        self,
        *,
        since: int = 0,
        peer: str | None = None,
        timeout: float = EVENT_TIMEOUT,
    ) -> Event:
        """Wait for a ``connection_closed`` event (of ``peer``, if given) after ``since``."""

        def matches(event: Event) -> bool:
            return event.get("event") == "connection_closed" and (
                peer is None or event.get("peer") == peer
            )

        return self.wait_for_event(matches, since=since, timeout=timeout)

    def stdout(self) -> str:
        """What the daemon wrote to its standard output so far."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """What the daemon wrote to its standard error so far."""
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        """The daemon's arguments, state and output, for failure messages."""
        tail = "\n".join(json.dumps(e) for e in self.events()[-20:])
        return (
            f"args: {self.args}\nreturncode: {self.process.poll()}\n"
            f"stderr:\n{self.stderr()[-4000:]}\nstdout:\n{self.stdout()[-4000:]}\n"
            f"last log records:\n{tail}"
        )

    # -- stopping --------------------------------------------------------------

    def terminate(self) -> None:
        """Send SIGTERM (if it still runs); see :meth:`wait`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the daemon to exit; kill it (and raise) if it takes too long."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
            self._close_files()
            raise DaemonError(
                f"daemon did not exit within {timeout} s\n{self.describe()}"
            ) from None
        self.returncode = code
        self._close_files()
        return code

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait (SIGKILL after ``timeout`` s); return the exit status."""
        self.terminate()
        return self.wait(timeout)

    def _close_files(self) -> None:
        files, self._files = self._files, []
        for handle in files:
            handle.close()


def wait_workers_ready(
    daemon: Daemon, workers: tuple[int, ...] = (1, 2), timeout: float = START_TIMEOUT
) -> None:
    """Wait until each worker in ``workers`` of a ``--workers`` daemon logged ``worker_ready``."""
    for index in workers:

        def ready(event: Event, index: int = index) -> bool:
            return event.get("event") == "worker_ready" and event.get("worker") == index

        daemon.wait_for_event(ready, timeout=timeout)


def start_daemon(case: Any, directory: Path, args: Sequence[str], **kwargs: Any) -> Daemon:
    """Start a daemon for one test; ``case.addCleanup`` stops it."""
    daemon = Daemon.start(directory, args, **kwargs)
    case.addCleanup(_stop_quietly, daemon)
    return daemon


def _stop_quietly(daemon: Daemon) -> None:
    with contextlib.suppress(DaemonError):
        daemon.stop()


_shared: dict[str, Daemon] = {}


def shared_daemon(name: str, make_args: Callable[[Path], Sequence[str]]) -> Daemon:
    """Return the daemon called ``name``, starting it on first use in this process.

    Trial has no ``setUpClass``; tests of a class share one daemon through this
    instead.  ``make_args(directory)`` builds its arguments (and may write files into
    ``directory``, e.g. certificates).  The daemon runs under
    ``shared-daemons/<name>`` of the test directory and is stopped when this process
    exits.  A daemon that died is started again.
    """
    daemon = _shared.get(name)
    if daemon is not None and daemon.process.poll() is None:
        return daemon
    directory = Path("shared-daemons", name).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    daemon = Daemon.start(directory, make_args(directory))
    _shared[name] = daemon
    return daemon


@atexit.register
def _stop_shared() -> None:
    daemons = list(_shared.values())
    _shared.clear()
    for daemon in daemons:
        daemon.terminate()
    for daemon in daemons:
        _stop_quietly(daemon)
