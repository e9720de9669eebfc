"""Fixtures that run a NodeAgent over the fake driver and an in-memory NodeService."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.agent.drivers.base import Driver
from corral.agent.drivers.fake import FakeDriver
from corral.agent.runner import NodeAgent

from .fakes import FakeNodeService, inventory


@dataclass
class Harness:
    """One running agent: its NodeService, its driver and the task running it."""

    ns: FakeNodeService
    driver: FakeDriver
    agent: NodeAgent
    task: asyncio.Task[None]

    async def stop(self, *, revoke_lease: bool = False) -> None:
        if not self.task.done():
            await self.agent.shutdown(revoke_lease=revoke_lease, timeout_s=1.0)
            await asyncio.wait_for(self.task, 1.0)


@dataclass
class AgentFactory:
    state_dir: Path
    started: list[Harness] = field(default_factory=list)

    def __call__(
        self,
        *,
        ns: FakeNodeService | None = None,
        wrap: Callable[[FakeDriver], Driver] | None = None,
        fake_options: dict[str, Any] | None = None,
        **agent_options: Any,
    ) -> Harness:
        """Start an agent over a FakeDriver in the shared state dir (``wrap`` may decorate it);
        fast timings unless ``agent_options`` say otherwise."""
        ns = ns if ns is not None else FakeNodeService()
        fake = FakeDriver(self.state_dir, **(fake_options or {}))
        options: dict[str, Any] = {
            "address": "127.0.0.2",
            "labels": {"rack": "r1"},
            "roles": ["compute"],
            "inventory": inventory(),
            "lease_ttl_s": 1,
            "resync_s": 0.05,
            "keepalive_s": 0.01,
            "retry_initial_s": 0.005,
            "retry_max_s": 0.02,
            "restart_initial_s": 0.05,
            "restart_max_s": 0.2,
            "restart_reset_s": 60.0,
        }
        options.update(agent_options)
        agent = NodeAgent("hv-1", ns, wrap(fake) if wrap is not None else fake, **options)
        harness = Harness(ns, fake, agent, asyncio.create_task(agent.run()))
        self.started.append(harness)
        return harness


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Callable[..., Harness]]:
    factory = AgentFactory(tmp_path)
    yield factory
    for harness in factory.started:
        await harness.stop()
