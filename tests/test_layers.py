"""The layer rules of docs/design.md, checked on the source: who may import whom.

Imports are read with `ast` from every module of `annotate` and `trainer`, including the
ones inside functions (a lazy import is still a dependency), so a rule broken anywhere
fails here, naming the module and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("annotate", "trainer")
# Above the service layer: the composition root, the command line, the web layer.
MAY_USE_THE_WEB = ("annotate.serve", "annotate.cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for each import in the file; `from a
    import b` counts as a.b where a.b is a module of ours, else as a."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, base] if base else package)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out += [(t, node.lineno, id(node) in top_level) for t in dict.fromkeys(targets)]
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _ours(target: str) -> str | None:
    """The module of ours an import names (a.b.c -> the longest known prefix), or None."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    return None


def _where(name: str, line: int) -> str:
    return f"{MODULES[name].relative_to(ROOT)}:{line}"


def test_the_library_never_imports_the_app_or_gradio():
    bad = [
        f"{_where(m, line)} imports {t}"
        for m, imports in GRAPH.items()
        if m.startswith("trainer")
        for t, line, _ in imports
        if t.split(".")[0] in ("annotate", "gradio")
    ]
    assert not bad, "trainer must not depend on the app:\n" + "\n".join(bad)


def test_the_service_layer_never_imports_the_web_layer_or_gradio():
    bad = []
    for m, imports in GRAPH.items():
        if not m.startswith("annotate") or m.startswith("annotate.web") or m in MAY_USE_THE_WEB:
            continue
        bad += [
            f"{_where(m, line)} imports {t}"
            for t, line, _ in imports
            if t.split(".")[0] == "gradio" or t.startswith("annotate.web")
        ]
    assert not bad, "service-layer modules must not depend on gradio or annotate.web:\n" + "\n".join(bad)


def test_no_import_circles():
    edges = {
        m: sorted({o for t, _, _ in imports if (o := _ours(t)) and o != m}) for m, imports in GRAPH.items()
    }
    # A package's __init__ importing its own submodules is how packages work, not a circle.
    edges = {m: [o for o in out if not o.startswith(m + ".")] for m, out in edges.items()}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        stack.append(m)
        for o in edges[m]:
            if state.get(o) == "open":
                cycles.append(" -> ".join(stack[stack.index(o) :] + [o]))
            elif o not in state:
                visit(o, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycles, "import circles (counting imports inside functions):\n" + "\n".join(cycles)


def test_the_checker_sees_imports_inside_functions():
    # The rules above are only as good as the graph: a function-level import must be in it.
    lazy = [(t, top) for t, _, top in GRAPH["annotate.cli"]]
    assert any(not top for _, top in lazy), lazy


def test_every_package_is_in_the_wheel():
    # pyproject.toml lists the packages by hand: a new subpackage missing there works in
    # the editable install of `make setup` and is absent from a built wheel.
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert packages == listed, f"packages on disk {sorted(packages)}, in pyproject.toml {sorted(listed)}"
