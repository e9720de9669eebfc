from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import AgentProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session", autouse=True)
def _need_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run `make test` (it installs etcd-server) first")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path / "n1").start()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent for a whole module of tests that do not disturb each other."""
    a = AgentProcess(tmp_path_factory.mktemp("shared") / "n1").start()
    yield a
    a.stop()
