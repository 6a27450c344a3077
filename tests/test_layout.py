"""The package's architecture, checked: no import cycle (counting the package ``__init__`` every import runs), lower
layers never import upper ones, no module over ~500 lines without a reason at its top, a light import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monai_gamverify"
#: layers from the bottom up; a module may import its own layer and those below, never one above
LAYERS = [
    {"io", "networks", "utils"},
    {"visualize", "metrics", "data", "bundle", "inferers"},
    {"kplus1", "energy", "verification", "screening", "transforms", "handlers"},
    {"apps"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (imports for annotations only; never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(path: Path) -> set[str]:
    """Every monai_gamverify module ``path`` imports, at any depth of the file (a function-level import is a
    dependency too; an ``if TYPE_CHECKING:`` import is not)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("monai_gamverify"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("monai_gamverify"))
    return found


def _graph(parents: bool = False) -> dict[str, set[str]]:
    """module -> the package modules it imports; with ``parents`` also the packages whose ``__init__`` Python runs
    first (``import a.b.c`` runs ``a.b``), which is how two modules of different packages end up importing each other
    at run time."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path):
            while imp not in modules and "." in imp:
                imp = imp.rsplit(".", 1)[0]
            targets = [imp]
            if parents:
                parts = imp.split(".")
                targets += [".".join(parts[:i]) for i in range(2, len(parts))]
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):  # a module's own package: no edge
                    deps.add(t)
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


@pytest.mark.parametrize("parents", [False, True], ids=["modules", "with_package_inits"])
def test_no_import_cycle(parents):
    graph = _graph(parents)
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


def test_no_import_cycle_between_packages():
    """Between the top-level packages (``visualize``, ``inferers``, ``energy``, ...) the imports go one way: no
    package imports a module of another that imports back, directly or through others (``visualize.segcam`` ->
    ``inferers`` -> ``visualize.cam`` was such a pair)."""
    example: dict[str, dict[str, str]] = {}
    for module, deps in _graph().items():
        a = ".".join(module.split(".")[:2])
        for dep in deps:
            b = ".".join(dep.split(".")[:2])
            if a != b:
                example.setdefault(a, {}).setdefault(b, f"{module} imports {dep}")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(example.get(node, {})):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("package import cycle: " + "; ".join(example[x][y] for x, y in zip(cycle, cycle[1:])))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(example):
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


#: lines above which a module needs a reason at its top: a ``# long module: <why>`` comment before its first def/class
MAX_LINES = 500
#: modules being split by other open work, each with the issue that splits it (remove the entry when it lands)
PENDING: dict[str, str] = {}


def test_no_long_module_without_a_reason():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) <= MAX_LINES or path.relative_to(PACKAGE.parent).as_posix() in PENDING:
            continue
        header = []
        for line in lines:
            if line.startswith(("def ", "class ", "async def ")):
                break
            header.append(line)
        if not any(line.startswith("# long module: ") and len(line) > 30 for line in header):
            bad.append(f"{path.relative_to(PACKAGE.parent)}: {len(lines)} lines")
    why = f"modules over {MAX_LINES} lines without a '# long module: <why>' line at the top:\n"
    assert not bad, why + "\n".join(bad)


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
