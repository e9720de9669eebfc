from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import AgentProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session", autouse=True)
def _need_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run `make test` (it installs etcd-server) first")


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Build agents (not started) that are stopped at teardown even when the test fails."""
    made: list[AgentProcess] = []

    def make(name: str = "n1", **kw: Any) -> AgentProcess:
        a = AgentProcess(tmp_path / name, name=name, **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        try:
            a.stop()
        except AssertionError:
            a.kill()


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent for a whole module of tests that do not disturb each other."""
    a = AgentProcess(tmp_path_factory.mktemp("shared") / "n1").start()
    yield a
    a.stop()
