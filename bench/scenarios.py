"""What the benchmark measures: the scenarios, the servers and the reported figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["pingpong", "handshake", "idle"]
Better = Literal["higher", "lower", "info"]

#: The servers compared, in the order of the first repetition.
SERVERS: tuple[str, ...] = ("secure-echo", "textbook", "asyncio", "lean")
#: Every ratio is a server's figure divided by a reference server's, from the same
#: repetition.  The first of these that ran is the reference of the main table and
#: the plot; each further one that ran gets a table of ratios of its own
#: (``--baseline`` chooses others).  textbook Twisted is the suite's long-standing
#: reference; the asyncio peer is the one issue 13's targets are stated against.
BASELINES: tuple[str, ...] = ("textbook", "asyncio")
BASELINE = BASELINES[0]
#: ``--compare REV`` runs that revision of secure-echo as a server of this name + rev.
COMPARE_PREFIX = "secure-echo@"

#: Servers ``--servers`` may add: secure-echo with ``--workers 2``, its processes free
#: to run on both cores (so sharing the generator's), for measuring the scaling.
EXTRA_SERVERS: tuple[str, ...] = (
    "secure-echo-w2",
    "secure-echo-twisted-epoll",
    "secure-echo-no-hello",
)
#: Worker processes of each extra server.
WORKERS = {"secure-echo-w2": 2}
#: The ``--reactor`` secure-echo runs on, as shipped (README, systemd unit, Kubernetes),
#: when its tree has it; revisions from before it run on Twisted's default.
REACTOR = "secure-echo-epoll"
#: secure-echo on Twisted's own epoll reactor: what ``--reactor`` is worth, in one run.
DEFAULT_REACTOR_SERVERS: tuple[str, ...] = ("secure-echo-twisted-epoll",)
#: secure-echo with options of its own added: what a feature costs, in one run.
DAEMON_OPTIONS: dict[str, tuple[str, ...]] = {"secure-echo-no-hello": ("--client-hello", "off")}

SERVER_TITLES = {
    "secure-echo": "secure-echo (twistd, JSON logging)",
    "secure-echo-w2": "secure-echo --workers 2, on both cores (the generator's too)",
    "secure-echo-twisted-epoll": "secure-echo on Twisted's own epoll reactor (no --reactor)",
    "secure-echo-no-hello": "secure-echo --client-hello off (no ClientHello summary or JA4)",
    "textbook": "textbook Twisted (LineReceiver, ssl: endpoint)",
    "asyncio": "asyncio Protocol + stdlib ssl",
    "lean": "lean Twisted (TLS in a tcp.Server subclass, private cffi handles, no protections)",
}


def server_title(
    name: str, compare: dict[str, dict[str, str]] | None = None, *, brief: bool = False
) -> str:
    """A server's description for the report; ``compare`` describes ``--compare`` servers.

    ``brief`` leaves out a revision's commit subject (for the plot's legend).
    """
    if name in SERVER_TITLES:
        return SERVER_TITLES[name]
    info = (compare or {}).get(name)
    if info is None:
        return name
    if brief:
        return f"secure-echo as of {info['date']}, same options"
    return f"secure-echo at {info['short']} ({info['date']}: {info['subject']}), same options"


def is_daemon(name: str) -> bool:
    """Whether ``name`` is secure-echo itself (this tree, a worker variant or a revision)."""
    return (
        name == "secure-echo"
        or name in WORKERS
        or name in DEFAULT_REACTOR_SERVERS
        or name in DAEMON_OPTIONS
        or name.startswith(COMPARE_PREFIX)
    )


@dataclass(frozen=True)
class Scenario:
    """One load shape; ``group`` is the letter ``--scenarios`` selects it by."""

    key: str
    group: str
    title: str
    mode: Mode
    conns: int = 1
    inflight: int = 1
    line_bytes: int = 64
    resume: bool = False
    concurrency: int = 16
    #: Whether the generator checks the server's chain and address.  Off for the
    #: handshake scenarios: the server does the same work either way, and the check
    #: (with OpenSSL 3.0 on the client) costs generator headroom there.
    verify: bool = True

    def loadgen_args(self) -> list[str]:
        """The load generator's arguments for this scenario (timings excluded)."""
        args = ["--mode", self.mode, "--line-bytes", str(self.line_bytes)]
        if self.mode == "pingpong":
            args += ["--conns", str(self.conns), "--inflight", str(self.inflight)]
        elif self.mode == "handshake":
            args += ["--concurrency", str(self.concurrency)]
            if self.resume:
                args.append("--resume")
        else:
            args += [
                "--conns",
                str(self.conns),
                "--concurrency",
                str(self.concurrency),
                "--warm-conns",
                str(IDLE_WARM_CONNS),
            ]
        return args


#: Connections an idle scenario opens and closes before the "before" RSS is read, so
#: the server's one-time costs (first handshake, lazily built state) are paid already.
IDLE_WARM_CONNS = 50

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("A", "A", "1 connection, ping-pong, 64 B lines", "pingpong", 1, 1, 64),
    Scenario("B", "B", "50 connections, ping-pong, 64 B lines", "pingpong", 50, 1, 64),
    Scenario("C", "C", "1 connection, 64 lines in flight, 64 B", "pingpong", 1, 64, 64),
    Scenario("D", "D", "10 connections x 8 in flight, 4 KiB lines", "pingpong", 10, 8, 4096),
    Scenario(
        "E-full",
        "E",
        "full handshakes: connect, handshake, 1 line, close",
        "handshake",
        verify=False,
    ),
    Scenario(
        "E-resumed",
        "E",
        "resumed handshakes (TLS 1.3 session tickets)",
        "handshake",
        resume=True,
        verify=False,
    ),
    Scenario("F-1k", "F", "1,000 idle connections", "idle", conns=1000, concurrency=32),
    Scenario("F-10k", "F", "10,000 idle connections", "idle", conns=10000, concurrency=32),
)
QUICK_GROUPS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Metric:
    """A reported figure: which scenarios have it, and which way is better."""

    key: str
    label: str
    better: Better
    spec: str
    mode: Mode
    #: Scenario keys the Markdown table shows it for (None: all of its mode).
    shown_for: tuple[str, ...] | None = None

    def applies(self, scenario: Scenario) -> bool:
        """Whether this figure exists for ``scenario``."""
        return scenario.mode == self.mode

    def shown(self, scenario: Scenario) -> bool:
        """Whether the table (and the plot) show this figure for ``scenario``."""
        return self.applies(scenario) and (
            self.shown_for is None or scenario.key in self.shown_for
        )


METRICS: tuple[Metric, ...] = (
    Metric("lines_per_s", "lines/s", "higher", ",.0f", "pingpong"),
    Metric("cpu_us_per_line", "server CPU us/line", "lower", ".2f", "pingpong"),
    Metric("p50_us", "latency p50 us", "lower", ",.0f", "pingpong", ("A", "B")),
    Metric("p99_us", "latency p99 us", "lower", ",.0f", "pingpong", ("A", "B")),
    Metric("handshakes_per_s", "handshakes/s", "higher", ",.0f", "handshake"),
    Metric("handshakes_per_cpu_s", "handshakes per server-CPU-s", "higher", ",.0f", "handshake"),
    Metric("resumed_pct", "resumed %", "info", ".0f", "handshake"),
    Metric("kib_per_conn", "KiB per idle connection", "lower", ".1f", "idle"),
)


def select(spec: str | None, *, quick: bool) -> tuple[Scenario, ...]:
    """The scenarios named by ``--scenarios`` (letters or keys), in suite order."""
    if not spec:
        groups = QUICK_GROUPS if quick else tuple(dict.fromkeys(s.group for s in SCENARIOS))
        return tuple(s for s in SCENARIOS if s.group in groups)
    wanted = {token.strip() for token in spec.split(",") if token.strip()}
    known = {s.key for s in SCENARIOS} | {s.group for s in SCENARIOS}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)}; known: {sorted(known)}")
    return tuple(s for s in SCENARIOS if s.key in wanted or s.group in wanted)
