"""The layering: the core never loads Ray, no two modules import each other, even lazily, and
no function is longer than a screen (60 lines)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ensemble", "specialists")
RAY_LAYER = {"ensemble.actors", "ensemble.scheduler", "ensemble.pipeline",
             "ensemble.workers"}  # they import Ray


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imported(path: Path) -> set[str]:
    """The project modules `path` imports anywhere in it (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in PACKAGES)
    return out


def test_core_imports_no_ray():
    core = sorted(set(modules()) - RAY_LAYER)
    assert "specialists.coordinator" in core and "ensemble.teacher" in core
    code = f"import sys, {', '.join(core)}; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_ray_layer_does_import_ray():  # the check above can fail: this shows what it looks for
    code = "import sys, ensemble.actors; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_no_import_cycle():
    mods = modules()
    graph = {name: sorted(imported(path) & set(mods) - {name}) for name, path in mods.items()}
    state: dict[str, str] = {}

    def visit(name, stack):
        state[name] = "open"
        for dep in graph[name]:
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):]
                                                                   + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert graph["ensemble.distill"]  # the graph is read: distill imports the teacher


def test_no_function_over_60_lines():
    lengths = {f"{name}.{node.name}": node.end_lineno - node.lineno + 1
               for name, path in modules().items()
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert len(lengths) > 300 and "ensemble.analysis.tables" in lengths  # every module read
    assert {name: n for name, n in lengths.items() if n > 60} == {}
