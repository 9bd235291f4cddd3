"""The package is layered: imports only go down (docs/architecture.md).

    errors, process, hostmemory -> config -> data, model, runs -> evaluation -> training
        -> launch, inspection -> cli, quickstart, docgen

A module may import its own layer or a lower one, never a higher one, and no chain of imports
(module-level or inside a function: a lazy import is still a dependency) may close a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cpt_cli"

LAYERS: list[set[str]] = [
    {"errors", "process", "hostmemory"},
    {"config"},
    {"data", "model", "runs"},
    {"evaluation"},
    {"training"},
    {"launch", "inspection"},
    {"cli", "quickstart", "docgen", "__main__", "__init__"},
]


def layer_of(module: str) -> int:
    """`cpt_cli.data.cache` -> the layer of `data`."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its top-level name {top!r} is in no layer of "
                         "tests/test_layers.py; add it to LAYERS (and to docs/architecture.md)")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1] if len(parts) > 2 else [parts[0], "__init__"]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every cpt_cli module `path` imports, with the line: `from cpt_cli.x import y` names
    `cpt_cli.x.y` when that is a module, else `cpt_cli.x`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("cpt_cli")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("cpt_cli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if _is_module(sub) else node.module, node.lineno))
    return found


def _is_module(name: str) -> bool:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _graph() -> dict[str, list[tuple[str, int]]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        # `from cpt_cli import __version__` reads the package's version string, not a layer.
        graph[name] = [(m if m != "cpt_cli" else "cpt_cli.__init__", line)
                       for m, line in imports_of(path)
                       if not (m == "cpt_cli" and _imports_only_version(path, line))]
    return graph


def _imports_only_version(path: Path, line: int) -> bool:
    return "import __version__" in path.read_text().splitlines()[line - 1]


def test_every_module_is_in_a_layer() -> None:
    for name in _graph():
        layer_of(name)


def test_imports_only_go_down() -> None:
    upward = []
    for name, imported in _graph().items():
        for target, line in imported:
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} (line {line}) imports {target}: layer {layer_of(name)} "
                              f"may not import layer {layer_of(target)}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = _graph()
    edges = {name: sorted({t for t, _ in imported if t in graph and t != name})
             for name, imported in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in edges:
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """The rules can fail: data importing training is named as going up."""
    assert layer_of("cpt_cli.data.prepare") < layer_of("cpt_cli.training.loop")
    assert layer_of("cpt_cli.errors") == 0 and layer_of("cpt_cli.cli.train") == len(LAYERS) - 1
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("cpt_cli.unplaced")


MAX_BODY_LINES = 80


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end: a Typer command's
    signature (its options, one per parameter) and a docstring are not the body."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and \
            isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1  # type: ignore[operator]


def test_no_function_body_is_longer_than_a_screen() -> None:
    """The training loop's step body and every other function read on one screen
    (docs/architecture.md); a longer one is split into named parts."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                    _body_lines(node) > MAX_BODY_LINES:
                long.append(f"{module_name(path)}.{node.name}: {_body_lines(node)} lines")
    assert not long, f"functions over {MAX_BODY_LINES} lines:\n" + "\n".join(long)
