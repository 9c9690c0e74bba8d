"""Fail when a module or a function of the product code outgrows what a reader takes in at once.

    python scripts/check_sizes.py            # `make lint` runs it

Limits (issue "The server's house"): no module over 400 lines, no function over 60 lines. A function whose body
is one literal (a table) is exempt. Tests and generated code are not checked.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("server", "modelstore", "scripts", "benchmarks", "deploy", "clients/python")
SKIPPED_PARTS = {"v1", "node_modules", ".venv", "__pycache__"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _is_table(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, (ast.Dict, ast.List))


def problems(path: Path) -> list[str]:
    text = path.read_text()
    found = []
    lines = text.count("\n") + 1
    relative = path.relative_to(ROOT)
    if lines > MAX_MODULE_LINES:
        found.append(f"{relative}: {lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_table(node):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{relative}:{node.lineno}: {node.name} is {length} lines (at most {MAX_FUNCTION_LINES})")
    return found


def main() -> int:
    found: list[str] = []
    for folder in CHECKED:
        for path in sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else []:
            if not SKIPPED_PARTS & set(path.relative_to(ROOT).parts):
                found.extend(problems(path))
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
