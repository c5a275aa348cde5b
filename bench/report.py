"""Turn run records into same-run ratios: a Markdown table, a JSON file and a PNG plot.

Rules the numbers follow (see bench/README.md):

* A ratio is a server's figure divided by the reference server's (the baseline's)
  figure **from the same repetition**; a repetition without a valid baseline run gives
  no ratio.  The first baseline is the reference of the main table and the plot; each
  further one gets a table of ratios of its own.
* Medians and min-max spreads are taken across repetitions, of the figures and of the
  per-repetition ratios (never a ratio of medians).
* A run with echo errors, missing connections or another TLS version is left out of the
  figures and listed; a run whose generator core was saturated stays in, marked.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scenarios import (
    EXTRA_SERVERS,
    METRICS,
    SCENARIOS,
    SERVERS,
    Metric,
    Scenario,
    server_title,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

Record = dict[str, Any]
Stat = dict[str, Any]

MU = "\u00b5"
TIMES = "\u00d7"
DASH = "\u2013"
UP = "\u2191"
DOWN = "\u2193"
WARN = "\u26a0"
DIVIDE = "\u00f7"
SATURATED_PCT = "\u2265 90 %"
DAGGER = "\u2020"
SATURATED_FLAG = "generator-saturated"
CONTENDED_FLAG = "contended"
#: Flags that leave a run's figures in (marked); any other flag takes them out.
SOFT_FLAGS = frozenset({SATURATED_FLAG, CONTENDED_FLAG})


@dataclass(frozen=True)
class Paths:
    """Where the report went."""

    markdown: Path
    json: Path
    png: Path | None


def label(metric: Metric) -> str:
    """A figure's name for people: units spelled properly, direction marked."""
    text = metric.label.replace(" us", f" {MU}s")
    arrow = {"higher": f" {UP}", "lower": f" {DOWN}", "info": ""}[metric.better]
    return text + arrow


def valid(record: Record) -> bool:
    """A run whose figures count: it finished, and only soft flags (marked) are raised."""
    return bool(record["ok"]) and all(f in SOFT_FLAGS for f in record["flags"])


def _stat(values: list[float]) -> Stat:
    return {
        "values": values,
        "median": statistics.median(values) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


Summary = dict[str, dict[str, dict[str, Stat]]]


def baselines_of(meta: dict[str, Any]) -> list[str]:
    """The reference servers of a report, first the main one (older JSON: one or none)."""
    if "baselines" in meta:
        return list(meta["baselines"] or [])
    return [meta["baseline"]] if meta.get("baseline") in meta["servers"] else []


def summarize(
    scenarios: Sequence[Scenario],
    runs: Sequence[Record],
    servers: Sequence[str],
    baseline: str | None,
) -> Summary:
    """Per scenario, server and figure: values and ratios to ``baseline``, with spreads."""
    by_key = {(r["rep"], r["scenario"], r["server"]): r for r in runs if valid(r)}
    reps = sorted({r["rep"] for r in runs})
    summary: dict[str, dict[str, dict[str, Stat]]] = {}
    for scenario in scenarios:
        per_server: dict[str, dict[str, Stat]] = {}
        for server in servers:
            per_metric: dict[str, Stat] = {}
            for metric in (m for m in METRICS if m.applies(scenario)):
                values, ratios, saturated, contended = [], [], False, False
                for rep in reps:
                    run = by_key.get((rep, scenario.key, server))
                    value = run["metrics"].get(metric.key) if run else None
                    if run is None or value is None:
                        continue
                    values.append(value)
                    saturated |= SATURATED_FLAG in run["flags"]
                    contended |= CONTENDED_FLAG in run["flags"]
                    base = by_key.get((rep, scenario.key, baseline)) if baseline else None
                    base_value = base["metrics"].get(metric.key) if base else None
                    if base_value:
                        ratios.append(value / base_value)
                stat = _stat(values)
                ratio = _stat(ratios)
                stat |= {
                    "ratios": ratios,
                    "ratio_median": ratio["median"],
                    "ratio_min": ratio["min"],
                    "ratio_max": ratio["max"],
                    "generator_saturated": saturated,
                    "contended": contended,
                }
                per_metric[metric.key] = stat
            per_server[server] = per_metric
        summary[scenario.key] = per_server
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def cell(stat: Stat, metric: Metric, *, baseline: bool, values: bool = True) -> str:
    """One table cell: median (spread), and for non-baseline servers the ratio.

    Without ``values`` a non-baseline cell shows only the ratio (and its spread), or
    the value of a figure that has no ratio (``resumed %``).
    """
    if stat["median"] is None:
        return "n/a"
    parts = []
    if values or baseline or metric.better == "info":
        value = _fmt(stat["median"], metric.spec)
        if len(stat["values"]) > 1 and baseline:
            value += f" ({_fmt(stat['min'], metric.spec)}{DASH}{_fmt(stat['max'], metric.spec)})"
        parts.append(value)
    if not baseline and metric.better != "info" and stat["ratio_median"] is not None:
        ratio = f"**{stat['ratio_median']:.2f}{TIMES}**"
        if len(stat["ratios"]) > 1:
            ratio += f" ({stat['ratio_min']:.2f}{DASH}{stat['ratio_max']:.2f})"
        parts.append(ratio)
    text = " \u00b7 ".join(parts) or "n/a"
    if stat["generator_saturated"]:
        text += f" {WARN}"
    if stat["contended"]:
        text += f" {DAGGER}"
    return text


def _column_order(servers: Sequence[str], baseline: str | None) -> list[str]:
    """The baseline first, then the others in suite order, then ``--compare`` revisions."""
    known = [s for s in (*SERVERS, *EXTRA_SERVERS) if s in servers]
    rest = [s for s in (*known, *(s for s in servers if s not in known)) if s != baseline]
    return [baseline, *rest] if baseline is not None and baseline in servers else rest


def results_table(
    scenarios: Sequence[Scenario],
    summary: Summary,
    servers: Sequence[str],
    baseline: str | None,
    *,
    values: bool = True,
) -> list[str]:
    """One row per scenario and figure, one column per server, ratios to ``baseline``.

    Without ``values`` the other servers' cells show only their ratios.
    """
    columns = _column_order(servers, baseline)
    heads = [f"{s} (reference)" if s == baseline else s for s in columns]
    lines = [
        "| scenario | figure | " + " | ".join(heads) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for scenario in scenarios:
        for metric in (m for m in METRICS if m.shown(scenario)):
            cells = [
                cell(
                    summary[scenario.key][s][metric.key],
                    metric,
                    baseline=s == baseline,
                    values=values,
                )
                for s in columns
            ]
            title = f"**{scenario.key}** {scenario.title}"
            lines.append(f"| {title} | {label(metric)} | " + " | ".join(cells) + " |")
    return lines


def _pct(values: Iterable[float | None], pick: str) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    value = statistics.median(present) if pick == "median" else max(present)
    return f"{100 * value:.0f} %"


def headroom_table(
    scenarios: Sequence[Scenario], runs: Sequence[Record], servers: Sequence[str]
) -> list[str]:
    """How busy each core was during the measured windows, and which runs are flagged."""
    lines = [
        (
            "| scenario | server | server core busy (median) | of it user space (median) "
            "| generator core busy (max) | other processes (max) | flags |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for scenario in scenarios:
        for server in servers:
            mine = [r for r in runs if r["scenario"] == scenario.key and r["server"] == server]
            done = [r for r in mine if r["ok"]]
            flagged = [
                f"rep {r['rep'] + 1}: {', '.join(r['flags'])}" for r in done if r["flags"]
            ] + [f"rep {r['rep'] + 1}: FAILED" for r in mine if not r["ok"]]
            server_busy = _pct((r["metrics"]["server_cpu_util"] for r in done), "median")
            server_user = _pct((r["metrics"].get("server_user_util") for r in done), "median")
            generator_busy = _pct((r["metrics"]["gen_cpu_util"] for r in done), "max")
            other = _pct((r.get("other_load") for r in done), "max")
            lines.append(
                f"| {scenario.key} | {server} | {server_busy} | {server_user} | "
                f"{generator_busy} | {other} | {'; '.join(flagged) or ''} |"
            )
    return lines


def strace_table(strace: Sequence[Record]) -> list[str]:
    """Syscalls per line in scenario B, and the biggest contributors."""
    lines = ["| server | syscalls/line | biggest, per line |", "|---|---|---|"]
    for record in strace:
        if not record["ok"]:
            error = record.get("error", "failed").splitlines()[0]
            lines.append(f"| {record['server']} | n/a | {error} |")
            continue
        counts = {k: v for k, v in record["syscalls"].items() if k != "total"}
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
        per = ", ".join(f"{name} {calls / record['lines']:.2f}" for name, calls in top)
        lines.append(f"| {record['server']} | {record['syscalls_per_line']:.2f} | {per} |")
    return lines


def tls_summary(runs: Sequence[Record]) -> str:
    """The TLS parameters the runs negotiated (all should be the same)."""
    seen = sorted(
        {
            f"{r['loadgen']['tls']['version']} {r['loadgen']['tls']['cipher']} "
            f"{r['loadgen']['tls']['group']}"
            for r in runs
            if r["ok"] and r["loadgen"]["tls"]["version"]
        }
    )
    return "; ".join(seen) or "n/a"


def how_to_read(baseline: str | None) -> str:
    """What the main table's cells mean."""
    if baseline is None:
        return (
            "Each cell is the median across repetitions, with its spread (min"
            f"{DASH}max). No reference server ran (see `--baseline`), so there are no "
            f"ratios. {UP} higher is better, {DOWN} lower is better. {LEGEND}"
        )
    return (
        f"Reference for every ratio in this table and in the plot: **{baseline}**. Each cell "
        f"is the median across repetitions. For {baseline} the spread (min{DASH}max) "
        f"follows; for the others, the ratio to {baseline} measured in the same repetition "
        f"(median of the per-repetition ratios, then their min{DASH}max). {UP} higher is "
        f"better, {DOWN} lower is better; ratios are always server {DIVIDE} {baseline}. {LEGEND}"
    )


LEGEND = (
    f"{WARN}: in at least one repetition the generator's core was {SATURATED_PCT} busy, so "
    "that throughput may be the generator's limit, not the server's. "
    f"{DAGGER}: in at least one repetition other processes on the machine used 10 % or more "
    "of a core (after the allowed runs-again)."
)


def markdown(
    meta: dict[str, Any],
    scenarios: Sequence[Scenario],
    runs: Sequence[Record],
    summaries: dict[str | None, Summary],
    strace: Sequence[Record],
) -> str:
    """The whole Markdown report; ``summaries`` holds one summary per baseline, main first."""
    servers = meta["servers"]
    main_baseline, *other_baselines = list(summaries)
    v = meta["versions"]
    pinned = (
        "server pinned to CPU 0, load generator to CPU 1 (taskset)"
        if meta["pinned"]
        else "NOT pinned (no taskset or fewer than 2 CPUs): figures are noisier"
    )
    loadgen_ssl = next((r["loadgen"]["openssl"] for r in runs if r["ok"]), "n/a")
    run_line = (
        f"`{meta['command']}`: {meta['reps']} repetition(s), {meta['warmup_s']:g} s warm-up + "
        f"{meta['duration_s']:g} s measured per run (A{DASH}E), a fresh server per run, "
        f"server order rotated per repetition; {pinned}; took {meta['elapsed_s']:.0f} s."
    )
    version_line = (
        f"Versions: secure-echo {v.get('secure_echo_commit', '?')}, Python {v['python']}, "
        f"Twisted {v.get('twisted', '?')}, pyOpenSSL {v.get('pyopenssl', '?')} "
        f"({v.get('pyopenssl_openssl', '?')}), stdlib ssl ({v['python_ssl']}), "
        f"load generator ({loadgen_ssl}); kernel {v['kernel']}; {v.get('cpu', '?')}, "
        f"{meta['cpus']} CPUs."
    )
    headroom = (
        "Share of the measured wall time each pinned core spent running the process "
        f"(CPU time {DIVIDE} wall time); for the server also the part of it in user space "
        "(its own code and its TLS library; the rest is the kernel's work for its sockets). "
        f"A generator at {SATURATED_PCT} or more is flagged. "
        "Other processes: CPU time that every other user-space process on the machine used "
        f"in the window, {DIVIDE} wall time; with both cores pinned, it was taken from the "
        "server or the generator."
    )
    out = [
        f"# secure-echo benchmark {meta['timestamp']}",
        "",
        run_line,
        "",
        "Servers: "
        + "; ".join(f"**{s}**: {server_title(s, meta.get('compare'))}" for s in servers)
        + ".",
        "",
        version_line,
        "",
        f"Negotiated TLS: {tls_summary(runs)}.",
        "",
        f"## Results{f' (ratios to {main_baseline})' if main_baseline else ''}",
        "",
        how_to_read(main_baseline),
        "",
        *results_table(scenarios, summaries[main_baseline], servers, main_baseline),
        "",
    ]
    for other in other_baselines:
        out += [
            f"## Ratios to {other}",
            "",
            (
                f"The same runs, with **{other}** as the reference: its median (min{DASH}max), "
                f"and for every other server the median of its per-repetition ratios to "
                f"{other} (min{DASH}max). {UP} higher is better, {DOWN} lower is better; "
                f"{WARN} and {DAGGER} as above."
            ),
            "",
            *results_table(scenarios, summaries[other], servers, other, values=False),
            "",
        ]
    out += [
        "## Headroom",
        "",
        headroom,
        "",
        *headroom_table(scenarios, runs, servers),
    ]
    if strace:
        out += [
            "",
            "## Syscalls per line (scenario B, `strace -c -f`, one short run per server)",
            "",
            (
                "Counted between two quiescent points, so every syscall belongs to the lines "
                "counted. strace slows the server a lot; only the counts mean anything."
            ),
            "",
            *strace_table(strace),
        ]
    failed = [r for r in runs if not r["ok"]]
    if failed:
        out += ["", "## Failed runs", ""]
        out += [
            f"- rep {r['rep'] + 1} {r['scenario']} {r['server']}: "
            f"{r.get('error', '?').splitlines()[0]}"
            for r in failed
        ]
    return "\n".join(out) + "\n"


def _ratio_ticks(low: float, high: float) -> list[float]:
    candidates = [0.1, 0.2, 0.25, 0.33, 0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0]
    return [t for t in candidates if low <= t <= high]


#: Bar colours; ``--compare`` revisions take the spare ones in turn.
COLORS = {
    "secure-echo": "#1f77b4",
    "asyncio": "#ff7f0e",
    "secure-echo-w2": "#2ca02c",
    "lean": "#9467bd",
    "textbook": "#8c564b",
}
SPARE_COLORS = ("#7f7f7f", "#17becf", "#bcbd22", "#e377c2", "#d62728")


def plot(
    path: Path,
    meta: dict[str, Any],
    scenarios: Sequence[Scenario],
    summary: Summary,
    baseline: str | None,
) -> Path | None:
    """Bars of the median ratios (log scale, drawn from 1) with min-max whiskers.

    Returns None (and writes nothing) without matplotlib or without anything to compare.
    """
    try:
        import matplotlib as mpl  # noqa: PLC0415 - optional dependency (the bench extra)

        mpl.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
        from matplotlib.ticker import FixedLocator, NullLocator  # noqa: PLC0415
    except ImportError:
        print("warning: matplotlib missing (pip install -e '.[bench]'); no PNG written")
        return None
    others = [s for s in _column_order(meta["servers"], baseline) if s != baseline]
    panels = [
        (
            better,
            [
                (scenario, metric)
                for scenario in scenarios
                for metric in METRICS
                if metric.shown(scenario) and metric.better == better
            ],
        )
        for better in ("higher", "lower")
    ]
    panels = [(b, rows) for b, rows in panels if rows]
    if baseline is None or not others or not panels:
        return None
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(14, 4.8 * len(panels)), squeeze=False, layout="constrained"
    )
    width = 0.8 / len(others)
    spare = iter(SPARE_COLORS * len(others))
    colors = {s: COLORS.get(s) or next(spare) for s in others}
    for ax, (better, rows) in zip(axes[:, 0], panels, strict=True):
        extremes = [1.0]
        for i, server in enumerate(others):
            stats = [summary[s.key][server][m.key] for s, m in rows]
            medians = [st["ratio_median"] or 1.0 for st in stats]
            lows = [st["ratio_min"] or m for m, st in zip(medians, stats, strict=True)]
            highs = [st["ratio_max"] or m for m, st in zip(medians, stats, strict=True)]
            extremes += lows + highs
            xs = [x + (i - (len(others) - 1) / 2) * width for x in range(len(rows))]
            bars = ax.bar(
                xs,
                [m - 1.0 for m in medians],
                width,
                bottom=1.0,
                yerr=[
                    [m - lo for m, lo in zip(medians, lows, strict=True)],
                    [hi - m for m, hi in zip(medians, highs, strict=True)],
                ],
                capsize=3,
                label=f"{server}: {server_title(server, meta.get('compare'), brief=True)}",
                color=colors.get(server),
            )
            names = [
                f"{m:.2f}" if st["ratio_median"] is not None else "n/a"
                for m, st in zip(medians, stats, strict=True)
            ]
            ax.bar_label(bars, labels=names, fontsize=7, padding=2)
        low, high = min(extremes) / 1.3, max(extremes) * 1.3
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.yaxis.set_major_locator(FixedLocator(_ratio_ticks(low, high)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_yticklabels([f"{t:g}" for t in _ratio_ticks(low, high)])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="y", linewidth=0.3, alpha=0.6)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(
            [f"{s.key}\n{textwrap.fill(label(m), 16)}" for s, m in rows], fontsize=8
        )
        ax.set_ylabel(f"ratio to {baseline} (log scale)")
        ax.set_title(
            f"{better} is better: server {DIVIDE} {baseline} in the same repetition; "
            f"bar: median, whiskers: min{DASH}max over {meta['reps']} repetition(s)",
            fontsize=10,
        )
        if ax is axes[0, 0]:  # the same servers and colours in every panel
            ax.legend(fontsize=8)
    fig.suptitle(f"secure-echo benchmark {meta['timestamp']}: ratios to {baseline} (= 1)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rewrite(json_path: Path, baselines: Sequence[str] | None = None) -> Paths:
    """Render the Markdown and PNG again from a JSON file this module wrote.

    ``baselines`` replaces the reference servers the run chose (ValueError if one of
    them did not run); the report then goes next to the original, as
    ``<stem>-vs-<first baseline>``, and the original stays as it was.
    """
    document = json.loads(json_path.read_text())
    meta = document["meta"]
    if baselines is not None:
        if missing := [b for b in baselines if b not in meta["servers"]]:
            raise ValueError(
                f"--baseline {','.join(missing)}: not among the servers of {json_path} "
                f"({', '.join(meta['servers'])})"
            )
        meta = meta | {"baseline": baselines[0] if baselines else None, "baselines": baselines}
        stem = json_path.with_name(f"{json_path.stem}-vs-{baselines[0] if baselines else 'none'}")
    else:
        stem = json_path.with_suffix("")
    keys = set(meta["scenarios"])
    chosen = [s for s in SCENARIOS if s.key in keys]
    return write(stem, meta, chosen, document["runs"], document["strace"])


def write(
    stem: Path,
    meta: dict[str, Any],
    scenarios: Sequence[Scenario],
    runs: Sequence[Record],
    strace: Sequence[Record],
) -> Paths:
    """Write ``stem``.md, .json and .png; return their paths.

    The JSON's ``summary`` holds the ratios to the main baseline, ``summaries`` those
    to every baseline.
    """
    baselines: list[str | None] = [*baselines_of(meta)] or [None]
    summaries = {b: summarize(scenarios, runs, meta["servers"], b) for b in baselines}
    main = summaries[baselines[0]]
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown(meta, scenarios, runs, summaries, strace))
    json_path = stem.with_suffix(".json")
    document = {
        "meta": meta,
        "summary": main,
        "summaries": {b: summaries[b] for b in baselines if b is not None},
        "runs": list(runs),
        "strace": list(strace),
    }
    json_path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    png_path = plot(stem.with_suffix(".png"), meta, scenarios, main, baselines[0])
    return Paths(md_path, json_path, png_path)
