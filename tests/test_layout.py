"""The package's architecture, checked: no import cycle, lower layers never import upper ones, a light import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monai_gamverify"
#: layers from the bottom up; a module may import its own layer and those below, never one above
LAYERS = [
    {"io", "networks"},
    {"visualize", "metrics", "data", "bundle", "transforms", "inferers"},
    {"kplus1", "energy", "verification", "screening", "handlers"},
    {"apps"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every monai_gamverify module ``path`` imports, at any depth of the file (a function-level import is a
    dependency too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("monai_gamverify"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("monai_gamverify"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path):
            while imp not in modules and "." in imp:
                imp = imp.rsplit(".", 1)[0]
            if imp in modules and imp != name and not name.startswith(imp + "."):  # a module's own package: no edge
                deps.add(imp)
        graph[name] = deps
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for i, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return i
    return None


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_lower_layers_never_import_upper_ones():
    bad = []
    for module, deps in _graph().items():
        lm = _layer(module)
        for dep in deps:
            ld = _layer(dep)
            if lm is not None and ld is not None and ld > lm:
                bad.append(f"{module} imports {dep}")
    assert not bad, "\n".join(sorted(bad))


def test_package_import_is_light():
    code = (
        "import sys, monai_gamverify; "
        "heavy = [m for m in ('pandas', 'scipy.stats', 'matplotlib', 'sklearn') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import monai_gamverify imports {out}"


def test_public_names_resolve():
    import monai_gamverify as gv

    for name in gv.__all__:
        assert getattr(gv, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gv.nope  # noqa: B018
