"""Processes of a benchmark run: the servers, the load generator, strace, and /proc.

Every child is started with ``PR_SET_PDEATHSIG`` so it gets SIGTERM if the harness dies,
listens or connects on 127.0.0.1 only, and is waited for with a deadline; a server is
stopped with SIGTERM, then SIGKILL if it does not exit in time.

CPU time comes from ``/proc/<pid>/stat`` (utime + stime of all threads, plus reaped
children's), memory from the ``VmRSS`` line of ``/proc/<pid>/status``; both are summed
over the server's process tree, so a server that forks workers is measured whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from scenarios import (
    COMPARE_PREFIX,
    DAEMON_OPTIONS,
    DEFAULT_REACTOR_SERVERS,
    REACTOR,
    WORKERS,
    is_daemon,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"

#: Python code that runs twistd exactly as the ``twistd`` console script does.
TWISTD = "from twisted.scripts.twistd import run; run()"
#: Seconds a server gets to say which port it listens on.
START_TIMEOUT = 30.0
#: Seconds a server gets to exit after SIGTERM.
STOP_TIMEOUT = 15.0
#: Seconds a peer server lives at most, should the harness forget it.
PEER_LIFETIME = 1800.0
#: The connection limit given to secure-echo: above the largest idle scenario.
MAX_CONNECTIONS = 15000
#: CPU numbers for the server and the load generator when pinning.
SERVER_CPU = 0
GENERATOR_CPU = 1

_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")

Event = dict[str, Any]


class BenchError(RuntimeError):
    """A process did not do what the harness waited for; the message says what."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class ProcSnapshot:
    """Every process's parent and CPU seconds (own + reaped children's), read at once.

    ``cpu`` is user + kernel time; ``user`` the user-space part of it.
    """

    parent: dict[int, int]
    cpu: dict[int, float]
    user: dict[int, float]

    @classmethod
    def take(cls) -> ProcSnapshot:
        """Read ``/proc/*/stat``: utime + stime + cutime + cstime of each process."""
        parent: dict[int, int] = {}
        cpu: dict[int, float] = {}
        user: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # it exited while we looked
                continue
            fields = stat.rpartition(")")[2].split()
            pid = int(entry.name)
            parent[pid] = int(fields[1])
            # fields[0] is field 3 (state); fields 14-17 are utime, stime, cutime, cstime.
            cpu[pid] = sum(int(v) for v in fields[11:15]) / _CLK_TCK
            user[pid] = (int(fields[11]) + int(fields[13])) / _CLK_TCK
        return cls(parent, cpu, user)

    def tree(self, root: int) -> set[int]:
        """``root`` and all its descendants."""
        members = {root}
        grew = True
        while grew:
            found = {pid for pid, ppid in self.parent.items() if ppid in members}
            grew = not found <= members
            members |= found
        return members

    def tree_user(self, root: int) -> float:
        """User-space CPU seconds of ``root`` and its descendants."""
        return sum(self.user.get(pid, 0.0) for pid in self.tree(root))

    def tree_cpu(self, root: int) -> float:
        """CPU seconds of ``root`` and its descendants (a server that forks workers)."""
        return sum(self.cpu.get(pid, 0.0) for pid in self.tree(root))

    def others(self) -> dict[int, float]:
        """CPU seconds of every process outside the harness's own tree.

        The harness's tree holds the server (and any workers), the generator and
        strace.  Kernel threads (children of kthreadd, pid 2) are left out: their work
        here is mostly our own loopback traffic.
        """
        ours = self.tree(os.getpid()) | self.tree(2)
        return {pid: cpu for pid, cpu in self.cpu.items() if pid not in ours}


def tree_rss_kib(root: int) -> int:
    """Resident set size of ``root`` and its descendants in KiB (``VmRSS`` summed)."""
    total = 0
    for pid in ProcSnapshot.take().tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_busy_seconds() -> dict[int, float]:
    """Non-idle seconds of each CPU since boot (``/proc/stat``: all but idle and iowait)."""
    busy: dict[int, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        ticks = [int(v) for v in values[:8]]
        busy[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4]) / _CLK_TCK
    return busy


def other_cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds other processes used between two :meth:`ProcSnapshot.others` readings.

    A process that vanished was reaped by a parent whose children's time grew by its
    whole total; its share from before the first snapshot is taken off again.
    """
    grown = sum(total - before.get(pid, 0.0) for pid, total in after.items())
    vanished = sum(total for pid, total in before.items() if pid not in after)
    return max(grown - vanished, 0.0)


def wait_until_quiet(limit: float, busy_below: float, sample: float = 0.5) -> float:
    """Wait (at most ``limit`` s) until both CPUs together are less than ``busy_below`` busy.

    Other people's processes (a test suite, a build) on this machine compete with the
    server and the generator for their cores.  Returns the busy fraction last seen.
    """
    deadline = time.monotonic() + limit
    while True:
        before = cpu_busy_seconds()
        time.sleep(sample)
        after = cpu_busy_seconds()
        cores = (SERVER_CPU, GENERATOR_CPU)
        busy = sum(after.get(c, 0.0) - before.get(c, 0.0) for c in cores) / (sample * len(cores))
        if busy < busy_below or time.monotonic() >= deadline:
            return busy


@dataclass
class Pinning:
    """How children are pinned: ``taskset`` prefixes, or nothing."""

    enabled: bool

    def prefix(self, *cpus: int) -> list[str]:
        """The command prefix that runs a child on ``cpus``."""
        return ["taskset", "-c", ",".join(map(str, cpus))] if self.enabled else []

    @classmethod
    def detect(cls, want: bool) -> Pinning:
        """Pin if asked, ``taskset`` exists and there are two CPUs; warn otherwise."""
        if not want:
            return cls(enabled=False)
        if shutil.which("taskset") is None:
            print("warning: taskset (util-linux) not found; running unpinned", file=sys.stderr)
            return cls(enabled=False)
        if len(os.sched_getaffinity(0)) < 2:  # the server's core and the generator's
            print("warning: fewer than 2 CPUs available; running unpinned", file=sys.stderr)
            return cls(enabled=False)
        # The harness itself mostly sleeps; keep it off the server's core.
        os.sched_setaffinity(0, {GENERATOR_CPU})
        return cls(enabled=True)


def child_env(root: Path = ROOT) -> dict[str, str]:
    """This environment with the source tree at ``root`` first on ``PYTHONPATH``.

    ``root/src`` holds the ``secure_echo`` package and ``root`` the ``twisted/plugins``
    directory that Twisted's plugin search finds on the path, so ``twistd
    secure-echo`` runs that tree's daemon whatever else is installed.
    """
    env = dict(os.environ)
    roots = [str(root / "src"), str(root)]
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in roots]
    env["PYTHONPATH"] = os.pathsep.join([*roots, *inherited])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True)
class PKI:
    """The benchmark's certificates, made at run time."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_pki(directory: Path) -> PKI:
    """Write a CA and an ECDSA P-256 server certificate for 127.0.0.1 into ``directory``."""
    sys.path[:0] = [str(ROOT / "src")]
    from secure_echo.tools import certgen  # noqa: PLC0415 - importable once src/ is on the path

    ca = certgen.make_ca("secure-echo bench CA", days=1)
    server = certgen.issue_server(ca, ("127.0.0.1", "localhost"), days=1)
    pki = PKI(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    certgen.write_public(pki.ca_cert, ca.cert_pem())
    certgen.write_pair(server, pki.server_cert, pki.server_key)
    return pki


def has_reactor(root: Path) -> bool:
    """Whether the secure-echo tree in ``root`` registers ``--reactor=secure-echo-epoll``."""
    plugin = root / "twisted" / "plugins" / "secure_echo_plugin.py"
    return plugin.exists() and f'"{REACTOR}"' in plugin.read_text(errors="replace")


def server_command(name: str, pki: PKI, workdir: Path, root: Path = ROOT) -> list[str]:
    """The command line of server ``name`` (a secure-echo one running the tree in ``root``)."""
    cert, key = str(pki.server_cert), str(pki.server_key)
    if name in WORKERS:
        return [
            *server_command("secure-echo", pki, workdir, root),
            "--workers",
            str(WORKERS[name]),
        ]
    if is_daemon(name):
        reactor = (
            [f"--reactor={REACTOR}"]
            if name not in DEFAULT_REACTOR_SERVERS and has_reactor(root)
            else []
        )
        return [
            sys.executable,
            "-c",
            TWISTD,
            "-n",
            "--pidfile=",
            *reactor,
            "secure-echo",
            "--cert",
            cert,
            "--key",
            key,
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--log-file",
            str(workdir / "log.jsonl"),
            "--tls-profile",
            "modern",
            "--idle-timeout",
            "0",
            "--max-connections",
            str(MAX_CONNECTIONS),
            *DAEMON_OPTIONS.get(name, ()),
        ]
    script = {
        "textbook": "textbook_twisted.py",
        "asyncio": "asyncio_echo.py",
        "lean": "lean_twisted.py",
    }[name]
    return [sys.executable, str(PEERS / script), cert, key, "--lifetime", str(PEER_LIFETIME)]


@dataclass
class Server:
    """A running server process."""

    name: str
    process: subprocess.Popen[bytes]
    workdir: Path
    port: int = 0
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The server's process id (taskset execs the server in place)."""
        return self.process.pid

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to ``timeout`` s, SIGKILL if needed; close the output files."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        for f in self._files:
            f.close()

    def tail(self) -> str:
        """The end of what the server wrote to stderr, for error messages."""
        text = (self.workdir / "stderr.txt").read_text(errors="replace")
        return text[-2000:]


def _port_of(name: str, workdir: Path) -> int | None:
    if is_daemon(name):
        log = workdir / "log.jsonl"
        if not log.exists():
            return None
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "listening":
                    return int(event["port"])
        return None
    first = (workdir / "stdout.txt").read_text(errors="replace").partition("\n")
    return int(first[0]) if first[1] and first[0].strip().isdigit() else None


def start_server(
    name: str,
    pki: PKI,
    workdir: Path,
    pinning: Pinning,
    root: Path = ROOT,
    *,
    wrapper: Sequence[str] = (),
    start_timeout: float = START_TIMEOUT,
) -> Server:
    """Start server ``name`` on the server CPU (both CPUs with workers) until it listens.

    ``root`` is the source tree a secure-echo server runs from (see :func:`child_env`).
    ``wrapper`` runs the server under another command (``valgrind ...``), which must
    exec it in place; ``start_timeout`` is how long it may take to listen.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    # A server with workers gets both cores: the point is to use more than one.
    cpus = (SERVER_CPU, GENERATOR_CPU) if name in WORKERS else (SERVER_CPU,)
    stdout = (workdir / "stdout.txt").open("wb")
    stderr = (workdir / "stderr.txt").open("wb")
    process = subprocess.Popen(
        [*pinning.prefix(*cpus), *wrapper, *server_command(name, pki, workdir, root)],
        cwd=workdir,
        env=child_env(root),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded harness
    )
    server = Server(name, process, workdir, _files=[stdout, stderr])
    deadline = time.monotonic() + start_timeout
    while (port := _port_of(name, workdir)) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise BenchError(f"{name} did not start listening:\n{server.tail()}")
        time.sleep(0.05)
    server.port = port
    return server


@dataclass(frozen=True)
class Revision:
    """An earlier revision of secure-echo, unpacked to run as a server of its own."""

    name: str
    commit: str
    short: str
    date: str
    subject: str
    root: Path
    #: The file ``twistd secure-echo`` loads its service from (inside ``root``).
    service_module: Path

    def describe(self) -> dict[str, str]:
        """What the report says about it."""
        return {
            "commit": self.commit,
            "short": self.short,
            "date": self.date,
            "subject": self.subject,
            "service_module": str(self.service_module),
        }


def _git(*args: str) -> str:
    git = shutil.which("git")
    if git is None:
        raise BenchError("--compare needs git")
    done = subprocess.run(
        [git, "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def resolve_revision(rev: str) -> tuple[str, str]:
    """The full and the short commit id that ``rev`` names; BenchError if none."""
    try:
        commit = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except BenchError:
        raise BenchError(f"--compare {rev}: no such commit in {ROOT}") from None
    return commit, _git("rev-parse", "--short", commit)


def unpack_revision(rev: str, into: Path) -> Revision:
    """Write the ``src/`` and ``twisted/`` trees of ``rev`` under ``into``, and check them.

    ``git archive`` (no worktree, nothing registered in the repository), so removing
    ``into`` is all the cleaning up there is.  The check runs what ``twistd`` will run:
    Twisted's plugin search finds the ``secure-echo`` service maker, and the module it
    names is imported from the unpacked tree, not from this checkout or an installed
    copy.  Both package layouts (flat before 8e33570, subpackages since) work this way:
    the plugin file names ``secure_echo.tap`` in both.
    """
    commit, short = resolve_revision(rev)
    date, _, subject = _git("show", "-s", "--format=%cs %s", commit).partition(" ")
    root = into / f"secure-echo-{short}"
    root.mkdir(parents=True)
    git = shutil.which("git")
    assert git is not None  # resolve_revision found it
    archive = subprocess.Popen(
        [git, "-C", str(ROOT), "archive", "--format=tar", commit, "src", "twisted"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert archive.stdout is not None
    with archive.stdout, tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(root, filter="data")
    if archive.wait() != 0:
        stderr = archive.stderr.read().decode(errors="replace") if archive.stderr else ""
        raise BenchError(f"git archive {short} failed: {stderr.strip()}")
    if archive.stderr is not None:
        archive.stderr.close()
    loaded = check_tree(root)
    return Revision(f"{COMPARE_PREFIX}{short}", commit, short, date, subject, root, loaded)


#: Finds the plugin the way ``twistd`` does and prints the file its module comes from.
_WHICH_TREE = """
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted import plugins
import importlib
makers = [m for m in getPlugins(IServiceMaker, plugins) if m.tapname == "secure-echo"]
print(importlib.import_module(makers[0].module).__file__ if makers else "")
"""


def check_tree(root: Path) -> Path:
    """Which file ``twistd secure-echo`` loads with ``root`` on the path; it must be in it."""
    done = subprocess.run(
        [sys.executable, "-c", _WHICH_TREE],
        capture_output=True,
        text=True,
        check=False,
        cwd=root.parent,
        env=child_env(root),
        timeout=START_TIMEOUT,
    )
    loaded = Path(done.stdout.strip()) if done.stdout.strip() else None
    if (
        done.returncode != 0
        or loaded is None
        or not loaded.resolve().is_relative_to(root.resolve())
    ):
        raise BenchError(
            f"twistd secure-echo would not run the tree in {root} "
            f"(service module: {loaded}):\n{done.stderr[-2000:]}"
        )
    return loaded


class LineReader:
    """Lines from a pipe, each read bounded by a deadline."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._fd = pipe.fileno()
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)

    def lines(self, deadline: float) -> Iterator[str]:
        """Yield lines until EOF; raise :class:`BenchError` past ``deadline``."""
        while True:
            while b"\n" in self._buffer:
                line, _, self._buffer = self._buffer.partition(b"\n")
                yield line.decode(errors="replace")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError("load generator timed out")
            if not self._selector.select(remaining):
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                return
            self._buffer += chunk

    def close(self) -> None:
        """Stop watching the pipe."""
        self._selector.close()


@dataclass
class LoadgenRun:
    """What one load-generator run reported: its events in order, the last being the result."""

    events: list[Event]

    @property
    def result(self) -> Event:
        """The final ``result`` event."""
        return self.events[-1]


def drive_loadgen(
    command: Sequence[str],
    *,
    on_ready: Callable[[Event], None],
    on_measured: Callable[[Event], None],
    timeout: float,
    stderr_path: Path,
) -> LoadgenRun:
    """Run the load generator in ``--sync`` mode, calling the hooks at its two sync points.

    Each hook runs while the generator waits (the server is quiescent); the generator
    continues when the hook returns.
    """
    with stderr_path.open("ab") as stderr:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded harness
        )
        assert process.stdin is not None
        assert process.stdout is not None
        reader = LineReader(process.stdout)
        events: list[Event] = []
        try:
            for line in reader.lines(time.monotonic() + timeout):
                event = json.loads(line)
                events.append(event)
                kind = event.get("event")
                if kind in {"ready", "measured"}:
                    (on_ready if kind == "ready" else on_measured)(event)
                    process.stdin.write(b"go\n")
                    process.stdin.flush()
                elif kind == "error":
                    raise BenchError(f"load generator: {event.get('message')}")
            process.wait(STOP_TIMEOUT)
        finally:
            reader.close()
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdin.close()
            process.stdout.close()
    if not events or events[-1].get("event") != "result":
        tail = stderr_path.read_text(errors="replace")[-2000:]
        raise BenchError(f"load generator exited {process.returncode} without a result:\n{tail}")
    return LoadgenRun(events)


@dataclass
class Strace:
    """``strace -c -f -p PID``: counts the syscalls of a running server."""

    process: subprocess.Popen[bytes]
    output: Path

    @classmethod
    def attach(cls, pid: int, output: Path, pinning: Pinning) -> Strace:
        """Attach to ``pid`` and wait until strace says it is attached."""
        process = subprocess.Popen(
            [
                *pinning.prefix(GENERATOR_CPU),
                "strace",
                "-c",
                "-f",
                "-p",
                str(pid),
                "-o",
                str(output),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded harness
        )
        assert process.stderr is not None
        reader = LineReader(process.stderr)
        try:
            attached = any("attached" in line for line in reader.lines(time.monotonic() + 10.0))
        except BenchError:
            attached = False
        finally:
            reader.close()
        if not attached:
            process.kill()
            process.wait()
            raise BenchError("strace did not attach (ptrace not permitted?)")
        return cls(process, output)

    def detach(self) -> dict[str, int]:
        """Stop tracing; return the call count per syscall (``total`` included)."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        return parse_strace_summary(self.output.read_text())


def parse_strace_summary(text: str) -> dict[str, int]:
    """Calls per syscall from ``strace -c`` output (``% time  seconds  usecs/call  calls ...``)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[0].replace(".", "", 1).isdigit():
            continue
        # errors is an optional column between calls and the syscall name
        counts[parts[-1]] = int(parts[3])
    return counts
