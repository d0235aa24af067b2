"""The package's shape: spp-hf's modules import each other without circles, in a shallow tower, at the top.

The import graph is built from the source with `ast` (imports inside functions count), so the test fails on
a cycle however it is hidden.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "spp_hf"
MAX_CHAIN = 10
MAX_INNER_IMPORTS = 10


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """spp-hf modules an import statement in module `name` loads (a package's names may be its sub-modules)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module or ""
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    found = []
    for target in targets:
        while target and target not in MODULES and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in MODULES and target != name:
            found.append(target)
    return found


def module_imports(name: str, source: str) -> tuple[set[str], list[tuple[str, int]]]:
    """The spp-hf modules `source` (module `name`) imports, and those imported inside functions (with lines)."""
    tree = ast.parse(source)
    in_functions = {
        id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(fn)
    }
    targets, inner = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in imported_modules(name, node):
                targets.add(target)
                if id(node) in in_functions:
                    inner.append((target, node.lineno))
    return targets, inner


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """{module: modules it imports} and the imports of spp-hf modules made inside functions (module, target, line)."""
    edges, inner = {}, []
    for name, path in MODULES.items():
        edges[name], found = module_imports(name, path.read_text(encoding="utf-8"))
        inner += [(name, target, line) for target, line in found]
    return edges, inner


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    memo: dict[str, list[str]] = {}

    def chain(node: str) -> list[str]:
        if node not in memo:
            memo[node] = [node] + max((chain(n) for n in edges[node]), key=len, default=[])
        return memo[node]

    return max((chain(n) for n in edges), key=len)


def test_the_graph_sees_imports_inside_functions():
    """The checker is honest: it finds an import hidden in a function, and a cycle through it."""
    targets, inner = module_imports("spp_hf.storage", "import os\n\ndef f():\n    from .sparsity import x\n")
    assert targets == {"spp_hf.sparsity"} and inner == [("spp_hf.sparsity", 4)]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert longest_chain({"a": {"b"}, "b": {"c"}, "c": set()}) == ["a", "b", "c"]
    rel = ast.parse("from .sparsity import fingerprint_modules").body[0]
    assert imported_modules("spp_hf.storage", rel) == ["spp_hf.sparsity"]
    pkg = ast.parse("from .adapters import masked_lora").body[0]
    assert imported_modules("spp_hf", pkg) == ["spp_hf.adapters.masked_lora"]


def test_no_import_cycles():
    edges, _ = import_graph()
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_the_tower_is_shallow():
    edges, _ = import_graph()
    if find_cycle(edges):
        pytest.skip("there is a cycle (test_no_import_cycles)")
    chain = longest_chain(edges)
    assert len(chain) <= MAX_CHAIN, f"{len(chain)} modules: {' -> '.join(chain)}"


def test_imports_of_spp_hf_modules_sit_at_the_top():
    _, inner = import_graph()
    listing = "\n".join(f"{m}:{line} imports {t}" for m, t, line in inner)
    assert len(inner) <= MAX_INNER_IMPORTS, f"{len(inner)} imports of spp-hf modules inside functions:\n{listing}"
