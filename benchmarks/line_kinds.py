"""What the lines of some Python files are: code, docstrings and long string constants (prose),
comment-only lines, blank lines.

    python benchmarks/line_kinds.py ciscr/timing/*.py

WHY: issue 25 asks for the timing tools "a third lighter" in lines; this says how much of a
module is code that produces its outputs and how much is explanation or spacing, so a line
target can be judged against what removing the prose alone could reach.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path


def _prose_lines(tree: ast.AST) -> set[int]:
    """Lines of docstrings and of string constants over 3 lines (report prose)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            out.update(range(body[0].lineno, body[0].end_lineno + 1))
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str) and node.end_lineno - node.lineno > 3:
            out.update(range(node.lineno, node.end_lineno + 1))
    return out


def line_kinds(path: Path) -> dict[str, int]:
    """{"lines", "blank", "comment", "prose", "code"} of one file."""
    src = path.read_text()
    lines = src.splitlines()
    blank = {i for i, line in enumerate(lines, 1) if not line.strip()}
    comment = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(src).readline)
               if t.type == tokenize.COMMENT and lines[t.start[0] - 1].strip().startswith("#")}
    prose = _prose_lines(ast.parse(src)) - blank
    n = len(lines)
    return {"lines": n, "blank": len(blank), "comment": len(comment), "prose": len(prose),
            "code": n - len(blank | comment | prose)}


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python benchmarks/line_kinds.py FILE.py [FILE.py ...]", file=sys.stderr)
        return 2
    try:
        rows = {p: line_kinds(Path(p)) for p in argv}
    except (OSError, SyntaxError, UnicodeDecodeError) as err:
        print(f"line_kinds: {err}", file=sys.stderr)
        return 1
    total = {k: sum(r[k] for r in rows.values()) for k in ("lines", "blank", "comment", "prose",
                                                            "code")}
    print("| file | lines | code | prose | comment | blank |\n|---|---|---|---|---|---|")
    for name, r in [*rows.items(), ("total", total)]:
        print(f"| {name} | {r['lines']} | {r['code']} | {r['prose']} | {r['comment']} | "
              f"{r['blank']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
