"""The VM's vCPUs must fit in what the host may carry: ``(cpus - reserved) * ratio``."""

from __future__ import annotations

from corral.scheduler.feasible.base import Rejected, short_of_room
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_INSUFFICIENT_CPU", "CpuFilter"]

NAME = "cpu"
REASON_INSUFFICIENT_CPU = "insufficient vcpus"


class CpuFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return True

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        need = request.vcpus
        return short_of_room(
            ix.cpu_room,
            hosts,
            need,
            rejected,
            NAME,
            lambda free: f"{REASON_INSUFFICIENT_CPU} (needs {need}, {free} free)",
        )
