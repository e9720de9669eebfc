"""The VM's memory must fit in what the host may carry: ``(memory - reserved) * ratio``."""

from __future__ import annotations

from corral.scheduler.feasible.base import Rejected
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
        cap, used = ix.mem_cap, ix.mem_used
        ok = [i for i in hosts if used[i] + need <= cap[i]]
        if len(ok) != len(hosts):
            for i in hosts:
                free = cap[i] - used[i]
                if need > free:
                    rejected[i] = (
                        NAME,
                        f"{REASON_INSUFFICIENT_MEMORY} (needs {need} MiB, {max(free, 0)} free)",
                    )
        return ok
