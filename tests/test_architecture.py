"""The layers point one way (docs/design.md §1): no import cycle, cost models never import the run layer.

Every import is read from the source (including those inside functions), so a lazy import that
hides a two-way dependency still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Layer of every module, bottom (0) to top. A module may import its own layer or lower ones.
LAYERS = {
    0: ["hwsplit.units", "hwsplit.errors", "hwsplit.fsio", "hwsplit.specs", "hwsplit.graph",
        "hwsplit.distributed", "hwsplit.devices"],
    1: ["hwsplit.models", "hwsplit.score", "hwsplit.surgery", "hwsplit.select", "hwsplit.blocks", "hwsplit.families",
        "hwsplit.recipe",
        "hwsplit.data", "hwsplit.train", "hwsplit.checkpoint", "hwsplit.schedule"],
    2: ["cost_models.base", "cost_models.flops", "cost_models.uniform", "cost_models.profile_io",
        "cost_models.meters", "cost_models.machine", "cost_models.grid", "cost_models.runner",
        "cost_models.measure", "cost_models.calibration", "cost_models.lut", "cost_models.predictor",
        "cost_models.profiler", "cost_models.context", "cost_models.blocks", "cost_models"],
    3: ["hwsplit.config", "hwsplit.rundir", "hwsplit.stages", "hwsplit.grower", "hwsplit.tblog", "hwsplit.grow",
        "hwsplit.baselines", "hwsplit.finetune", "hwsplit.prune", "hwsplit.report", "hwsplit.export",
        "hwsplit.summary", "hwsplit.parallel"],
    4: ["cli"],
}
RUN_LAYER = 3


def _modules() -> dict[str, Path]:
    out = {"cli": ROOT / "cli.py"}
    for package in ("hwsplit", "cost_models"):
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def _layer(module: str) -> int:
    for layer, names in LAYERS.items():
        for name in names:
            if module == name or module.startswith(name + "."):
                return layer
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_architecture.py "
                         "(and to docs/design.md §1)")


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (``from hwsplit import grow`` included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    # package __init__ files only re-export; the edges that matter are between the modules
    return {m: {i for i in _imports(p, known) if i != m and i not in ("hwsplit",)} for m, p in modules.items()}


def test_every_module_has_a_layer():
    for module in _modules():
        if module != "hwsplit":
            _layer(module)


def test_imports_point_down_the_layers():
    bad = [f"{m} (layer {_layer(m)}) imports {i} (layer {_layer(i)})"
           for m, deps in _graph().items() if m != "hwsplit" for i in deps if _layer(i) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_cost_models_never_import_the_run_layer():
    bad = [f"{m} imports {i}" for m, deps in _graph().items() if m.startswith("cost_models")
           for i in deps if _layer(i) >= RUN_LAYER]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for i in sorted(graph.get(m, ())):
            if state.get(i) == 1:
                cycle = stack[stack.index(i):] + [i]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if i not in state:
                visit(i)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_walker_sees_lazy_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from hwsplit.grow import grow\n    import cost_models.lut\n")
    assert _imports(src, {"hwsplit.grow", "cost_models.lut", "cost_models"}) == {"hwsplit.grow", "cost_models.lut"}


def test_docstrings_cite_the_design_document_in_the_repository():
    design = ROOT / "docs" / "design.md"
    assert design.is_file()
    stale = [str(p.relative_to(ROOT)) for p in _modules().values() if "DESIGN.md" in p.read_text(encoding="utf-8")]
    assert not stale, f"cite docs/design.md, not DESIGN.md: {stale}"


def test_no_private_name_is_imported_across_modules():
    """A leading underscore means "this module only": another module that needs it needs a public name."""
    known = set(_modules())
    bad = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in known and node.module != module:
                bad += [f"{module} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)
