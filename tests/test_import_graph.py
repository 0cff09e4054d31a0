"""No import cycles and no private cross-imports between the project's modules (``bilora/``, ``pipeline/``, ``stages/``).

The graph is :func:`pipeline.deps.import_graph` (the walk that generates dvc.yaml's code deps): every import
anywhere in a file, function-local ones and ``TYPE_CHECKING`` blocks included; ``from a import b`` is an edge
to the module ``a.b`` when it is one, else to ``a``. Importing ``a.b`` runs ``a/__init__.py`` first, but that is
not an edge to ``a``: a package whose ``__init__`` imports its own modules (the formats registry) is no cycle.

Private: a name starting with one ``_`` belongs to its module. Another module may not import it
(``from m import _x``) nor reach it through an imported module (``m._x``); a module named ``_x`` belongs to
its package, and only that package's modules may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.deps import PACKAGES, ROOT, from_module, import_graph, module_file, module_name, project_modules


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _owner_of_private_module(module: str) -> str | None:
    """The package that owns the first ``_x`` part of a dotted module name (``a.b._c.d`` -> ``a.b``), else None."""
    parts = module.split(".")
    for i, p in enumerate(parts):
        if _private(p):
            return ".".join(parts[:i])
    return None


def private_uses(path: Path, root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """``file:line: what`` for each private name ``path`` takes from another project module."""
    me = module_name(path, root)
    my_package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bad: list[str] = []
    modules: dict[str, str] = {}  # local name -> project module it is bound to

    def check_module(mod: str, line: int) -> None:
        owner = _owner_of_private_module(mod)
        if owner is not None and not (my_package == owner or my_package.startswith(owner + ".")):
            bad.append(f"{rel}:{line}: imports {mod}, private to {owner}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if module_file(a.name, root, packages):
                    check_module(a.name, node.lineno)
                    if a.asname:
                        modules[a.asname] = a.name
                    else:
                        modules.setdefault(a.name.split(".")[0], a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = from_module(node, my_package)
            if not module_file(base, root, packages):
                continue
            check_module(base, node.lineno)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if module_file(sub, root, packages):
                    check_module(sub, node.lineno)
                    modules[a.asname or a.name] = sub
                elif _private(a.name) and base != me:
                    bad.append(f"{rel}:{node.lineno}: from {base} import {a.name}")

    def resolve(expr: ast.expr) -> str | None:
        """The project module an expression names (``sh`` or ``pkg.mod`` through imported names), else None."""
        if isinstance(expr, ast.Name):
            return modules.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = resolve(expr.value)
            if base is not None and module_file(f"{base}.{expr.attr}", root, packages):
                return f"{base}.{expr.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            mod = resolve(node.value)
            if mod is not None and mod != me:
                bad.append(f"{rel}:{node.lineno}: {mod}.{node.attr}")
    return bad


# Cycles waiting on their owner, each with the fix; the test fails when one is gone (remove it here) or another appears.
KNOWN_CYCLES: dict[str, str] = {}  # module prefix -> why its cycle is tolerated (none is)


def test_no_import_cycles():
    found = [c for c in cycles(import_graph()) if not any(c[0] == k or c[0].startswith(k + ".") for k in KNOWN_CYCLES)]
    fixed = [k for k in KNOWN_CYCLES if not any(k in c for c in cycles(import_graph()))]
    assert not fixed, f"no longer a cycle: remove {fixed} from KNOWN_CYCLES"
    assert not found, (
        "import cycles between project modules (break each by moving what both sides share into a module both import):\n"
        + "\n".join("  " + " <-> ".join(c) for c in found)
    )


def test_no_private_cross_imports():
    bad = [b for f in project_modules().values() for b in private_uses(f)]
    assert not bad, "private names used across modules (make the shared helper public in one module both import):\n" + "\n".join(bad)


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checks_find_what_they_guard_against(tmp_path):
    # the three shapes of the issue: a function-local import closing a cycle, a private helper imported by name,
    # and one reached through a module alias; and what stays allowed: a registry __init__, a package-private module
    _tree(
        tmp_path,
        {
            "pipeline/__init__.py": "",
            "pipeline/a.py": "from pipeline import b\n\ndef f():\n    return b.g()\n",
            "pipeline/b.py": "def g():\n    from pipeline.a import f\n    return f\n\ndef _helper():\n    pass\n",
            "pipeline/c.py": "from pipeline.b import _helper\nfrom pipeline import b as sh\nsh._helper()\n",
            "pipeline/fmt/__init__.py": "from pipeline.fmt import one\nREGISTRY = [one]\n",
            "pipeline/fmt/_shared.py": "X = 1\n",
            "pipeline/fmt/one.py": "from pipeline.fmt._shared import X\n",
            "pipeline/d.py": "from pipeline.fmt._shared import X\n",
        },
    )
    graph = import_graph(tmp_path, ("pipeline",))
    assert cycles(graph) == [["pipeline.a", "pipeline.b"]]
    bad = [b for f in project_modules(tmp_path, ("pipeline",)).values() for b in private_uses(f, tmp_path, ("pipeline",))]
    assert sorted(bad) == [
        "pipeline/c.py:1: from pipeline.b import _helper",
        "pipeline/c.py:3: pipeline.b._helper",
        "pipeline/d.py:1: imports pipeline.fmt._shared, private to pipeline.fmt",
    ], bad
