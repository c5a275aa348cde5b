"""The size rule of the layout: no class under ``src/`` grows past what one can read.

A class that outgrows 350 lines is where state hides again (the connection once
held its life in a dozen flags over 590 lines): split it by responsibility, as
the lifecycle table, the deadlines and the stream writer were split out.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import secure_echo

#: The most lines (decorators excluded, docstring included) a class may span.
MAX_CLASS_LINES = 350


def class_sizes(root: Path) -> list[tuple[int, str]]:
    """Every class under ``root``: its length in lines and ``path:Name``."""
    sizes = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                sizes.append((length, f"{path.relative_to(root.parent)}:{node.name}"))
    return sizes


class ClassSizeTests(SynchronousTestCase):
    """Each class of the package stays within :data:`MAX_CLASS_LINES`."""

    def test_no_class_over_the_limit(self) -> None:
        """The longest class of the package is at most 350 lines."""
        root = Path(secure_echo.__file__).parent
        sizes = class_sizes(root)
        self.assertGreater(len(sizes), 50)
        over = sorted((s for s in sizes if s[0] > MAX_CLASS_LINES), reverse=True)
        self.assertEqual(over, [], f"split these classes: {over}")

    def test_sizes_are_measured(self) -> None:
        """The measure counts a class from its ``class`` line to its last line."""
        directory = Path(self.mktemp()) / "pkg"
        directory.mkdir(parents=True)
        body = "\n".join(f"    x{n} = {n}" for n in range(400))
        (directory / "big.py").write_text(f"class Big:\n{body}\n\n\nclass Small:\n    pass\n")
        self.assertEqual(
            sorted(class_sizes(directory)), [(2, "pkg/big.py:Small"), (401, "pkg/big.py:Big")]
        )
