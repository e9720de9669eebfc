"""The VM's disks must fit in the free bytes of their pools.

A local pool's space is the host's; a shared pool's is the cluster's (so it rejects every host
or none). A live migration copies local disks (they need room on the target) but leaves disks on
shared pools where they are. Runs after :mod:`pools`, so every local pool named is present.
"""

from __future__ import annotations

from functools import partial

from corral.scheduler.feasible.base import Rejected, short_of_room
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_INSUFFICIENT_DISK", "DiskFilter"]

NAME = "disk"
REASON_INSUFFICIENT_DISK = "insufficient disk"

_GIB = 1024**3


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def _short_of_disk(pool: str, need: int, free: int) -> str:
    return f"{REASON_INSUFFICIENT_DISK} in pool {pool} (needs {_gib(need)}, {_gib(free)} free)"


class DiskFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return bool(request.disks)

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        if not request.migrating:
            for pool, need in request.disks.items():
                if pool in ix.shared_cap:
                    free = ix.shared_cap[pool] - ix.shared_used.get(pool, 0)
                    if need > free:
                        why = (
                            f"{REASON_INSUFFICIENT_DISK} in shared pool {pool} "
                            f"(needs {_gib(need)}, {_gib(max(free, 0))} free)"
                        )
                        for i in hosts:
                            rejected[i] = (NAME, why)
                        return []
        local = [(p, n) for p, n in request.disks.items() if p not in ix.shared_cap]
        if not local:
            return hosts
        for pool, need in local:
            room = ix.pool_room.get(pool)
            if room is None:
                # No host has it: the pools filter has already rejected every host.
                return []
            hosts = short_of_room(
                room,
                hosts,
                need,
                rejected,
                NAME,
                partial(_short_of_disk, pool, need),
            )
        return hosts
