"""The rooms form layers: a room imports only rooms below it (no cycles), issue 19.

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedsteer"

#: bottom to top; a room may import its own modules and any room of a lower layer
LAYERS = [
    {"fedsteer", "settings", "files"},
    {"data", "eval"},
    {"models"},
    {"blackbox"},
    {"methods"},
    {"federation", "stacks"},  # stacks: saved artifacts as adaptations (run --on-top-of)
    {"experiment"},
    {"bench", "artifacts", "run_folder"},
    {"flower", "serve"},  # the Flower apps run experiments; serve hosts their artifacts
    {"cli"},
    {"__main__"},
]


def room_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    if len(parts) == 1:
        return "fedsteer" if parts[0] == "__init__.py" else parts[0].removesuffix(".py")
    return parts[0]


def imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and
                 node.level == 0 else [a.name for a in node.names]
                 if isinstance(node, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedsteer":
                rooms.add(parts[1] if len(parts) > 1 else "fedsteer")
    return rooms


def layer(room: str) -> int:
    for i, rooms in enumerate(LAYERS):
        if room in rooms:
            return i
    raise AssertionError(f"room {room!r} has no layer: add it to LAYERS")


def test_every_import_goes_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = room_of(path)
        for other in imported_rooms(path) - {mine}:
            if layer(other) >= layer(mine):
                upward.append(f"{path.relative_to(PACKAGE)} ({mine}) imports {other}")
    assert not upward, "\n".join(upward)


def test_the_check_sees_a_lazy_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fedsteer.experiment import RunConfig\n")
    assert imported_rooms(module) == {"experiment"}


def body_lines(node: ast.FunctionDef) -> int:
    """A function's statements, from the first after its docstring to its end (a signature
    of typed CLI options is a declaration, not logic)."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:] or body
    return body[-1].end_lineno - body[0].lineno + 1


def test_no_function_body_is_over_50_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and body_lines(node) > 50:
                long.append(f"{path.relative_to(PACKAGE)}: {node.name} ({body_lines(node)})")
    assert not long, "\n".join(long)
