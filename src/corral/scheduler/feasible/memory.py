"""The VM's memory must fit in what the host may carry: ``(memory - reserved) * ratio``."""

from __future__ import annotations

from corral.scheduler.feasible.base import Rejected, short_of_room
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_INSUFFICIENT_MEMORY", "MemoryFilter"]

NAME = "memory"
REASON_INSUFFICIENT_MEMORY = "insufficient memory"


class MemoryFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return True

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        need = request.memory_mib
        return short_of_room(
            ix.mem_room,
            hosts,
            need,
            rejected,
            NAME,
            lambda free: f"{REASON_INSUFFICIENT_MEMORY} (needs {need} MiB, {free} free)",
        )
