"""Print trial's result as one plain line: ``N passed, N failed[, N skipped]``.

Reads the summary trial prints last, e.g. ``FAILED (skips=2, failures=1,
successes=120)`` or ``PASSED (successes=123)``.  Errors and unexpected successes
count as failures, expected failures as passes.
"""

import re
import sys
from pathlib import Path


def main() -> int:
    """Parse the log named on the command line and print the summary line."""
    text = Path(sys.argv[1]).read_text(errors="replace")
    match = None
    for match in re.finditer(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", text, re.MULTILINE):
        pass
    if match is None:
        print("0 passed, 1 failed")
        print("trial printed no summary", file=sys.stderr)
        return 1
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    failed = (
        counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    )
    skipped = counts.get("skips", 0)
    line = f"{passed} passed, {failed} failed"
    if skipped:
        line += f", {skipped} skipped"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
