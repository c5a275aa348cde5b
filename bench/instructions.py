"""Instructions per handshake of secure-echo variants, counted by valgrind's callgrind.

Timed figures on a shared machine scatter by several per cent from run to run, which
hides a cost of one or two.  Instructions executed do not scatter: this runs each
server under ``valgrind --tool=callgrind`` with counting off, lets the load generator
(scenario E: connect, handshake, one line, close) warm it up, counts only while the
generator's measured window runs, and divides by the handshakes of that window.  The
generator waits at its two sync points while counting is switched on and off, so the
window holds exactly the counted work.

Instructions are not time: Python code runs fewer instructions per cycle than
OpenSSL's, so a share of instructions understates the share of time.  Use it to see
what a change adds per connection, next to ``bench/run.py``'s same-run ratios.

    python bench/instructions.py                      # --client-hello off vs on
    python bench/instructions.py --resume --compare 2cbeb73

Needs valgrind (``apt-get install -y valgrind``) and the load generator's build
dependencies (gcc, libssl-dev).  A server under callgrind is about 50 times slower, so
each server takes about two minutes.  Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import procs
from procs import BenchError
from run import build_loadgen
from scenarios import DAEMON_OPTIONS

#: Seconds a server under callgrind gets to start listening (imports are slow there).
START_TIMEOUT = 600.0
#: Seconds it gets to exit (and write its count) after SIGTERM.
STOP_TIMEOUT = 120.0
#: The generator's concurrency: enough to keep the slowed server busy.
CONCURRENCY = 4


def count(  # noqa: PLR0917 - the run's parts, passed as they are
    name: str,
    loadgen: Path,
    pki: procs.PKI,
    workdir: Path,
    args: argparse.Namespace,
    root: Path = procs.ROOT,
) -> dict[str, float]:
    """Run server ``name`` (its tree in ``root``) under callgrind; the window's counts."""
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={workdir}/callgrind.out",
    ]
    server = procs.start_server(
        name,
        pki,
        workdir,
        procs.Pinning(enabled=False),
        root,
        wrapper=valgrind,
        start_timeout=START_TIMEOUT,
    )
    try:

        def instrument(state: str) -> None:
            subprocess.run(
                ["callgrind_control", "-i", state, str(server.pid)],
                check=True,
                capture_output=True,
            )

        generator = [
            str(loadgen),
            "--port",
            str(server.port),
            "--sync",
            "--warmup",
            str(args.warmup),
            "--duration",
            str(args.duration),
            "--max-seconds",
            str(args.warmup + args.duration + 300),
            "--mode",
            "handshake",
            "--concurrency",
            str(CONCURRENCY),
            *(["--resume"] if args.resume else []),
        ]
        run = procs.drive_loadgen(
            generator,
            on_ready=lambda _: instrument("on"),
            on_measured=lambda _: instrument("off"),
            timeout=args.warmup + args.duration + 600,
            stderr_path=workdir / "loadgen-stderr.txt",
        )
    finally:
        # callgrind writes its count as the server exits: give it time to.
        server.stop(timeout=STOP_TIMEOUT)
    result = run.result
    if result.get("error_total"):
        raise BenchError(f"{name}: the generator counted errors: {result.get('errors')}")
    stderr = workdir / "stderr.txt"
    collected = re.search(r"Collected : (\d+)", stderr.read_text(errors="replace"))
    if collected is None:
        raise BenchError(f"{name}: callgrind reported no count: {stderr}")
    handshakes = float(result["handshakes"])
    return {"instructions": float(collected.group(1)), "handshakes": handshakes}


def main() -> int:
    """Count each server in turn; print instructions per handshake and the differences."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--servers",
        default="secure-echo-no-hello,secure-echo",
        help="daemon variants; the first is the reference",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="REV",
        help="also count secure-echo as of git revision REV (as in bench/run.py)",
    )
    parser.add_argument("--resume", action="store_true", help="resumed handshakes (E-resumed)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before counting")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds counted")
    args = parser.parse_args()
    servers = args.servers.split(",")
    unknown = [name for name in servers if name != "secure-echo" and name not in DAEMON_OPTIONS]
    if unknown:
        parser.error(f"--servers: not a daemon variant: {', '.join(unknown)}")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind not found: apt-get install -y valgrind")
    loadgen = build_loadgen()
    counts = {}
    with tempfile.TemporaryDirectory(prefix="secure-echo-instructions-") as tmp:
        pki = procs.make_pki(Path(tmp))
        roots = dict.fromkeys(servers, procs.ROOT)
        for rev in args.compare:
            revision = procs.unpack_revision(rev, Path(tmp) / "revisions")
            roots[revision.name] = revision.root
            servers.append(revision.name)
        for name in servers:
            counts[name] = count(name, loadgen, pki, Path(tmp) / name, args, roots[name])
            per = counts[name]["instructions"] / counts[name]["handshakes"]
            handshakes = counts[name]["handshakes"]
            print(f"{name}: {handshakes:.0f} handshakes, {per:,.0f} instructions each", flush=True)
    first = servers[0]
    reference = counts[first]["instructions"] / counts[first]["handshakes"]
    scenario = "E-resumed" if args.resume else "E-full"
    print(f"\n{scenario}, instructions per handshake (callgrind), against {first}:")
    for name in servers:
        per = counts[name]["instructions"] / counts[name]["handshakes"]
        print(f"  {name:28} {per:>12,.0f}  {per - reference:>+10,.0f}  {per / reference:.4f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
