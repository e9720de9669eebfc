"""A VM that requires KVM runs only where QEMU can use KVM (not TCG emulation alone)."""

from __future__ import annotations

from itertools import filterfalse
from operator import attrgetter

from corral.scheduler.feasible.base import Rejected
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_NO_KVM", "AccelFilter"]

NAME = "accel"
REASON_NO_KVM = "node has no KVM"

_ACCELERATORS = attrgetter("accelerators")


class AccelFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return request.requires_kvm

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        kvm = ix.kvm_hosts
        ok = list(filter(kvm.__contains__, hosts))
        if len(ok) != len(hosts):
            bad = list(filterfalse(kvm.__contains__, hosts))
            has = list(map(_ACCELERATORS, map(ix.nodes.__getitem__, bad)))
            # One sentence per set of accelerators (most hosts share a few).
            said = {
                a: (
                    NAME,
                    f"{REASON_NO_KVM} (accelerators: {', '.join(sorted(a)) or 'none reported'})",
                )
                for a in set(has)
            }
            rejected.update(zip(bad, map(said.__getitem__, has), strict=True))
        return ok
