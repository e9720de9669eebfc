"""A VM that requires KVM runs only where QEMU can use KVM (not TCG emulation alone)."""

from __future__ import annotations

from corral.scheduler.feasible.base import Rejected
from corral.scheduler.index import ClusterIndex
from corral.scheduler.snapshot import Request

__all__ = ["NAME", "REASON_NO_KVM", "AccelFilter"]

NAME = "accel"
REASON_NO_KVM = "node has no KVM"


class AccelFilter:
    name = NAME

    def applies(self, request: Request) -> bool:
        return request.requires_kvm

    def run(
        self, ix: ClusterIndex, request: Request, hosts: list[int], rejected: Rejected
    ) -> list[int]:
        kvm = ix.kvm_hosts
        ok = [i for i in hosts if i in kvm]
        if len(ok) != len(hosts):
            for i in hosts:
                if i not in kvm:
                    has = ", ".join(sorted(ix.nodes[i].accelerators)) or "none reported"
                    rejected[i] = (NAME, f"{REASON_NO_KVM} (accelerators: {has})")
        return ok
