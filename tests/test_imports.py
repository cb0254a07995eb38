"""The import rules of the layout, read from the source with ``ast`` (function-level imports included:
they run too) and, for the launcher, from what importing it loads.

- no import cycle among the modules of components/ and flows/;
- MLflow is imported only in components/tracking/ and by components/serving.py, the registered model's
  pyfunc loader, which imports no other project module than those bundled with the model;
- the launcher (components/launch.py, components/cluster/) loads no rank-side module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("components", "flows")
MLFLOW_HOME = "components.tracking"
PYFUNC_LOADER = "components.serving"
RANK_SIDE = (
    "components.train",
    "components.trainer",
    "components.distributed",
    "components.model",
    "components.evaluate",
    "components.tracking",
    "mlflow",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*packages: str) -> dict[str, Path]:
    return {
        _module_name(path): path for package in packages for path in sorted((ROOT / package).rglob("*.py"))
    }


def _imported_names(path: Path) -> set[str]:
    """Every dotted name an import statement of ``path`` loads: ``from a.b import c`` loads ``a.b`` and,
    if it is a module, ``a.b.c``; relative imports are resolved against the module's package."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules importing ``path`` runs: each imported module and the packages above it."""
    found = set()
    for name in _imported_names(path):
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            if (cycle := visit(imported)) is not None:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if (cycle := visit(module)) is not None:
            return cycle
    return None


def test_no_import_cycle_among_components_and_flows() -> None:
    sources = _sources(*LAYERS)
    graph = {
        module: _project_imports(path, set(sources)) - {module, *_parents(module)}
        for module, path in sources.items()
    }
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    # The finder finds one where there is one (model <-> registry was the last).
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _parents(module: str) -> set[str]:
    """A module's own packages: importing it runs them first, they do not import it back."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_mlflow_is_imported_only_in_its_home_and_by_the_pyfunc_loader() -> None:
    outside = {
        module: sorted(name for name in _imported_names(path) if name.split(".")[0] == "mlflow")
        for module, path in _sources(*LAYERS, "bench").items()
        if not (module in (MLFLOW_HOME, PYFUNC_LOADER) or module.startswith(f"{MLFLOW_HOME}."))
    }
    assert {module: names for module, names in outside.items() if names} == {}
    # Imports are read wherever they are: predict imports the registry reader inside a function.
    model_file = ROOT / "components" / "predict" / "model_file.py"
    assert "components.tracking.registry_read" in _imported_names(model_file)


def test_the_pyfunc_loader_imports_only_the_modules_bundled_with_the_model() -> None:
    from components.serving import BUNDLED_MODULES

    bundled = {f"components.{name.removesuffix('.py')}" for name in BUNDLED_MODULES} | {"components"}
    loader = ROOT / "components" / "serving.py"
    project = _project_imports(loader, set(_sources(*LAYERS)))
    assert project <= bundled, f"components/serving.py imports {sorted(project - bundled)}"


def test_the_launcher_loads_no_rank_side_module() -> None:
    launcher = [
        "components.launch",
        *(
            module
            for module in _sources("components/cluster")
            if not module.endswith(".__main__")  # the CLI entry point runs, it is not imported
        ),
    ]
    script = (
        "import importlib, json, sys\n"
        f"for name in {launcher!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert "components.launch" in loaded and "components.train_contract" in loaded
    rank_side = [name for name in loaded if any(name == m or name.startswith(f"{m}.") for m in RANK_SIDE)]
    assert rank_side == [], f"importing the launcher loads {rank_side}"
