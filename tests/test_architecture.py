"""The layers point one way (docs/design.md §1), and the folders are the layers.

``hwsplit/infra`` → ``hwsplit/network`` → ``hwsplit/splitting`` and ``hwsplit/training`` (side by side, neither
importing the other) → ``cost_models`` → ``hwsplit/run`` → ``cli.py``. No module imports a folder above its own
or a sibling folder, there is no import cycle, the cost models never import the run layer, and ``hwsplit/infra``
imports nothing else of the project. Every import is read from the source (including those inside
functions), so a lazy import that hides a two-way dependency still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Rank of every layer folder, bottom (0) to top. A module may import its own folder or a folder of lower rank;
#: folders of the same rank (splitting, training) do not import each other.
FOLDERS = {
    "hwsplit.infra": 0,
    "hwsplit.network": 1,
    "hwsplit.splitting": 2,
    "hwsplit.training": 2,
    "cost_models": 3,
    "hwsplit.run": 4,
    "cli": 5,
}
RUN = "hwsplit.run"
INFRA = "hwsplit.infra"


def _modules() -> dict[str, Path]:
    out = {"cli": ROOT / "cli.py"}
    for package in ("hwsplit", "cost_models"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _folder(module: str) -> str:
    for folder in sorted(FOLDERS, key=len, reverse=True):
        if module == folder or module.startswith(folder + "."):
            return folder
    raise AssertionError(f"{module} is in no layer folder: move it into one of {sorted(FOLDERS)} "
                         "(and describe it in docs/design.md §1)")


def _layer(module: str) -> int:
    return FOLDERS[_folder(module)]


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


def test_every_module_is_in_a_layer_folder():
    flat = [p.name for p in (ROOT / "hwsplit").glob("*.py") if p.name != "__init__.py"]
    assert not flat, f"hwsplit/ holds only layer folders; move {flat} into one"
    for module in _modules():
        if module != "hwsplit":
            _folder(module)


def test_imports_point_down_the_layers():
    bad = [f"{m} ({_folder(m)}) imports {i} ({_folder(i)})"
           for m, deps in _graph().items() if m != "hwsplit" for i in deps
           if _layer(i) > _layer(m) or (_layer(i) == _layer(m) and _folder(i) != _folder(m))]
    assert not bad, "\n".join(bad)


def test_cost_models_never_import_the_run_layer():
    bad = [f"{m} imports {i}" for m, deps in _graph().items() if m.startswith("cost_models")
           for i in deps if _layer(i) >= FOLDERS[RUN]]
    assert not bad, "\n".join(bad)


def test_pricing_never_imports_profiling():
    """``cost_models``' pricing modules (and the package itself) read profiles; only ``cost_models.profiling``
    runs hardware, so pricing a network never loads the profiler."""
    pricing = [m for m in _graph() if m.startswith("cost_models") and not m.startswith("cost_models.profiling")]
    assert pricing and "cost_models.profiling.profiler" in _graph()
    bad = [f"{m} imports {i}" for m in pricing for i in _graph()[m] if i.startswith("cost_models.profiling")]
    assert not bad, "\n".join(bad)


def test_infra_imports_nothing_else_of_the_project():
    bad = [f"{m} imports {i}" for m, deps in _graph().items() if m != "hwsplit" and _folder(m) == INFRA
           for i in deps if _folder(i) != INFRA]
    assert not bad, "\n".join(bad)


def test_every_module_says_what_it_is():
    missing = [m for m, p in _modules().items()
               if not (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "").strip()]
    assert not missing, f"no module docstring: {missing}"


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
    src.write_text("def f():\n    from hwsplit.run.grow import grow\n    import cost_models.lut\n")
    known = {"hwsplit.run.grow", "cost_models.lut", "cost_models"}
    assert _imports(src, known) == {"hwsplit.run.grow", "cost_models.lut"}


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


def test_the_installed_packages_are_every_package_in_the_tree():
    """A non-editable install (``pip install .``) ships every folder with an ``__init__.py``: pyproject finds the
    packages instead of listing them, so a new subpackage cannot be left out of the wheel."""
    import re
    from fnmatch import fnmatchcase

    text = (ROOT / "pyproject.toml").read_text()  # read as text: tomllib is Python 3.11+, the project 3.10+
    assert "\npackages = [" not in text, "a fixed package list"
    section = text.split("[tool.setuptools.packages.find]", 1)[1].split("\n[", 1)[0]
    include = ast.literal_eval(re.search(r"^include\s*=\s*(\[.*?\])", section, re.M | re.S).group(1))
    tree = {".".join(p.parent.relative_to(ROOT).parts) for pkg in ("hwsplit", "cost_models")
            for p in (ROOT / pkg).rglob("__init__.py")}
    missed = sorted(name for name in tree if not any(fnmatchcase(name, pattern) for pattern in include))
    assert tree and not missed, missed
    assert (ROOT / "hwsplit" / "py.typed").exists()
