"""The agent package's public names exist, and it imports nothing from the server side."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import corral.agent

AGENT_DIR = Path(corral.agent.__file__).parent
ALLOWED_CORRAL = ("corral.model", "corral.errors", "corral.agent", "corral.v1")
# Third-party packages one module may use besides pydantic (the QEMU driver speaks QMP).
EXTRA_ALLOWED: dict[str, tuple[str, ...]] = {
    "drivers/qemu/qmp.py": ("qemu",),
    "remote.py": ("grpc",),
}


@pytest.mark.parametrize("package", ["corral.agent", "corral.agent.drivers"])
def test_every_name_in_all_is_importable(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize(
    "path", sorted(AGENT_DIR.rglob("*.py")), ids=lambda p: str(p.relative_to(AGENT_DIR))
)
def test_agent_imports_only_stdlib_pydantic_model_errors_and_itself(path: Path) -> None:
    extra = EXTRA_ALLOWED.get(path.relative_to(AGENT_DIR).as_posix(), ())
    bad = [
        name
        for name in _imports(path)
        if not (
            name == "__future__"
            or name.split(".")[0] in sys.stdlib_module_names
            or name.split(".")[0] in ("pydantic", *extra)
            or name == "corral"  # the package root, for __version__
            or name.startswith(ALLOWED_CORRAL)
        )
    ]
    assert bad == []
