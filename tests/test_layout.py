"""The floors of the house (docs/design.md): every import runs down, none runs in a circle.

Read from the source with ``ast``, imports inside functions included: an import that runs up a floor only when a
function is called is still a fault of placement.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Low to high: a file may import its own floor and the floors below it.
FLOORS = ("core", "datamodules", "lightning_modules", "evaluation", "callbacks", "commands", "train")


def library_files() -> list[Path]:
    return sorted(p for floor in FLOORS[:-1] for p in (ROOT / floor).rglob("*.py")) + [ROOT / "train.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def known_modules() -> frozenset[str]:
    return frozenset(module_name(p) for p in library_files())


def is_dynamic_import(node: ast.AST) -> bool:
    """``importlib.import_module(...)``, ``import_module(...)`` or ``__import__(...)``."""
    return isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
        "import_module", "__import__")


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` names ``a.b.c`` when that is a module)."""
    known = known_modules()
    out = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from ..x import y`: resolved against this file's package
                package = module_name(path).split(".")
                package = package if path.name == "__init__.py" else package[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif is_dynamic_import(node) and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in FLOORS}
    return out


def floor(module: str) -> int:
    return FLOORS.index(module.split(".")[0])


def test_the_floors_are_the_packages_that_exist():
    assert [f for f in FLOORS[:-1] if not (ROOT / f / "__init__.py").is_file()] == []


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_runs_down(path):
    here = module_name(path)
    upward = sorted(m for m in imported_modules(path) if floor(m) > floor(here))
    assert upward == [], f"{here} imports from a higher floor: {upward}"


def test_no_package_hides_an_import_in_a_lazy_getattr():
    for init in (p for f in FLOORS[:-1] for p in (ROOT / f).rglob("__init__.py")):
        tree = ast.parse(init.read_text())
        getattrs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
        imports = [n for g in getattrs for n in ast.walk(g)
                   if isinstance(n, (ast.Import, ast.ImportFrom)) or is_dynamic_import(n)]
        assert imports == [], f"{init.relative_to(ROOT)} imports inside __getattr__"


def with_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each import also runs the ``__init__`` of every package above the imported module (``import a.b.c`` runs
    ``a`` and ``a.b`` first), except the importer's own packages, which are already running; no self-edges."""
    out = {}
    for module, deps in graph.items():
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        parents = {".".join(d.split(".")[:i]) for d in deps for i in range(1, d.count(".") + 1)}
        out[module] = (deps | (parents & graph.keys())) - ancestors - {module}
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    found = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_modules_import_each_other_in_a_circle():
    assert circles(with_parents({module_name(p): imported_modules(p) for p in library_files()})) == []


def test_a_circle_through_a_package_init_is_found():
    """a.x imports b.y, which runs b/__init__ first; b/__init__ imports b.z, which imports a.x: a circle the direct
    imports alone do not show. A module importing its own sibling is none."""
    graph = {"a": set(), "a.x": {"b.y"}, "b": {"b.z"}, "b.y": set(), "b.z": {"a.x"}}
    assert circles(graph) == []
    assert circles(with_parents(graph)) == [["a.x", "b", "b.z", "a.x"]]
    assert circles(with_parents({"b": {"b.z"}, "b.z": {"b.y"}, "b.y": set()})) == []


def test_the_import_reader_sees_every_form():
    """imported_modules on hand-written source placed in callbacks/: each form of import it must not miss."""
    source = ("import core.files as f\nfrom ..commands import study\nfrom .sts import STSEvaluator\n"
              "def g():\n    import importlib\n    importlib.import_module('train')\n"
              "    from evaluation import evaluate\n")
    assert imported_modules(ROOT / "callbacks" / "probe.py", source) == {
        "core.files", "commands.study", "callbacks.sts", "train", "evaluation.evaluate"}
