"""The import structure: the backend contract at the bottom, no cycles, no side effects at import.

- ``fused_ema/backends/base.py`` imports nothing of fused_ema; the registry imports it; ``plan.py``
  imports both; backend modules import the base, never the registry or the plan.
- No cycle among the package's top-level imports, and every module imports alone in a fresh
  interpreter (whatever it is imported first by).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fused_ema"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(path) for path in PACKAGE.rglob("*.py"))


def _top_level_imports(module: str) -> set[str]:
    """fused_ema modules that ``module`` imports at import time (not inside functions)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    imported = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks import nothing at run time
            continue
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names if alias.name.startswith("fused_ema")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fused_ema"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                imported.add(candidate if candidate in MODULES else node.module)
    return imported - {"fused_ema"}


def test_base_imports_nothing_of_the_package():
    assert _top_level_imports("fused_ema.backends.base") == set()


@pytest.mark.parametrize("backend", ["reference", "foreach", "cpu", "triton", "cuda", "chunk_table"])
def test_backend_modules_import_the_base_not_the_registry_or_plan(backend):
    imported = _top_level_imports(f"fused_ema.backends.{backend}")
    assert "fused_ema.backends.base" in imported
    assert not imported & {"fused_ema.backends", "fused_ema.plan"}


def _methods(path: Path) -> dict[str, set[str]]:
    """Public methods of each class defined in ``path``."""
    return {
        node.name: {item.name for item in node.body if isinstance(item, ast.FunctionDef) and not item.name.startswith("_")}
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.ClassDef)
    }


@pytest.mark.parametrize("backend", ["reference", "foreach", "cpu", "triton", "cuda"])
def test_backends_implement_only_what_the_contract_declares(backend):
    # The plan and capture.py call backends through the contract alone: a public method that the
    # base does not declare would be an undocumented part of it.
    base = _methods(PACKAGE / "backends" / "base.py")
    declared = base["Backend"] | base["FusedBackend"]
    for name, methods in _methods(PACKAGE / "backends" / f"{backend}.py").items():
        if name.endswith("Backend"):
            assert methods <= declared, f"{name} defines {sorted(methods - declared)}, which base.py does not declare"


def test_registry_and_plan_import_the_base():
    assert "fused_ema.backends.base" in _top_level_imports("fused_ema.backends")
    assert {"fused_ema.backends", "fused_ema.backends.base"} <= _top_level_imports("fused_ema.plan")


def test_no_import_cycle():
    graph = {module: _top_level_imports(module) & set(MODULES) for module in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            assert state.get(dependency) != "open", "import cycle: " + " -> ".join([*path, module, dependency])
            if dependency not in state:
                visit(dependency, [*path, module])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [])


SCRIPT = """
import importlib, sys
failures = []
for module in sys.argv[1:]:
    # Forget every fused_ema module but the operator library (its registrations run once per process).
    for name in [n for n in sys.modules if n.startswith("fused_ema") and n not in ("fused_ema.ops", "fused_ema._C")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception as error:
        failures.append(f"{module}: {error!r}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_module_imports_first():
    # One fresh interpreter (torch stays loaded: importing it is the slow part); before each module
    # every fused_ema module is forgotten, so each is imported first, whatever it is imported by.
    modules = [m for m in MODULES if not m.startswith("fused_ema.examples") and m != "fused_ema.backends.triton"]
    modules.sort(key=lambda m: m != "fused_ema.ops")  # ops first: after it, it stays imported
    result = subprocess.run([sys.executable, "-c", SCRIPT, *modules], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert result.returncode == 0, result.stdout + result.stderr
