"""Fixtures: a `FakeCorralApi` with two nodes, and a `CorralClient` wired to it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from corral.client import CorralClient
from corral.client.testing import FakeCorralApi

from .support import FakeClock

NOW = datetime(2026, 11, 26, 21, 0, tzinfo=UTC)


@pytest.fixture
def fake() -> FakeCorralApi:
    api = FakeCorralApi(max_page_size=2, now=lambda: NOW)
    api.add_node("n1")
    api.add_node("n2", roles=("compute",))
    return api


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(fake: FakeCorralApi, clock: FakeClock) -> Iterator[CorralClient]:
    with CorralClient(
        "corral.test:8700", transport=fake.transport(), sleep=clock.sleep, clock=clock
    ) as c:
        yield c
