"""The scheduler's surface: names importable, one NAME and REASON per filter module, one NAME per
scorer module, names unique, and nothing but the standard library and itself imported."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import corral.scheduler
from corral.scheduler.feasible import HOST_FILTERS, REQUEST_FILTERS
from corral.scheduler.rank import SCORERS

ROOT = Path(corral.scheduler.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], "corral.scheduler."))


@pytest.mark.parametrize("name", ["corral.scheduler", *MODULES])
def test_every_name_in_all_is_importable(name: str) -> None:
    module = importlib.import_module(name)
    assert [n for n in module.__all__ if not hasattr(module, n)] == []


def _rule_modules(package: str) -> list[str]:
    return [
        m
        for m in MODULES
        if m.startswith(f"corral.scheduler.{package}.") and not m.endswith(".base")
    ]


@pytest.mark.parametrize("name", _rule_modules("feasible"))
def test_each_filter_module_has_a_name_and_reasons(name: str) -> None:
    module = importlib.import_module(name)
    assert isinstance(module.NAME, str)
    reasons = [k for k in vars(module) if k.startswith("REASON_")]
    assert reasons, f"{name} has no REASON_* constant"


def test_filter_and_scorer_names_are_unique_and_registered() -> None:
    filters = [f.name for f in (*HOST_FILTERS, *REQUEST_FILTERS)]
    assert len(set(filters)) == len(filters)
    assert sorted(filters) == sorted(
        importlib.import_module(m).NAME for m in _rule_modules("feasible")
    )
    scorers = [s.name for s in SCORERS]
    assert sorted(scorers) == sorted(importlib.import_module(m).NAME for m in _rule_modules("rank"))


def test_scheduler_imports_only_the_standard_library_and_itself() -> None:
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                ok = n.startswith("corral.scheduler") or top in sys.stdlib_module_names
                assert ok, f"{path.relative_to(ROOT)} imports {n}"
