"""Benchmark secure-echo against other TLS line echoes on one machine, as same-run ratios.

    python bench/run.py [--quick] [--reps N] [--scenarios A,B,...] [--out bench/results]
                        [--servers a,b,...] [--compare REV] [--baseline NAME[,NAME]]

Builds the C load generator (``bench/loadgen/loadgen.c``, gcc + OpenSSL), makes a CA and
an ECDSA P-256 server certificate in a temporary directory, then for each repetition,
each scenario and each server (the servers' order rotated per repetition) starts a fresh
server pinned to CPU 0, drives it from CPU 1 and records what the generator and
``/proc`` say.  ``--compare REV`` unpacks an earlier revision of secure-echo into the
temporary directory and runs it as one more server, so a change is measured against its
predecessor in the same run.  Writes ``<out>/<timestamp>.md``, ``.json`` and ``.png``.
See ``bench/README.md`` for what each figure means and how to read the ratios.

Everything talks to 127.0.0.1 only; every run is bounded in time and stops by itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import procs
import report
from procs import BENCH, GENERATOR_CPU, ROOT, BenchError, Pinning, start_server
from scenarios import BASELINES, COMPARE_PREFIX, EXTRA_SERVERS, SERVERS, Scenario, select

if TYPE_CHECKING:
    from collections.abc import Sequence

LOADGEN_SOURCE = BENCH / "loadgen" / "loadgen.c"
BUILD_DIR = BENCH / "build"
#: Seconds the server gets to settle (free what a phase left) before its RSS is read.
RSS_SETTLE = 0.5
#: A generator busy this fraction of the measured wall time may have been the bottleneck.
SATURATED = 0.9
#: Other processes using this share of one core during the window mark it as contended.
CONTENDED = 0.10
#: Before a run, wait for both cores together to be less busy than this.
QUIET_BELOW = 0.05
#: Scenario B's short run under strace.
STRACE_WARMUP = 0.5
STRACE_DURATION = 2.0

Record = dict[str, Any]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark secure-echo against textbook Twisted, asyncio and lean Twisted "
            "(same-run ratios)."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 repetition, short runs, scenarios A-D"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument(
        "--scenarios", help="comma-separated letters A-F or keys (E-full, F-10k, ...)"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="results directory")
    parser.add_argument("--warmup", type=float, help="warm-up seconds (default 1; 0.5 quick)")
    parser.add_argument("--duration", type=float, help="measured seconds (default 5; 2 quick)")
    parser.add_argument(
        "--strace", action="store_true", help="also count syscalls per line (scenario B)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="JSON",
        help="run nothing: write the .md and .png again from a results .json",
    )
    parser.add_argument(
        "--retries",
        type=int,
        help="times to run a contended run again, keeping the least contended "
        "(default 2; 1 with --quick)",
    )
    parser.add_argument(
        "--retry-budget",
        type=float,
        help="seconds all runs-again together may take (default 300; 30 with --quick)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each run, wait at most this long for other load to stop "
        "(default 30 s; 5 s with --quick; 0: don't)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=(
            f"comma-separated subset of {','.join(SERVERS)}, "
            f"plus optionally {','.join(EXTRA_SERVERS)}"
        ),
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="REV",
        help=f"also run secure-echo as of git revision REV (as {COMPARE_PREFIX}<short rev>); "
        "may be given more than once",
    )
    parser.add_argument(
        "--baseline",
        metavar="NAME[,NAME]",
        help="the reference servers of the ratios: the first for the main table and the "
        "plot, each further one a ratio table of its own (default: "
        f"{','.join(BASELINES)}, those of them that run); with --from-json, "
        "render the ratios against these instead",
    )
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    args.duration = args.duration if args.duration is not None else (2.0 if args.quick else 5.0)
    # --quick stays a quick smoke test on a busy machine: shorter waits, fewer runs-again.
    args.retries = args.retries if args.retries is not None else (1 if args.quick else 2)
    if args.retry_budget is None:
        args.retry_budget = 30.0 if args.quick else 300.0
    if args.quiet_wait is None:
        args.quiet_wait = 5.0 if args.quick else 30.0
    try:
        args.scenario_list = select(args.scenarios, quick=args.quick)
    except ValueError as error:
        parser.error(str(error))
    if args.reps < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--reps must be >= 1, --duration > 0, --warmup >= 0")
    choose_servers(parser, args)
    return args


def choose_servers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill ``server_list``, ``revisions`` and ``baseline_list`` from the command line.

    ``--compare`` revisions join the servers as ``secure-echo@<short rev>``.  Without
    ``--baseline`` the reference servers are those of :data:`BASELINES` that run.
    """
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := set(args.server_list) - set(SERVERS) - set(EXTRA_SERVERS):
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    args.baseline_list = (
        [b.strip() for b in args.baseline.split(",") if b.strip()] if args.baseline else None
    )
    args.revisions = []
    if args.from_json is not None:
        return
    for rev in args.compare:
        try:
            short = procs.resolve_revision(rev)[1]
        except BenchError as error:
            parser.error(str(error))
        name = f"{COMPARE_PREFIX}{short}"
        if name in args.server_list:
            parser.error(f"--compare {rev}: {short} is named twice")
        args.server_list.append(name)
        args.revisions.append(rev)
    if args.baseline_list is None:
        args.baseline_list = [b for b in BASELINES if b in args.server_list]
    elif missing := [b for b in args.baseline_list if b not in args.server_list]:
        parser.error(f"--baseline {','.join(missing)}: not among the servers run")


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def build_loadgen() -> Path:
    """Compile the load generator into bench/build/ unless it is up to date."""
    binary = BUILD_DIR / "loadgen"
    if binary.exists() and binary.stat().st_mtime >= LOADGEN_SOURCE.stat().st_mtime:
        return binary
    if shutil.which("gcc") is None:
        raise BenchError("gcc not found: apt-get install -y gcc libssl-dev")
    BUILD_DIR.mkdir(exist_ok=True)
    command = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(LOADGEN_SOURCE)]
    built = subprocess.run(
        [*command, "-lssl", "-lcrypto"], capture_output=True, text=True, check=False
    )
    if built.returncode != 0:
        raise BenchError(
            f"building the load generator failed (apt-get install -y gcc libssl-dev?):\n"
            f"{built.stderr}"
        )
    return binary


class Bench:
    """One invocation: settings, the PKI, and every run's record."""

    def __init__(
        self, args: argparse.Namespace, loadgen: Path, pinning: Pinning, tmp: Path
    ) -> None:
        self.args = args
        self.loadgen = loadgen
        self.pinning = pinning
        self.tmp = tmp
        self.pki = procs.make_pki(tmp)
        self.runs: list[Record] = []
        self.retry_seconds_left: float = args.retry_budget
        self.strace: list[Record] = []
        #: The source tree each ``--compare`` server runs from (others: this checkout).
        self.revisions: dict[str, procs.Revision] = {}

    def unpack_revisions(self) -> None:
        """Unpack every ``--compare`` revision into the temporary directory."""
        for rev in self.args.revisions:
            revision = procs.unpack_revision(rev, self.tmp / "revisions")
            self.revisions[revision.name] = revision
            print(
                f"{revision.name}: {revision.date} {revision.subject} "
                f"(twistd loads {revision.service_module})",
                flush=True,
            )

    def start(self, name: str, workdir: Path) -> procs.Server:
        """Start server ``name``: from its revision's tree, if it is one."""
        revision = self.revisions.get(name)
        root = revision.root if revision is not None else ROOT
        return start_server(name, self.pki, workdir, self.pinning, root)

    def loadgen_command(
        self, scenario: Scenario, port: int, warmup: float, duration: float
    ) -> list[str]:
        """The generator's command line for one run of ``scenario``."""
        timeout = self.timeout(scenario, warmup, duration)
        return [
            *self.pinning.prefix(GENERATOR_CPU),
            str(self.loadgen),
            "--port",
            str(port),
            *(["--ca", str(self.pki.ca_cert)] if scenario.verify else []),
            "--sync",
            "--warmup",
            str(warmup),
            "--duration",
            str(duration),
            "--max-seconds",
            str(timeout),
            *scenario.loadgen_args(),
        ]

    @staticmethod
    def timeout(scenario: Scenario, warmup: float, duration: float) -> float:
        """How long a run of ``scenario`` may take at most (connection set-up included)."""
        if scenario.mode == "idle":
            return 300.0
        return warmup + duration + 90.0

    def run_all(self) -> None:
        """Every repetition, scenario and server; order of servers rotated per repetition."""
        servers = self.args.server_list
        for rep in range(self.args.reps):
            order = servers[rep % len(servers) :] + servers[: rep % len(servers)]
            print(f"repetition {rep + 1}/{self.args.reps}: order {', '.join(order)}", flush=True)
            for scenario in self.args.scenario_list:
                for position, name in enumerate(order):
                    self.runs.append(self.run_with_retries(rep, position, scenario, name))
                    print("  " + describe(self.runs[-1]), flush=True)
        if self.args.strace:
            for name in servers:
                record = self.run_strace(name)
                self.strace.append(record)
                print("  " + describe_strace(record), flush=True)

    def run_with_retries(self, rep: int, position: int, scenario: Scenario, name: str) -> Record:
        """Run once; while other processes disturbed the run, run again (bounded).

        Keeps the valid attempt that was disturbed least; the others are kept inside it
        under ``discarded_attempts``.
        """
        record = self.run_one(rep, position, scenario, name)
        attempts = 1
        latest = record
        tried = [record]
        while (
            "contended" in record["flags"]
            and attempts <= self.args.retries
            and self.retry_seconds_left > 0
        ):
            print(f"  {describe(latest)}  -> run again", flush=True)
            attempts += 1
            started = time.monotonic()
            latest = self.run_one(rep, position, scenario, name)
            tried.append(latest)
            self.retry_seconds_left -= time.monotonic() - started
            if preference(latest) < preference(record):
                record = latest
        record["attempts"] = attempts
        record["discarded_attempts"] = [r for r in tried if r is not record]
        return record

    def run_one(self, rep: int, position: int, scenario: Scenario, name: str) -> Record:
        """Start a fresh server, drive one scenario at it, stop it; never raises BenchError."""
        record: Record = {
            "rep": rep,
            "position": position,
            "scenario": scenario.key,
            "server": name,
            "ok": False,
            "flags": [],
        }
        workdir = self.tmp / f"rep{rep}-{scenario.key}-{name}-{time.monotonic_ns()}"
        if self.args.quiet_wait > 0:
            record["busy_before"] = procs.wait_until_quiet(self.args.quiet_wait, QUIET_BELOW)
        try:
            server = self.start(name, workdir)
        except BenchError as error:
            record["error"] = str(error)
            return record
        try:
            self.measure(scenario, server, record)
        except (BenchError, OSError, ValueError) as error:
            record["error"] = f"{error}\n{server.tail()}"
        finally:
            server.stop()
        return record

    def measure(self, scenario: Scenario, server: procs.Server, record: Record) -> None:
        """Drive ``scenario`` at ``server`` and fill ``record`` with raw numbers and figures."""
        window: dict[str, float] = {}
        others: list[dict[int, float]] = []
        pid = server.pid

        def on_ready(_event: procs.Event) -> None:
            if scenario.mode == "idle":
                time.sleep(RSS_SETTLE)
                window["rss0"] = procs.tree_rss_kib(pid)
            snapshot = procs.ProcSnapshot.take()
            window["cpu0"] = snapshot.tree_cpu(pid)
            window["user0"] = snapshot.tree_user(pid)
            others.append(snapshot.others())

        def on_measured(_event: procs.Event) -> None:
            snapshot = procs.ProcSnapshot.take()
            window["cpu1"] = snapshot.tree_cpu(pid)
            window["user1"] = snapshot.tree_user(pid)
            others.append(snapshot.others())
            if scenario.mode == "idle":
                time.sleep(RSS_SETTLE)
                window["rss1"] = procs.tree_rss_kib(pid)

        warmup, duration = self.args.warmup, self.args.duration
        run = procs.drive_loadgen(
            self.loadgen_command(scenario, server.port, warmup, duration),
            on_ready=on_ready,
            on_measured=on_measured,
            timeout=self.timeout(scenario, warmup, duration) + 30,
            stderr_path=server.workdir / "loadgen-stderr.txt",
        )
        result = run.result
        record["loadgen"] = result
        record["server_cpu_s"] = window["cpu1"] - window["cpu0"]
        record["server_user_s"] = window["user1"] - window["user0"]
        # Every core here is pinned to the server or the generator: whatever other
        # processes ran in the window took it from one of them.
        other_cpu = procs.other_cpu_between(others[0], others[1])
        record["other_cpu_s"] = other_cpu
        record["other_load"] = other_cpu / result["wall_s"] if result["wall_s"] else 0.0
        if "rss0" in window:
            record["rss_before_kib"] = window["rss0"]
            record["rss_after_kib"] = window["rss1"]
        record["metrics"] = figures(scenario, record)
        record["flags"] = flags(scenario, record)
        record["ok"] = True

    def run_strace(self, name: str) -> Record:
        """Scenario B for a short while under ``strace -c -f``: syscalls per line."""
        scenario = next(s for s in select("B", quick=False))
        record: Record = {"scenario": scenario.key, "server": name, "ok": False}
        workdir = self.tmp / f"strace-{name}"
        try:
            server = self.start(name, workdir)
        except BenchError as error:
            record["error"] = str(error)
            return record
        tracer: list[procs.Strace] = []
        counts: dict[str, int] = {}

        def on_ready(_event: procs.Event) -> None:
            tracer.append(procs.Strace.attach(server.pid, workdir / "strace.txt", self.pinning))

        def on_measured(_event: procs.Event) -> None:
            counts.update(tracer.pop().detach())

        try:
            run = procs.drive_loadgen(
                self.loadgen_command(scenario, server.port, STRACE_WARMUP, STRACE_DURATION),
                on_ready=on_ready,
                on_measured=on_measured,
                timeout=self.timeout(scenario, STRACE_WARMUP, STRACE_DURATION) + 30,
                stderr_path=workdir / "loadgen-stderr.txt",
            )
            lines = run.result["lines"]
            record.update(
                ok=bool(lines) and "total" in counts and run.result["error_total"] == 0,
                lines=lines,
                syscalls=counts,
                syscalls_per_line=counts.get("total", 0) / lines if lines else None,
                loadgen=run.result,
            )
        except (BenchError, OSError, ValueError) as error:
            record["error"] = f"{error}\n{server.tail()}"
        finally:
            for leftover in tracer:
                leftover.detach()
            server.stop()
        return record


def figures(scenario: Scenario, record: Record) -> dict[str, float | None]:
    """The reported figures of one run, from the generator's result and /proc."""
    result = record["loadgen"]
    cpu = record["server_cpu_s"]
    wall = result["wall_s"]
    latency = result["latency_us"]
    user = record.get("server_user_s")
    out: dict[str, float | None] = {
        "server_cpu_util": cpu / wall if wall else None,
        # The user-space part: what a server's own code and TLS library cost, as
        # against the kernel's work for its sockets.
        "server_user_util": user / wall if wall and user is not None else None,
        "gen_cpu_util": result["gen_cpu_util"],
    }
    if scenario.mode == "pingpong":
        lines = result["lines"]
        out |= {
            "lines_per_s": result["lines_per_s"],
            "cpu_us_per_line": cpu * 1e6 / lines if lines else None,
            "p50_us": latency["p50"],
            "p99_us": latency["p99"],
        }
    elif scenario.mode == "handshake":
        done = result["handshakes"]
        out |= {
            "handshakes_per_s": result["handshakes_per_s"],
            "handshakes_per_cpu_s": done / cpu if cpu else None,
            "resumed_pct": 100.0 * result["resumed"] / done if done else None,
            "handshake_p50_us": latency["p50"],
            "handshake_p99_us": latency["p99"],
        }
    else:
        opened = result["opened"]
        grown = record["rss_after_kib"] - record["rss_before_kib"]
        out |= {
            "kib_per_conn": grown / opened if opened else None,
            "cpu_us_per_conn_opened": cpu * 1e6 / opened if opened else None,
        }
    return out


def flags(scenario: Scenario, record: Record) -> list[str]:
    """What makes a run's figures suspect."""
    result = record["loadgen"]
    out = []
    # Idle connections are about memory: a busy generator only makes them open slower.
    if result["gen_cpu_util"] >= SATURATED and scenario.mode != "idle":
        out.append("generator-saturated")
    if result["error_total"]:
        out.append(f"errors={result['error_total']}")
    if scenario.mode == "idle" and result["opened"] < scenario.conns:
        out.append(f"opened-only-{result['opened']}")
    if other_load(record) >= CONTENDED:
        out.append("contended")
    tls = result["tls"]
    if tls["version"] != "TLSv1.3":
        out.append(f"tls={tls['version']}")
    return out


def preference(record: Record) -> tuple[int, float]:
    """Sort key among attempts of one run: valid runs first, then the least disturbed."""
    hard = [f for f in record["flags"] if f not in {"contended", "generator-saturated"}]
    return (0 if record["ok"] and not hard else 1, other_load(record))


def other_load(record: Record) -> float:
    """The share of one core that other processes used during the measured window."""
    load: float = record.get("other_load", 0.0)
    return load


def describe(record: Record) -> str:
    """One progress line."""
    head = f"{record['scenario']:<10} {record['server']:<19}"
    if not record["ok"]:
        return f"{head} FAILED: {record.get('error', '?').splitlines()[0]}"
    shown = {
        k: v
        for k, v in record["metrics"].items()
        if v is not None and k not in {"handshake_p50_us", "handshake_p99_us"}
    }
    text = " ".join(f"{k}={v:,.3g}" if v < 100 else f"{k}={v:,.0f}" for k, v in shown.items())
    flagged = f"  [{', '.join(record['flags'])}]" if record["flags"] else ""
    return f"{head} {text}{flagged}"


def describe_strace(record: Record) -> str:
    """One progress line for an strace run."""
    if not record["ok"]:
        return (
            f"strace B {record['server']:<19} FAILED: {record.get('error', '?').splitlines()[0]}"
        )
    return f"strace B {record['server']:<19} syscalls/line={record['syscalls_per_line']:.2f}"


def versions() -> dict[str, str]:
    """The software under test and around it."""
    out = {
        "python": platform.python_version(),
        "python_ssl": ssl.OPENSSL_VERSION,
        "kernel": platform.release(),
    }
    try:
        import OpenSSL  # noqa: PLC0415 - optional, for the report only
        import twisted  # noqa: PLC0415

        out["twisted"] = twisted.__version__
        out["pyopenssl"] = OpenSSL.__version__
        out["pyopenssl_openssl"] = OpenSSL.SSL.OpenSSL_version(
            OpenSSL.SSL.OPENSSL_VERSION
        ).decode()
    except ImportError:
        pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                out["cpu"] = line.partition(":")[2].strip()
                break
    git = shutil.which("git")
    if git is not None:
        head = subprocess.run(
            [git, "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        dirty = subprocess.run(
            [git, "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "src", "twisted"],
            capture_output=True,
            check=False,
        )
        if head.returncode == 0:
            out["secure_echo_commit"] = head.stdout.strip() + (
                "+local-changes" if dirty.returncode == 1 else ""
            )
    return out


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and write the report."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.from_json is not None:
        try:
            paths = report.rewrite(args.from_json, args.baseline_list)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(paths.markdown.read_text())
        print(f"rewritten: {paths.markdown}" + (f", {paths.png}" if paths.png else ""))
        return 0
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    nofile = raise_nofile()
    if args.strace and shutil.which("strace") is None:
        print("error: --strace needs strace (apt-get install -y strace)", file=sys.stderr)
        return 2
    try:
        loadgen = build_loadgen()
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    pinning = Pinning.detect(want=not args.no_pin)
    # SIGTERM ends the run like Ctrl-C: servers stopped, temporary trees removed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="secure-echo-bench-") as tmp:
        bench = Bench(args, loadgen, pinning, Path(tmp))
        try:
            bench.unpack_revisions()
        except BenchError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        bench.run_all()
    meta = {
        "timestamp": stamp,
        "command": " ".join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "elapsed_s": round(time.time() - started, 1),
        "reps": args.reps,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "scenarios": [s.key for s in args.scenario_list],
        "servers": args.server_list,
        "baseline": args.baseline_list[0] if args.baseline_list else None,
        "baselines": args.baseline_list,
        "compare": {name: r.describe() for name, r in bench.revisions.items()},
        "pinned": pinning.enabled,
        "saturated_threshold": SATURATED,
        "contended_threshold": CONTENDED,
        "retries": args.retries,
        "retry_budget_s": args.retry_budget,
        "nofile": list(nofile),
        "cpus": os.cpu_count(),
        "versions": versions(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    paths = report.write(args.out / stamp, meta, args.scenario_list, bench.runs, bench.strace)
    print()
    print(paths.markdown.read_text())
    print(f"results: {paths.markdown}, {paths.json}" + (f", {paths.png}" if paths.png else ""))
    return 0 if all(r["ok"] for r in bench.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
