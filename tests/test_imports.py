"""The import graph of ehin/ and bench/: no cycles, and ehin never imports bench (issue 19).

The graph is read from the source with `ast`, not by importing: an edge m -> n for every
`import n`, `from n import x` (an edge to n.x instead when n.x is a module of the two packages) and
relative import in m. `module_level_graph` keeps the imports that run when m is imported (anything
outside a function body; `if TYPE_CHECKING:` blocks are left out, they never run); `full_graph` adds
the imports inside functions, which a cycle can hide behind (ehin.backbones <-> ehin.pretrain_clip
did, until ehin.clip_model took what both need).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ehin", "bench")


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__) for every .py file of PACKAGES."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, is_package: bool, known: set[str], *, in_functions: bool) -> set[str]:
    """The modules of `known` that module `name` (source at `path`) imports."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not in_functions:
                continue
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                out.update(alias.name for alias in child.names if alias.name in known)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against the importing module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[:len(package) - (child.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                for alias in child.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in known:
                        out.add(submodule)
                    elif base in known:
                        out.add(base)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    out.discard(name)
    return out


def graph(*, in_functions: bool, root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports_of(name, path, is_pkg, set(mods), in_functions=in_functions)
            for name, (path, is_pkg) in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `g` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(g):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def test_the_graph_sees_both_packages_and_their_imports():
    """Guards the tests below against an empty or blind graph."""
    g = graph(in_functions=False)
    assert {"ehin", "ehin.backbones", "ehin.clip_model", "bench.run", "ehin.pseudo_labels.pipeline"} <= set(g)
    assert "ehin.clip_model" in g["ehin.backbones"]  # from ehin.clip_model import ...
    assert "ehin.numerics" in g["ehin"]  # from ehin import numerics: the submodule, not the package
    assert "ehin.config" in g["bench.sweeps"]
    full = graph(in_functions=True)
    assert "ehin.backbones" in full["ehin.model.ehin"] and "ehin.backbones" not in g["ehin.model.ehin"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "ehin"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "bench").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nfrom . import b\nif TYPE_CHECKING:\n    from ehin import c\n")
    (pkg / "b.py").write_text("def f():\n    from .sub.d import x\n")
    (pkg / "c.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("from ..a import y\n")
    assert graph(in_functions=False, root=tmp_path)["ehin.a"] == {"ehin.b"}
    assert graph(in_functions=True, root=tmp_path)["ehin.b"] == {"ehin.sub.d"}
    assert graph(in_functions=False, root=tmp_path)["ehin.sub.d"] == {"ehin.a"}


@pytest.mark.parametrize("in_functions", [False, True], ids=["module-level", "with-function-level"])
def test_no_import_cycle(in_functions):
    cycle = find_cycle(graph(in_functions=in_functions))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ehin_never_imports_bench():
    """The model side stands alone; bench is the harness on top of it (imports inside functions too)."""
    bad = {m: sorted(n for n in deps if n.split(".")[0] == "bench")
           for m, deps in graph(in_functions=True).items() if m.split(".")[0] == "ehin"}
    assert not {m: d for m, d in bad.items() if d}
