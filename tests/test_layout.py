"""The shape of the code: one package per service, dependencies one way (issue #15).

Everything here reads source with ``ast``; nothing is imported, so a broken
module fails its own tests, not these.

- no import cycles in ``mesh/`` or ``services/``: module-level imports (``import x``,
  ``from x import y``, relative ones too); an import under ``if TYPE_CHECKING:`` is
  not an edge of the run-time graph. A second check draws the graph *with* those
  imports: a part that names its service's class in an annotation still depends on
  it, and the circles issue #15 found were all of that kind;
- ``mesh/`` never imports ``services/``, at any depth (function bodies and
  TYPE_CHECKING blocks included). The one way in is by name: the CLI's ``mesh up``
  and ``mesh serve`` call ``importlib.import_module("services.runner")``, and the
  runner loads each service class by its "module:Class" name (``SERVICES``);
- each service is a package ``services/<pkg>/`` with ``service.py`` (the process) and
  an ``__init__.py`` that exports the class; no other module of the package imports
  its ``service.py`` (again at any depth, TYPE_CHECKING included);
- no module over 500 lines in ``mesh/`` or ``services/``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "services")
MAX_LINES = 500
# module path (relative to the repo) -> why it may be longer than MAX_LINES.
LONG_MODULES: dict[str, str] = {}
# Where mesh/ may load services/ by name (importlib.import_module with a literal).
DYNAMIC_LOADS = {("mesh/cli/core.py", "services.runner")}
# runner.SERVICES name -> package under services/ and the class its __init__ exports.
SERVICE_PACKAGES = {
    "webhook-egress": ("egress", "WebhookEgress"),
    "bridge": ("bridge", "Bridge"),
    "sink": ("sink", "Sink"),
    "health": ("health", "Health"),
    "api": ("api", "Api"),
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (a module of ours)
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`
    nested: bool  # inside a function or method body


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


MODULES = our_modules()


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(path: Path, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """Our modules an import statement loads: ``from a import b`` is an edge to ``a.b``
    when that is a module, else to ``a`` (a name from ``a``'s ``__init__``). Parent
    packages a statement loads on the way are not edges, as in every import linter."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = _resolve(path, node)
        names = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
            for alias in node.names
        ]
    for name in names:
        # `import a.b.c` with a.b.c not ours (or a name): the longest module of ours.
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            yield name


def imports(path: Path, text: str | None = None) -> list[Import]:
    source = module_name(path)
    text = path.read_text(encoding="utf-8") if text is None else text
    found: list[Import] = []

    def walk(nodes: list[ast.stmt], type_only: bool, nested: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.extend(
                    Import(source, t, node.lineno, type_only, nested)
                    for t in sorted(set(_targets(path, node)))
                    if t != source
                )
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                walk(node.body, True, nested)
                walk(node.orelse, type_only, nested)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                walk(node.body, type_only, True)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        walk([c for c in children if isinstance(c, ast.stmt)], type_only, nested)
                    for child in children or []:
                        if isinstance(child, ast.ExceptHandler | ast.match_case):
                            walk(child.body, type_only, nested)

    walk(ast.parse(text, str(path)).body, False, False)
    return found


ALL_IMPORTS = [imp for p in MODULES.values() for imp in imports(p)]


def cycles(edges: list[Import]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each
    printed as one circle through it, sorted so the output is stable."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def _describe(component: list[str], edges: list[Import]) -> str:
    members = set(component)
    inner = sorted(
        {
            f"    {e.source} -> {e.target} (line {e.line}{', TYPE_CHECKING' * e.type_only})"
            for e in edges
            if e.source in members and e.target in members
        }
    )
    return "circle of " + ", ".join(component) + ":\n" + "\n".join(inner)


def test_no_import_cycles_at_run_time() -> None:
    edges = [e for e in ALL_IMPORTS if not e.type_only and not e.nested]
    found = cycles(edges)
    assert not found, "\n".join(_describe(c, edges) for c in found)


def test_no_import_cycles_with_type_checking_imports() -> None:
    edges = [e for e in ALL_IMPORTS if not e.nested]
    found = cycles(edges)
    assert not found, "\n".join(_describe(c, edges) for c in found)


def test_mesh_never_imports_services() -> None:
    bad = [
        f"{e.source} imports {e.target} (line {e.line})"
        for e in ALL_IMPORTS
        if e.source.split(".")[0] == "mesh" and e.target.split(".")[0] == "services"
    ]
    assert not bad, "\n".join(bad)


SERVICE_NAME = re.compile(r"services(\.\w+)*(:\w+)?")


def test_mesh_loads_services_only_by_name_from_the_cli() -> None:
    """The exception to the rule above, stated exactly: every string in mesh/ that
    names a module of services/ (what importlib would be handed)."""
    names = {
        (str(path.relative_to(ROOT)), node.value)
        for name, path in MODULES.items()
        if name.split(".")[0] == "mesh"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and SERVICE_NAME.fullmatch(node.value)
        and node.value != "services"
    }
    assert names == DYNAMIC_LOADS


def test_each_service_is_a_package() -> None:
    missing = []
    for svc, (pkg, cls) in SERVICE_PACKAGES.items():
        service = ROOT / "services" / pkg / "service.py"
        init = ROOT / "services" / pkg / "__init__.py"
        if not service.is_file() or not init.is_file():
            missing.append(f"{svc}: no services/{pkg}/service.py with an __init__.py")
            continue
        tree = ast.parse(init.read_text(encoding="utf-8"))
        exported = {
            alias.asname or alias.name
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and _resolve(init, node).endswith(".service")
            for alias in node.names
        }
        if cls not in exported:
            missing.append(f"{svc}: services/{pkg}/__init__.py does not export {cls}")
    runner = (ROOT / "services" / "runner.py").read_text(encoding="utf-8")
    for svc, (pkg, cls) in SERVICE_PACKAGES.items():
        if f'"{svc}": "services.{pkg}:{cls}"' not in runner:
            missing.append(f"{svc}: runner.SERVICES does not load services.{pkg}:{cls}")
    assert not missing, "\n".join(missing)


def test_no_part_imports_its_service() -> None:
    """A part of ``services/<pkg>/`` imports neither ``service.py`` nor the package's
    ``__init__`` (which loads ``service.py``); only the ``__init__`` and ``__main__``
    (``python -m services.<pkg>``) may."""
    bad = []
    for e in ALL_IMPORTS:
        parts = e.target.split(".")
        if parts[0] != "services" or len(parts) < 2 or not (ROOT / "services" / parts[1]).is_dir():
            continue
        package = ".".join(parts[:2])
        if e.target not in (package, f"{package}.service"):
            continue
        entry_points = (f"{package}.service", f"{package}.__main__")  # and the __init__
        if e.source.startswith(package + ".") and e.source not in entry_points:
            kind = ", TYPE_CHECKING" * e.type_only + ", in a function" * e.nested
            bad.append(f"{e.source} imports {e.target} (line {e.line}{kind})")
    assert not bad, "\n".join(sorted(bad))


def test_no_module_over_500_lines() -> None:
    long = {}
    for path in MODULES.values():
        rel = str(path.relative_to(ROOT))
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and rel not in LONG_MODULES:
            long[rel] = n
    stale = [
        rel
        for rel in LONG_MODULES
        if not (ROOT / rel).is_file()
        or len((ROOT / rel).read_text(encoding="utf-8").splitlines()) <= MAX_LINES
    ]
    assert not long, "\n".join(f"{rel}: {n} lines" for rel, n in sorted(long.items()))
    assert not stale, f"no longer long, drop from LONG_MODULES: {stale}"


def test_the_checker_sees_what_it_must() -> None:
    """The checks above are only as good as the parser: prove it finds each kind."""
    probe = ROOT / "mesh" / "storage" / "_probe.py"  # never written: the text is given
    text = (
        "from typing import TYPE_CHECKING\n"
        "import mesh.client\n"
        "from . import _common\n"
        "from .base import Store\n"
        "from mesh.storage import sqlite, Store\n"
        "from mesh import envelope\n"
        "try:\n"
        "    import mesh.cli.core as core\n"
        "except ImportError:\n"
        "    pass\n"
        "if TYPE_CHECKING:\n"
        "    from services.runner import SERVICES\n"
        "class C:\n"
        "    async def f(self):\n"
        "        from ..config import Settings\n"
    )
    found = {(e.target, e.type_only, e.nested) for e in imports(probe, text)}
    assert found == {
        ("mesh.client", False, False),
        ("mesh.envelope", False, False),
        ("mesh.storage", False, False),
        ("mesh.storage._common", False, False),
        ("mesh.storage.base", False, False),
        ("mesh.storage.sqlite", False, False),
        ("mesh.cli.core", False, False),
        ("services.runner", True, False),
        ("mesh.config", False, True),
    }
    a = Import("x.a", "x.b", 1, False, False)
    b = Import("x.b", "x.c", 2, True, False)
    c = Import("x.c", "x.a", 3, False, False)
    assert cycles([a, b, c]) == [["x.a", "x.b", "x.c"]]
    assert cycles([a, c]) == []
