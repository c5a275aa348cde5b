#!/usr/bin/env python3
"""Mutation-test one source module with the in-process tests that exercise it.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python tools/mutate.py src/secure_echo/line/framing.py
    .venv/bin/python tools/mutate.py secure_echo.line.protocol tests/test_protocol.py
    .venv/bin/python tools/mutate.py --list
    .venv/bin/python tools/mutate.py secure_echo.wire.clienthello --only '*x__remember*'

mutmut 3.8 (``pip install -e '.[dev]'`` brings it) mutates the module, runs the
tests against each mutant through pytest (trial's TestCases are unittest cases,
which pytest runs) and reports which mutants no test noticed.  The run happens in a
scratch copy of the project under ``.mutate/<module>/`` so the work tree stays
clean and several modules can run at once.  Each run starts afresh (mutmut's cache
would keep a survivor's verdict after a test that kills it was added); ``--keep``
reuses it.

Settings that make mutmut work on this project (written into the scratch copy's
``pyproject.toml``):

* ``process_isolation = "forkserver"``: the hypothesis tests are not safe to fork
  from a process that already ran the suite;
* ``also_copy``: the tests read ``contrib/`` and ``docs/`` and import the plugin
  under ``twisted/``;
* the tests are the module's own test files only (:data:`TESTS`): mutants that
  only the real-daemon tests reach run in a subprocess mutmut cannot see, so those
  tests would only add time.

The last lines printed are the raw score (killed / all mutants) and every
survivor's name; ``mutmut show NAME`` in the scratch directory prints its diff.
Exit status: 0 when the run finished (survivors or not), 1 when it could not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
#: The tests that exercise each module in-process (paths relative to ROOT).
TESTS: Final[dict[str, tuple[str, ...]]] = {
    "src/secure_echo/line/framing.py": ("tests/test_framing.py",),
    "src/secure_echo/line/protocol.py": (
        "tests/test_protocol.py",
        "tests/test_info_line.py",
        "tests/test_handler.py",
    ),
    "src/secure_echo/line/handler.py": ("tests/test_handler.py", "tests/test_protocol.py"),
    "src/secure_echo/wire/proxy.py": (
        "tests/test_proxyproto.py",
        "tests/test_proxyreader.py",
        "tests/test_proxy_wire_mutants.py",
    ),
    "src/secure_echo/tls/allowlist.py": (
        "tests/test_allowlist.py",
        "tests/test_allowlist_mutants.py",
        "tests/test_mtls_allowlist.py",
    ),
    "src/secure_echo/tls/recordio.py": (
        "tests/test_recordio.py",
        "tests/test_recordio_mutants.py",
        "tests/test_stream.py",
    ),
    "src/secure_echo/tls/lifecycle.py": ("tests/test_lifecycle.py",),
    "src/secure_echo/wire/clienthello.py": (
        "tests/test_clienthello.py",
        "tests/test_clienthello_layouts.py",
    ),
    "src/secure_echo/tls/offered.py": ("tests/test_offered.py",),
    "src/secure_echo/edge/limits.py": ("tests/test_limits.py",),
}
#: Directories and files the scratch copy needs besides ``src/`` and ``tests/``.
COPIED: Final = ("src", "tests", "twisted", "contrib", "docs", "pyproject.toml", "README.md")


def module_path(name: str) -> str:
    """``src/secure_echo/x/y.py`` for a path or a dotted name (``secure_echo.x.y``)."""
    if name.endswith(".py"):
        path = Path(name)
        if path.is_absolute():
            path = path.relative_to(ROOT)
        return path.as_posix()
    return "src/" + name.replace(".", "/") + ".py"


def scratch_copy(work: Path) -> None:
    """Refresh ``work`` with the project's current files (mutmut's state is kept)."""
    work.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = ROOT / name
        target = work / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(
                source, target, ignore=shutil.ignore_patterns("__pycache__", "_trial_temp*")
            )
        elif source.is_file():
            shutil.copy2(source, target)


def mutmut_settings(module: str, tests: tuple[str, ...]) -> str:
    """The ``[tool.mutmut]`` table for mutating ``module`` with ``tests``."""

    def toml_list(items: tuple[str, ...]) -> str:
        return "[" + ", ".join(f'"{item}"' for item in items) + "]"

    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {toml_list((module,))}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        "# -p no:cacheprovider: no .pytest_cache in the scratch copy.\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
        'also_copy = ["contrib", "docs", "twisted", "README.md"]\n'
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run mutmut on one module; print the score and the survivors."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", help="src/secure_echo/... .py or secure_echo.x.y")
    parser.add_argument("tests", nargs="*", help="test files (default: the module's own)")
    parser.add_argument("--list", action="store_true", help="show the known modules and exit")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("-v", "--verbose", action="store_true", help="show mutmut's progress")
    parser.add_argument("--keep", action="store_true", help="reuse the last run's verdicts")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="run only the mutants whose mutmut names match (repeatable), e.g. "
        "'secure_echo.wire.clienthello.x__remember__mutmut_*'; the score counts those",
    )
    args = parser.parse_args(argv)
    if args.list or not args.module:
        for module, tests in TESTS.items():
            print(module, " ".join(tests))
        return 0 if args.list else 1
    module = module_path(args.module)
    if not (ROOT / module).is_file():
        print(f"mutate: no such module: {module}", file=sys.stderr)
        return 1
    tests = tuple(args.tests) or TESTS.get(module, ())
    tests = tuple(t for t in tests if (ROOT / t).is_file())
    if not tests:
        print(f"mutate: name the tests for {module} (none known)", file=sys.stderr)
        return 1
    work = ROOT / ".mutate" / Path(module).with_suffix("").as_posix().replace("/", ".")
    if not args.keep:
        shutil.rmtree(work / "mutants", ignore_errors=True)
    scratch_copy(work)
    with (work / "pyproject.toml").open("a") as config:
        config.write(mutmut_settings(module, tests))
    python = sys.executable
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    with (work / "mutmut.log").open("wb") as log:
        run = subprocess.run(
            [python, "-m", "mutmut", "run", "--max-children", str(args.max_children), *args.only],
            cwd=work,
            env=env,
            stdout=None if args.verbose else log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if run.returncode != 0:
        print(
            f"mutate: mutmut run failed ({run.returncode}); see {work}/mutmut.log", file=sys.stderr
        )
        return 1
    meta = work / "mutants" / (module + ".meta")
    codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}
    if args.only:
        codes = {n: c for n, c in codes.items() if any(fnmatch(n, g) for g in args.only)}
    # mutmut's exit codes: 1 and 3 killed, 0 survived, 5 and 33 no test ran it,
    # 24/36/152/255 (and -24) timed out, which counts as detected.
    killed = sorted(n for n, c in codes.items() if c in {1, 3, 24, 36, 152, 255, -24})
    survived = sorted(n for n, c in codes.items() if c == 0)
    untested = sorted(n for n, c in codes.items() if c in {5, 33})
    other = sorted(n for n, c in codes.items() if n not in {*killed, *survived, *untested})
    total = len(codes)
    score = 100 * len(killed) / total if total else 0.0
    print(
        f"\n{module}: {len(killed)}/{total} mutants killed ({score:.1f}%), "
        f"{len(survived)} survived, {len(untested)} reached by no test, {len(other)} other"
    )
    for label, names in (("survived", survived), ("no test", untested), ("other", other)):
        for name in names:
            print(f"  {label}: {name}")
    print(f"diffs: cd {work.relative_to(ROOT)} && {python} -m mutmut show NAME")
    return 0


if __name__ == "__main__":
    sys.exit(main())
