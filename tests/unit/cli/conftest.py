"""Fixtures: a fake API with two nodes and three VMs, and a `cli` runner wired to it."""

from __future__ import annotations

import pytest

from corral.client.testing import FakeCorralApi

from .support import CREATED, Cli


@pytest.fixture
def fake() -> FakeCorralApi:
    api = FakeCorralApi(max_page_size=2, now=lambda: CREATED)
    api.add_node("n1")
    api.add_node("n2", roles=("compute",), labels={"rack": "b"}, cpus=8, memory_mib=4096)
    api.add_vm("web-1", vcpus=2, memory_mib=512, labels={"tier": "web"}, node="n1")
    api.add_vm("web-2", memory_mib=1024, labels={"tier": "web", "env": "prod"}, node="n2")
    api.add_vm("db-1", vcpus=4, memory_mib=4096, state="stopped", node="n1")
    return api


@pytest.fixture
def cli(fake: FakeCorralApi) -> Cli:
    return Cli(fake)
