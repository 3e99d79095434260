"""The package's layout: no import circle between its modules, short functions (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "chipprune"
CLI_LINES = 30  # a command parses, makes one API call and prints
PACKAGE_LINES = 80
TABLES = {"_parser.py"}  # the parser's table of options is one long list of add_argument calls


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The package's modules that `path` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("chipprune")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if base.startswith("chipprune"):
                found |= {f"{base}.{a.name}" for a in node.names} | {base}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the modules, or None (a depth-first search for a back edge)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_circle_finder_finds_a_circle():
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    edges = graph()
    # a package's __init__ re-exporting its modules is not a circle through them
    edges = {m: {n for n in e if not (m.startswith(n + ".") or n == m.rpartition(".")[0])} for m, e in edges.items()}
    assert circle(edges) is None, " -> ".join(circle(edges) or [])


def test_no_module_imports_the_cli():
    users = [
        m
        for m, e in graph().items()
        if not m.startswith("chipprune.cli") and any(n.startswith("chipprune.cli") for n in e)
    ]
    assert not users


def long_functions(path: Path, limit: int) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > limit
    ]


@pytest.mark.parametrize(("folder", "limit"), [("cli", CLI_LINES), ("", PACKAGE_LINES)])
def test_functions_are_short(folder, limit):
    paths = [p for p in sorted((SRC / folder).rglob("*.py")) if p.name not in TABLES]
    assert not [f for p in paths for f in long_functions(p, limit)]
