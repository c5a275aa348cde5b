#!/usr/bin/env python3
"""Mutation-test the lifecycle's transition table, which mutmut cannot reach.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python tools/mutate_table.py            # every mutant, then the survivors
    .venv/bin/python tools/mutate_table.py --limit 20 # the first 20 only

``tools/mutate.py`` runs mutmut, which mutates functions through trampolines; the
table of :mod:`secure_echo.tls.lifecycle` is built when the module is imported,
so mutmut leaves it alone (it reports the few functions around it).  This script
makes the table's mutants itself, one file each in a scratch copy of ``src/``
(under ``.mutate/lifecycle-table/``), and runs ``tests/test_lifecycle.py``
against each:

* every phase named in a step (``_P.X``) replaced by the next phase;
* every close reason (``_R.X``) replaced by the next reason, and by ``None``;
* every action (``_A.X,``) removed from its tuple.

A mutant survives when the tests still pass.  The last lines printed are the raw
score and each survivor with its context.  Exit status: 0 when the run finished.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
MODULE: Final = Path("src/secure_echo/tls/lifecycle.py")
TESTS: Final = "tests.test_lifecycle"
#: The part of the module that builds the table: from the shared step tuples to
#: the check that every pair is defined.
REGION_START: Final = "_CLOSE = ("
REGION_END: Final = "#: Every (phase, event) pair"


def mutants(region: str, phases: list[str], reasons: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, replacement) for each mutant of ``region``."""
    found: list[tuple[int, int, str]] = []
    for match in re.finditer(r"_P\.(\w+)|_R\.(\w+)", region):
        if match.group(1):
            following = phases[(phases.index(match.group(1)) + 1) % len(phases)]
            found.append((match.start(), match.end(), f"_P.{following}"))
        else:
            following = reasons[(reasons.index(match.group(2)) + 1) % len(reasons)]
            found.append((match.start(), match.end(), f"_R.{following}"))
            found.append((match.start(), match.end(), "None"))
    found.extend((m.start(), m.end(), "") for m in re.finditer(r"_A\.\w+,\s*", region))
    return found


def main() -> int:
    """Run the mutants; print the score and the survivors."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="run only the first N mutants")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from secure_echo.tls.lifecycle import Phase  # noqa: PLC0415 - the tree under test
    from secure_echo.tls.record import CloseReason  # noqa: PLC0415

    text = (ROOT / MODULE).read_text(encoding="utf-8")
    start, end = text.index(REGION_START), text.index(REGION_END)
    region = text[start:end]
    all_mutants = mutants(region, [p.name for p in Phase], [r.name for r in CloseReason])
    if args.limit:
        all_mutants = all_mutants[: args.limit]
    work = ROOT / ".mutate" / "lifecycle-table"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(ROOT / "src", work / "src")
    target = work / MODULE
    env = {**os.environ, "PYTHONPATH": f"{work / 'src'}{os.pathsep}{ROOT}"}
    survivors: list[str] = []
    for first, last, replacement in all_mutants:
        target.write_text(
            text[:start] + region[:first] + replacement + region[last:] + text[end:],
            encoding="utf-8",
        )
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "twisted.trial",
                "--temp-directory",
                str(work / "_trial"),
                TESTS,
            ],
            cwd=work,
            env=env,
            capture_output=True,
            check=False,
            timeout=600,
        )
        if result.returncode == 0:
            context = region[max(0, first - 70) : last + 30].replace("\n", " ")
            survivors.append(f"{region[first:last]!r} -> {replacement!r}: ...{context}...")
    target.write_text(text, encoding="utf-8")
    killed = len(all_mutants) - len(survivors)
    score = f"{killed}/{len(all_mutants)} mutants killed, {len(survivors)} survived"
    print(f"{MODULE} (the table): {score}")
    for survivor in survivors:
        print(f"  survived: {survivor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
