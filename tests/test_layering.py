"""The package's import layering: no cycles, the read side never reaches training code, and what plans and
reports runs loads no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "squat_cli"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the squat_cli modules it imports (at any depth of its body: lazy imports count)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("squat_cli"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("squat_cli"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycles():
    graph = _graph()
    cycles = [m for m in graph if m in _reach(graph, m) and not m.endswith("cli_base")
              and m not in ("squat_cli.cli", "squat_cli.cli_export")]  # the CLI registers its commands both ways
    assert not cycles, cycles


@pytest.mark.parametrize("reader", ["squat_cli.run_model", "squat_cli.task_data", "squat_cli.dev_scores",
                                    "squat_cli.evaluation", "squat_cli.sharpness_jobs", "squat_cli.export.packed",
                                    "squat_cli.export.onnx", "squat_cli.export.loader", "squat_cli.report.build"])
def test_read_side_never_reaches_training(reader):
    reached = _reach(_graph(), reader)
    training = sorted(m for m in reached if m.startswith("squat_cli.train") or m == "squat_cli.training")
    assert not training, f"{reader} imports {training}"


def test_planning_and_reporting_load_no_torch():
    code = ("import sys; import squat_cli.grid, squat_cli.sweep, squat_cli.report.build, squat_cli.report.search, "
            "squat_cli.report.variants, squat_cli.quant.methods, squat_cli.sharpness_settings; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
