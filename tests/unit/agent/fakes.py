"""Test doubles for the node agent: an in-memory NodeService and small helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from corral.agent.nodeapi import NodeService
from corral.errors import Unavailable
from corral.model import Assignment, Inventory, VmObservation, VmSpec

__all__ = ["FakeNodeService", "assignment", "eventually", "inventory"]


class FakeNodeService:
    """A NodeService kept in memory: desired sets go in through ``assign``; everything the
    agent said comes out in ``reports``, ``gone``, ``leases_opened``, ``keepalives`` and
    ``revoked``. ``fail_register``, ``fail_report``, ``fail_gone`` and ``fail_stream`` make the
    next N such calls raise Unavailable; ``keepalive_answers`` scripts keepalive results (the
    ttl is answered once they run out)."""

    def __init__(self) -> None:
        self.snapshots: asyncio.Queue[dict[str, Assignment]] = asyncio.Queue()
        self.registrations: list[dict[str, Any]] = []
        self.register_errors = 0
        self.fail_register = 0
        self.fail_report = 0
        self.fail_gone = 0
        self.fail_stream = 0
        self.subscriptions = 0
        self.reports: list[VmObservation] = []
        self.report_calls: list[list[VmObservation]] = []
        self.gone: list[tuple[str, str, int]] = []
        self.leases_opened: list[int] = []
        self.keepalives: list[int] = []
        self.keepalive_answers: list[int] = []
        self.revoked: list[int] = []
        self._ttl = 0
        self._next_lease = 0x100

    # -- NodeService --------------------------------------------------------------------------

    async def register(
        self,
        node: str,
        *,
        address: str,
        driver: str,
        inventory: Inventory,
        labels: dict[str, str],
        roles: list[str],
    ) -> None:
        if self.fail_register > 0:
            self.fail_register -= 1
            self.register_errors += 1
            raise Unavailable("etcd cluster is unreachable")
        self.registrations.append(
            {
                "node": node,
                "address": address,
                "driver": driver,
                "inventory": inventory,
                "labels": labels,
                "roles": roles,
            }
        )

    async def open_liveness(self, node: str, ttl_s: int) -> int:
        self._ttl = ttl_s
        self._next_lease += 1
        self.leases_opened.append(self._next_lease)
        return self._next_lease

    async def keepalive(self, node: str, lease_id: int) -> int:
        self.keepalives.append(lease_id)
        if self.keepalive_answers:
            return self.keepalive_answers.pop(0)
        return self._ttl

    async def close_liveness(self, node: str, lease_id: int) -> None:
        self.revoked.append(lease_id)

    async def assignments(self, node: str) -> AsyncIterator[dict[str, Assignment]]:
        self.subscriptions += 1
        if self.fail_stream > 0:
            self.fail_stream -= 1
            raise Unavailable("watch broken")
        while True:
            yield await self.snapshots.get()

    async def report(self, node: str, observations: list[VmObservation]) -> None:
        if self.fail_report > 0:
            self.fail_report -= 1
            raise Unavailable("no leader")
        self.report_calls.append(list(observations))
        self.reports.extend(observations)

    async def report_gone(self, node: str, vm: str, vm_id: str, epoch: int) -> None:
        if self.fail_gone > 0:
            self.fail_gone -= 1
            raise Unavailable("no leader")
        self.gone.append((vm, vm_id, epoch))

    # -- test helpers -------------------------------------------------------------------------

    def assign(self, *assignments: Assignment) -> None:
        """Hand the agent a new full desired set."""
        self.snapshots.put_nowait({a.vm: a for a in assignments})

    def last(self, vm: str) -> VmObservation | None:
        """The latest observation reported for ``vm``."""
        for obs in reversed(self.reports):
            if obs.vm == vm:
                return obs
        return None

    def states(self, vm: str) -> list[str]:
        """Every state reported for ``vm``, in order."""
        return [obs.state for obs in self.reports if obs.vm == vm]


def _conforms(ns: FakeNodeService) -> NodeService:
    return ns  # mypy checks that the fake fulfils the Protocol


def assignment(
    vm: str,
    *,
    epoch: int = 1,
    generation: int = 1,
    reboot_generation: int = 0,
    power_generation: int = 0,
    power_state: str = "running",
    restart_policy: str = "on-failure",
    memory_mib: int = 512,
    labels: dict[str, str] | None = None,
    vm_id: str | None = None,
    node: str = "hv-1",
) -> Assignment:
    return Assignment(
        vm=vm,
        vm_id=vm_id or f"id-{vm}",
        node=node,
        epoch=epoch,
        generation=generation,
        reboot_generation=reboot_generation,
        power_generation=power_generation,
        spec=VmSpec.model_validate(
            {
                "power_state": power_state,
                "restart_policy": restart_policy,
                "memory_mib": memory_mib,
                "labels": labels or {},
            }
        ),
    )


def inventory() -> Inventory:
    return Inventory(
        cpus=4,
        memory_mib=8192,
        disk_gib=100.0,
        disk_free_gib=50.0,
        hostname="hv-1",
        kernel="6.1.0",
        corral_version="0.1.0",
        driver="fake",
    )


async def eventually(condition: Callable[[], object], what: str, *, timeout_s: float = 2.0) -> None:
    """Wait until ``condition()`` is truthy; fail naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.005)
