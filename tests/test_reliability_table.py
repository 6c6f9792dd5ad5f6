"""docs/reliability.md is the reliability table: each fault, how it is injected, what must hold,
and the tests that check it. This keeps it true: every row names tests, and every test it
names is defined where it says (read from the source, nothing imported or run)."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "docs" / "reliability.md"
NODE = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")
COLUMNS = ["Fault", "How it is injected", "What must hold afterwards", "Tests"]


def rows() -> list[list[str]]:
    """The table's body rows, as cells (lines of code blocks are not the table's)."""
    lines, in_code = [], False
    for line in TABLE.read_text().splitlines():
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("|"):
            lines.append(line)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells and cells[0] == COLUMNS, f"the table's header: {cells[:1]}"
    return [c for c in cells[1:] if not set("".join(c)) <= set("-: ")]


@cache
def defined_tests(path: str) -> frozenset[str]:
    """The test functions a module defines, at its top level or in its test classes."""
    tree = ast.parse((REPO / path).read_text(), filename=path)
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names.update(f.name for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef))
    return frozenset(n for n in names if n.startswith("test_"))


def test_every_row_names_its_fault_what_must_hold_and_tests() -> None:
    body = rows()
    assert len(body) >= 10
    for cells in body:
        assert len(cells) == len(COLUMNS), f"a row with {len(cells)} cells: {cells[0]}"
        assert all(cells), f"a row with an empty cell: {cells[0]}"
        assert NODE.search(cells[3]), f"{cells[0]}: no test named as `tests/...py::test_...`"


def test_every_test_the_table_names_exists() -> None:
    missing = []
    for cells in rows():
        for path, name in NODE.findall(cells[3]):
            if not (REPO / path).is_file():
                missing.append(f"{cells[0]}: {path} (no such file)")
            elif name not in defined_tests(path):
                missing.append(f"{cells[0]}: {path}::{name}")
    assert not missing, "named in docs/reliability.md but not defined:\n" + "\n".join(missing)
